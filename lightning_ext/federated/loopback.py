"""A real Flower deployment on one machine: a ``flower-superlink`` and N ``flower-supernode`` processes on loopback.

For the integration test and the cost benchmark, and as a worked example of the deployment commands. Everything
stays on ``127.0.0.1``: free ports, ``--insecure`` (no TLS on loopback), telemetry and the update check off,
runtime dependency installation off (no ``uv sync``), ``FLWR_HOME`` in a private directory. Every process is started
in its own session and the whole session is ended on :meth:`LoopbackDeployment.close` (also on error), which also
ends the ``flower-superexec`` and ``flwr-clientapp``/``flwr-serverapp`` processes they start.

Where the time of a deployed round goes (flwr 1.42, read from its code and measured on the cost page):
every message runs in a fresh ``flwr-clientapp`` process (imports Flower, torch and Lightning again), the SuperNode
polls the SuperLink every 3 s when idle (fixed), ``flower-superexec`` polls for tasks every
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` s (default 1; 0.1 here), and Flower's grid polls for replies every 3 s (the
library's ServerApp polls every 0.2 s instead). Heartbeats (every 30 s) only mark dead nodes; they add no wait.

Example (tests/test_federated_deployment.py runs a whole one)::

    app = export_app("fed.yaml", "fed_app")                  # lightning_ext.federated.flower_app
    with LoopbackDeployment(num_supernodes=2) as deployment:
        done = deployment.run(app, {"output-dir": "out"})   # flwr run fed_app deploy --stream
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Union

from lightning_ext.core.distributed import free_port

#: the environment every Flower process gets: nothing leaves the machine, nothing is installed
OFFLINE_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
               "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}


def _script(name: str) -> str:
    """The console script ``name`` of this interpreter's environment (``flower-superlink``, ``flwr``, ...)."""
    path = Path(sys.executable).parent / name
    return str(path) if path.exists() else name


class LoopbackDeployment:
    """A SuperLink and ``num_supernodes`` SuperNodes on loopback; use as a context manager.

    Node ``i`` gets ``--node-config "partition-id=i num-partitions=N"``. :meth:`run` submits an app with
    ``flwr run <app> deploy --stream`` and waits for it.

    Args:
        num_supernodes: SuperNodes to start.
        workdir: where ``FLWR_HOME`` and the logs go (``None``: a temporary directory, removed on close).
        env: extra environment variables of every process.
    """

    def __init__(self, num_supernodes: int = 2, workdir: Optional[Union[str, Path]] = None,
                 env: Optional[dict] = None) -> None:
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}.")
        self.num_supernodes = num_supernodes
        self._tmp = tempfile.TemporaryDirectory(prefix="lx_flower_") if workdir is None else None
        self.workdir = Path(workdir if workdir is not None else self._tmp.name)
        self.home = self.workdir / "flwr_home"
        self.home.mkdir(parents=True, exist_ok=True)
        path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])  # flower-superexec, ...
        self.env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(self.home), "PATH": path, **dict(env or {})}
        self.procs: list[subprocess.Popen] = []
        self.port: Optional[int] = None

    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.workdir / log, "wb")  # noqa: SIM115 - closed with the process in close()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env, cwd=self.workdir,
                                start_new_session=True)
        proc._lx_log = out  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def start(self) -> "LoopbackDeployment":
        """Start the SuperLink, then the SuperNodes, and write the ``deploy`` connection of ``flwr``."""
        self.port = free_port()
        self._start([_script("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(self.port),
                     "--disable-runtime-dependency-installation"], "superlink.log")
        self.wait_listening(self.port, self.procs[0])
        for i in range(self.num_supernodes):
            self._start([_script("flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{self.port}",
                         "--host", "127.0.0.1", "--port", str(free_port()),
                         "--node-config", f"partition-id={i} num-partitions={self.num_supernodes}"],
                        f"supernode{i}.log")
        (self.home / "config.toml").write_text(
            '[superlink]\ndefault = "deploy"\n\n'
            f'[superlink.deploy]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n')
        return self

    def wait_listening(self, port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
        """Wait until ``127.0.0.1:port`` accepts connections (raises if ``proc`` exits or ``timeout`` passes)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}; see the logs in {self.workdir}.")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(1.0)
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f} s; see the logs in {self.workdir}.")

    def run(self, app_dir: Union[str, Path], run_config: Optional[dict] = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
        """``flwr run <app_dir> deploy --stream [--run-config ...]``; raises ``RuntimeError`` if a process died."""
        dead = [p.args[0] for p in self.procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"Flower processes exited early: {dead}; see the logs in {self.workdir}.")
        args = [_script("flwr"), "run", str(app_dir), "deploy", "--stream"]
        if run_config:
            args += ["--run-config", " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())]
        return subprocess.run(args, env=self.env, cwd=self.workdir, capture_output=True, text=True, timeout=timeout)

    def logs(self) -> str:
        """The tail of every process's log (for a failing test's message)."""
        parts = []
        for f in sorted(self.workdir.glob("*.log")):
            parts.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-3000:])
        return "\n".join(parts)

    def close(self) -> None:
        """End every started process, its session and its descendants (Flower starts ``flower-superexec`` in a
        session of its own): SIGTERM, then SIGKILL after 10 s; remove the temp dir."""
        children = [pid for proc in self.procs for pid in _descendants(proc.pid)]
        for proc in reversed(self.procs):
            _signal_group(proc, signal.SIGTERM)
        for pid in children:
            _signal_pid(pid, signal.SIGTERM)
        deadline = time.time() + 10
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                pass
            _signal_group(proc, signal.SIGKILL)  # the session's children (superexec, clientapps), if any remain
            if proc.poll() is None:
                proc.wait(timeout=5)
            proc._lx_log.close()  # type: ignore[attr-defined]
        for pid in children:
            if _alive(pid, deadline + 5):
                _signal_pid(pid, signal.SIGKILL)
        self.procs.clear()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "LoopbackDeployment":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the session this process leads (start_new_session=True)
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pid(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int, until: float) -> bool:
    """Whether ``pid`` still runs at ``until`` (polls; a zombie counts as ended)."""
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state == "Z":
            return False
        if time.time() >= until:
            return True
        time.sleep(0.2)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux ``/proc``; empty elsewhere)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
