"""Capture real, labelled network traffic offline: servers and clients in two network namespaces joined by a veth pair.

Run it as a module (never at import time), as root, with ``ip`` (iproute2) and ``tcpdump`` installed::

    sudo python -m lightning_ext.traffic.capture --out captures/day0 --seconds 90 --seed 0 --attacks

What it does (the recipe of the spec's section 2.0):

1. makes two network namespaces (client, server) joined by a veth pair, with no route anywhere else, so nothing
   leaves the machine; turns segmentation/checksum offloads off on both ends (``ethtool -K`` when present, else the
   kernel's legacy ethtool ioctls from Python), so captured frames look like Ethernet (<= 1,514 bytes) and not 64 KB
   loopback super-packets;
2. starts real servers in the server namespace (one Python process): HTTP (``http.server``), HTTPS (the same behind
   TLS with a self-signed certificate made here with ``openssl``), DNS (UDP, answers built with dpkt), SMTP
   (``smtpd``), file transfer (a length-prefixed bulk TCP download) and streaming (RTP-like UDP datagrams at a
   fixed rate); SSH is left out when ``sshd`` is absent;
3. captures on the client's veth end with ``tcpdump -U`` while a seeded client driver runs sessions of every
   application (random object sizes, request counts and think times), each application from its own client
   address; with ``--attacks`` also bounded attack-like flows: a TCP connect scan and a connection flood;
4. writes ``capture.pcap`` and ``capture.labels.json`` (client address -> label, the server address, offload
   state, seed), and deletes both namespaces even when a step fails.

Options, all off by default: ``--profile mixed`` (:mod:`lightning_ext.traffic.capture_mixed`: four applications
over TLS on one port, DNS lookups from every application, overlapping seeded sizes and timing, so a single flow
does not name its application), ``--rate-mbit R`` (a ``tc tbf`` token bucket on both veth ends; ``netem`` is not in
every kernel), ``--server-delay-ms D`` (seeded log-normal delay before each mixed-profile HTTPS response) and
``--workers N`` (concurrent client threads, 3 by default)::

    sudo python -m lightning_ext.traffic.capture --out captures/mixed --seconds 180 --seed 0 --attacks \
        --profile mixed --rate-mbit 20 --server-delay-ms 20 --workers 5

Labels come from the client address (ground truth known by construction); models must not see addresses or ports:
the DataModules mask them by default (:mod:`lightning_ext.traffic.pcap`).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

SUBNET = "10.251.0"
SERVER_IP = f"{SUBNET}.2"
#: application -> (client address, server port, transport)
APPS = {
    "http": (f"{SUBNET}.11", 8080, "tcp"),
    "tls": (f"{SUBNET}.12", 8443, "tcp"),
    "dns": (f"{SUBNET}.13", 5353, "udp"),
    "smtp": (f"{SUBNET}.14", 2525, "tcp"),
    "file": (f"{SUBNET}.15", 2121, "tcp"),
    "stream": (f"{SUBNET}.16", 5004, "udp"),
}
ATTACKS = {"scan": f"{SUBNET}.21", "flood": f"{SUBNET}.22"}
_SIOCETHTOOL = 0x8946
#: legacy ethtool "set" commands: tx checksum, rx checksum, scatter-gather, TSO, GSO, GRO
_ETHTOOL_SET = {"tx": 0x17, "rx": 0x15, "sg": 0x19, "tso": 0x1F, "gso": 0x24, "gro": 0x2C}


def _run(cmd: list[str], check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


def offloads_off(dev: str) -> str:
    """Turn TSO/GSO/GRO and checksum offloads off on ``dev`` (in the caller's namespace); say how it was done."""
    if shutil.which("ethtool"):
        _run(["ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off", "tx", "off", "rx", "off"])
        return "ethtool -K tso/gso/gro/tx/rx off"
    import array
    import fcntl

    done = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in ("tso", "gso", "gro", "tx", "rx"):
            buf = array.array("I", [_ETHTOOL_SET[name], 0])
            ifr = struct.pack("16sP", dev.encode(), buf.buffer_info()[0])
            try:
                fcntl.ioctl(s.fileno(), _SIOCETHTOOL, ifr)
                done.append(name)
            except OSError as err:
                done.append(f"{name}:failed({err.errno})")
    return "ethtool absent; legacy SIOCETHTOOL ioctls: " + ",".join(done)


# ---------------------------------------------------------------------------------------------------- servers


def _serve(root: Path, cert: Path, key: Path, stop_file: Path, profile: str = "basic", delay_ms: float = 0.0,
           seed: int = 0) -> None:
    """Run every server in this (server) namespace until ``stop_file`` appears (``profile="mixed"`` adds the
    keep-alive HTTPS server of :mod:`lightning_ext.traffic.capture_mixed`)."""
    import functools
    import http.server
    import ssl
    import warnings

    import dpkt

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # noqa: D102 - silence the access log
            pass

    handler = functools.partial(Quiet, directory=str(root))
    servers: list = []
    httpd = http.server.ThreadingHTTPServer((SERVER_IP, APPS["http"][1]), handler)
    tlsd = http.server.ThreadingHTTPServer((SERVER_IP, APPS["tls"][1]), handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    tlsd.socket = ctx.wrap_socket(tlsd.socket, server_side=True)
    servers += [httpd, tlsd]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    stops = [s.shutdown for s in servers]
    if profile in ("mixed", "mid"):
        from lightning_ext.traffic.capture_mixed import start_https_server

        stops.append(start_https_server(str(cert), str(key), delay_ms, seed))

    def dns_loop() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((SERVER_IP, APPS["dns"][1]))
        sock.settimeout(0.5)
        while not stop_file.exists():
            try:
                data, peer = sock.recvfrom(2048)
            except socket.timeout:
                continue
            try:
                q = dpkt.dns.DNS(data)
            except (dpkt.UnpackError, IndexError):
                continue
            q.op, q.rcode = dpkt.dns.DNS_RA | dpkt.dns.DNS_QR, dpkt.dns.DNS_RCODE_NOERR
            rng = random.Random(hash(q.qd[0].name) if q.qd else 0)
            q.an = []
            for _ in range(rng.randint(1, 4)):
                rr = dpkt.dns.DNS.RR(name=q.qd[0].name if q.qd else "x", type=dpkt.dns.DNS_A, ttl=300)
                rr.ip = bytes([10, rng.randint(0, 255), rng.randint(0, 255), rng.randint(1, 254)])
                rr.rlen = 4
                q.an.append(rr)
            sock.sendto(bytes(q), peer)

    def file_loop() -> None:
        srv = socket.create_server((SERVER_IP, APPS["file"][1]))
        srv.settimeout(0.5)

        def one(conn: socket.socket) -> None:
            with conn:
                name = conn.makefile("rb").readline().decode().strip().split(" ")[-1]
                data = (root / name).read_bytes() if (root / name).is_file() else b""
                conn.sendall(struct.pack("!Q", len(data)) + data)

        while not stop_file.exists():
            try:
                conn, _ = srv.accept()
            except socket.timeout:
                continue
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    def stream_loop() -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((SERVER_IP, APPS["stream"][1]))
        sock.settimeout(0.5)

        def play(peer, n: int, gap: float, size: int) -> None:
            ssrc = random.getrandbits(32)
            for i in range(n):  # RTP-like: version 2, payload type 0, sequence, timestamp, SSRC, payload
                header = struct.pack("!BBHII", 0x80, 0, i & 0xFFFF, (i * 160) & 0xFFFFFFFF, ssrc)
                sock.sendto(header + os.urandom(size), peer)  # from the server port: one flow per session
                time.sleep(gap)

        while not stop_file.exists():
            try:
                data, peer = sock.recvfrom(256)
            except socket.timeout:
                continue
            _, n, gap, size = data.decode().split()
            threading.Thread(target=play, args=(peer, min(int(n), 500), float(gap), min(int(size), 1200)),
                             daemon=True).start()

    def smtp_loop() -> None:
        import asyncore

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import smtpd

            class Sink(smtpd.SMTPServer):
                def process_message(self, *args, **kwargs):  # noqa: D102 - accept and drop the mail
                    return None

            Sink((SERVER_IP, APPS["smtp"][1]), None)
        while not stop_file.exists():
            asyncore.loop(timeout=0.5, count=1)

    for target in (dns_loop, file_loop, stream_loop, smtp_loop):
        threading.Thread(target=target, daemon=True).start()
    print("ready", flush=True)
    while not stop_file.exists():
        time.sleep(0.2)
    for stop in stops:
        stop()


# ---------------------------------------------------------------------------------------------------- clients


def _http_session(rng: random.Random, tls: bool, files: list[str]) -> None:
    import http.client
    import ssl

    src, port, _ = APPS["tls" if tls else "http"]
    for _ in range(rng.randint(1, 3)):  # a few connections per session, a few requests per connection
        if tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
            conn = http.client.HTTPSConnection(SERVER_IP, port, timeout=5, context=ctx, source_address=(src, 0))
        else:
            conn = http.client.HTTPConnection(SERVER_IP, port, timeout=5, source_address=(src, 0))
        for _ in range(rng.randint(1, 4)):
            conn.request("GET", "/" + rng.choice(files))
            conn.getresponse().read()
            time.sleep(rng.uniform(0, 0.05))
        conn.close()


def _dns_session(rng: random.Random, files: list[str]) -> None:
    import dpkt

    src, port, _ = APPS["dns"]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.settimeout(2)
        for _ in range(rng.randint(1, 5)):
            name = f"{rng.choice(['www', 'api', 'cdn', 'mail'])}.{rng.randrange(10**6)}.example.internal"
            q = dpkt.dns.DNS(id=rng.randrange(65536), op=dpkt.dns.DNS_RD,
                             qd=[dpkt.dns.DNS.Q(name=name, type=dpkt.dns.DNS_A)])
            s.sendto(bytes(q), (SERVER_IP, port))
            try:
                s.recvfrom(2048)
            except socket.timeout:
                pass
            time.sleep(rng.uniform(0, 0.1))


def _smtp_session(rng: random.Random, files: list[str]) -> None:
    import smtplib

    src, port, _ = APPS["smtp"]
    with smtplib.SMTP(SERVER_IP, port, timeout=5, source_address=(src, 0)) as smtp:
        for _ in range(rng.randint(1, 3)):
            body = "x" * rng.randint(50, 20_000)
            smtp.sendmail("a@example.internal", ["b@example.internal"], f"Subject: t\r\n\r\n{body}")


def _file_session(rng: random.Random, files: list[str]) -> None:
    src, port, _ = APPS["file"]
    with socket.create_connection((SERVER_IP, port), timeout=5, source_address=(src, 0)) as s:
        s.sendall(f"RETR {rng.choice(files)}\n".encode())
        (n,) = struct.unpack("!Q", s.recv(8, socket.MSG_WAITALL))
        got = 0
        while got < n:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += len(chunk)


def udp_play(src: str, port: int, n: int, gap: float, size: int) -> None:
    """Ask the UDP streaming server at ``port`` for ``n`` datagrams of ``size`` bytes every ``gap`` s, from ``src``,
    and read them until the stream ends (or a second passes without one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.settimeout(1)
        s.sendto(f"PLAY {n} {gap} {size}".encode(), (SERVER_IP, port))
        end = time.time() + n * gap + 1
        while time.time() < end:
            try:
                s.recvfrom(2048)
            except socket.timeout:
                break


def _stream_session(rng: random.Random, files: list[str]) -> None:
    src, port, _ = APPS["stream"]
    udp_play(src, port, rng.randint(20, 120), rng.choice([0.01, 0.02]), rng.choice([160, 320, 640]))


def _scan_session(rng: random.Random, files: list[str]) -> None:
    start = rng.randrange(1, 60_000)
    for port in range(start, start + rng.randint(20, 60)):  # TCP connect scan of a port range
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ATTACKS["scan"], 0))
            s.settimeout(0.2)
            s.connect_ex((SERVER_IP, port))


def _flood_session(rng: random.Random, files: list[str]) -> None:
    for _ in range(rng.randint(10, 30)):  # many short connections that send a partial request (slowloris-like)
        try:
            with socket.create_connection((SERVER_IP, APPS["http"][1]), timeout=1,
                                          source_address=(ATTACKS["flood"], 0)) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        except OSError:
            pass


SESSIONS: dict[str, Callable[[random.Random, list[str]], None]] = {
    "http": lambda rng, files: _http_session(rng, False, files),
    "tls": lambda rng, files: _http_session(rng, True, files),
    "dns": _dns_session, "smtp": _smtp_session, "file": _file_session, "stream": _stream_session,
    "scan": _scan_session, "flood": _flood_session,
}


def _drive(seconds: float, seed: int, attacks: bool, files: list[str], workers: int = 3,
           profile: str = "basic", shared: Optional[tuple[str, ...]] = None) -> dict[str, int]:
    """Run sessions of randomly chosen applications from ``workers`` threads until ``seconds`` have passed."""
    apps, attack_names = profile_addresses(profile, shared)
    kinds = list(apps) + (list(attack_names) if attacks else [])
    if profile in ("mixed", "mid"):
        from lightning_ext.traffic.capture_mixed import mid_session, mixed_session

        one = mixed_session if profile == "mixed" else mid_session
        sessions = {k: functools.partial(one, k) for k in kinds}
    else:
        sessions = SESSIONS
    counts = {k: 0 for k in kinds}
    errors = {k: 0 for k in kinds}
    last_error: dict[str, str] = {}
    deadline = time.time() + seconds
    lock = threading.Lock()

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while time.time() < deadline:
            kind = rng.choices(kinds, weights=[1.0] * len(apps) + [0.3] * (len(kinds) - len(apps)))[0]
            try:
                sessions[kind](rng, files)
                with lock:
                    counts[kind] += 1
            except OSError as err:
                with lock:
                    errors[kind] += 1
                    last_error[kind] = f"{type(err).__name__}: {err}"[:200]
            time.sleep(rng.expovariate(1 / 0.05))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 60)
    return {"sessions": counts, "errors": errors, "last_error": last_error}


def profile_addresses(profile: str, shared: Optional[tuple[str, ...]] = None) -> tuple[dict[str, tuple], dict[str, str]]:
    """``(applications, attacks)`` of a profile: label -> (client address, server port, transport) and label ->
    client address (``shared``: the mid profile's shared-TLS group, its default when ``None``)."""
    if profile in ("mixed", "mid"):
        from lightning_ext.traffic.capture_mixed import MID_SHARED, MIXED_APPS, MIXED_ATTACKS, mid_apps

        return (MIXED_APPS if profile == "mixed" else mid_apps(shared or MID_SHARED)), MIXED_ATTACKS
    return APPS, ATTACKS


# ---------------------------------------------------------------------------------------------------- orchestration


def _make_content(root: Path, seed: int) -> list[str]:
    rng = random.Random(seed)
    names = []
    for i in range(12):
        size = int(rng.choice([2e2, 2e3, 2e4, 1e5, 4e5]) * rng.uniform(0.5, 1.5))
        name = f"obj{i}.bin" if i % 2 else f"page{i}.html"
        (root / name).write_bytes(os.urandom(size) if i % 2 else (b"<html>" + b"lorem ipsum " * (size // 12)))
        names.append(name)
    return names


def capture(out: Path, seconds: float = 60.0, seed: int = 0, attacks: bool = False, profile: str = "basic",
            rate_mbit: Optional[float] = None, server_delay_ms: float = 0.0, workers: int = 3,
            shared: Optional[tuple[str, ...]] = None) -> dict:
    """Make one labelled capture under ``out`` (``capture.pcap``, ``capture.labels.json``); return the manifest.

    ``profile="mixed"`` runs the applications of :mod:`lightning_ext.traffic.capture_mixed` (not separable flow by
    flow); ``rate_mbit`` shapes both veth ends with ``tc qdisc ... tbf``; ``server_delay_ms`` delays the mixed
    profile's HTTPS responses (seeded log-normal); ``workers`` client threads run sessions concurrently;
    ``profile="mid"`` puts the ``shared`` mixed applications on the TLS port beside separable ones
    (:func:`~lightning_ext.traffic.capture_mixed.mid_apps`)."""
    if profile not in ("basic", "mixed", "mid"):
        raise ValueError(f"profile must be 'basic', 'mixed' or 'mid', got {profile!r}.")
    if profile == "mid":
        from lightning_ext.traffic.capture_mixed import MID_SHARED, check_shared

        shared = check_shared(shared or MID_SHARED)
    elif shared is not None:
        raise ValueError("shared applies to profile='mid' only; leave it out.")
    apps, attack_ips = profile_addresses(profile, shared)
    if os.geteuid() != 0:
        raise PermissionError("the capture needs root (network namespaces and tcpdump); run it with sudo.")
    for tool in ("ip", "tcpdump", "openssl") + (("tc",) if rate_mbit is not None else ()):
        if shutil.which(tool) is None:
            raise FileNotFoundError(f"the capture needs `{tool}`; install it (Debian: apt-get install iproute2 "
                                    "tcpdump openssl).")
    out.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid() % 100000}"
    ns_c, ns_s, dev_c, dev_s = f"lxc{tag}", f"lxs{tag}", f"lxv{tag}c", f"lxv{tag}s"
    py = [sys.executable, "-m", "lightning_ext.traffic.capture"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    procs: list[subprocess.Popen] = []
    work = Path(tempfile.mkdtemp(prefix="lxcap"))
    stop = work / "stop"
    pcap = out / "capture.pcap"
    try:
        _run(["ip", "netns", "add", ns_c])
        _run(["ip", "netns", "add", ns_s])
        _run(["ip", "link", "add", dev_c, "type", "veth", "peer", "name", dev_s])
        _run(["ip", "link", "set", dev_c, "netns", ns_c])
        _run(["ip", "link", "set", dev_s, "netns", ns_s])
        _run(["ip", "-n", ns_s, "addr", "add", f"{SERVER_IP}/24", "dev", dev_s])
        for ip in [a[0] for a in apps.values()] + list(attack_ips.values()):
            _run(["ip", "-n", ns_c, "addr", "add", f"{ip}/24", "dev", dev_c])
        for ns, dev in ((ns_c, dev_c), (ns_s, dev_s)):
            _run(["ip", "-n", ns, "link", "set", dev, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
        shaping = None
        if rate_mbit is not None:  # a token bucket on both ends: real queueing between concurrent flows
            for ns, dev in ((ns_c, dev_c), (ns_s, dev_s)):
                _run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate",
                      f"{rate_mbit}mbit", "burst", "32kbit", "latency", "200ms"])
            shaping = f"tc tbf rate {rate_mbit}mbit burst 32kbit latency 200ms on both veth ends"
        offload = [_run(["ip", "netns", "exec", ns, *py, "offloads-off", dev], check=True).stdout.strip()
                   for ns, dev in ((ns_c, dev_c), (ns_s, dev_s))]
        cert, key = work / "cert.pem", work / "key.pem"
        _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
              "/CN=lightning-ext-capture", "-keyout", str(key), "-out", str(cert)])
        content = work / "www"
        content.mkdir()
        files = _make_content(content, seed)
        server = subprocess.Popen(["ip", "netns", "exec", ns_s, *py, "serve", str(content), str(cert), str(key),
                                   str(stop), profile, str(server_delay_ms), str(seed)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        procs.append(server)
        if server.stdout.readline().strip() != "ready":
            raise RuntimeError(f"the servers did not start: {server.stderr.read()[-500:]}")
        dump = subprocess.Popen(["ip", "netns", "exec", ns_c, "tcpdump", "-i", dev_c, "-n", "-U", "-s", "0",
                                 "-w", str(pcap)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        procs.append(dump)
        time.sleep(1.5)  # tcpdump prints "listening on" when ready; one second is plenty on an idle veth
        client = _run_client(ns_c, py, env, seconds, seed, attacks, files, workers, profile, shared)
        time.sleep(1.0)
        dump.send_signal(signal.SIGINT)
        dump.wait(timeout=20)
        manifest = {"label_by": "client_ip", "server": SERVER_IP,
                    "labels": {**{v[0]: k for k, v in apps.items()},
                               **({v: k for k, v in attack_ips.items()} if attacks else {})},
                    "applications": list(apps), "attack_labels": list(attack_ips) if attacks else [],
                    "profile": profile, **({"shared": list(shared)} if shared else {}), "shaping": shaping, "server_delay_ms": server_delay_ms, "workers": workers,
                    "seconds": seconds, "seed": seed, "attacks": attacks, "offloads": offload,
                    "ssh": "left out: sshd is not installed" if not shutil.which("sshd") else "not scripted",
                    **client}
        with open(out / "capture.labels.json.tmp", "w") as f:
            json.dump(manifest, f, indent=1)
        os.replace(out / "capture.labels.json.tmp", out / "capture.labels.json")
        return manifest
    finally:
        stop.touch()
        for p in reversed(procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
        for ns in (ns_c, ns_s):
            _run(["ip", "netns", "delete", ns], check=False)  # deleting a namespace deletes its veth end too
        shutil.rmtree(work, ignore_errors=True)


def _run_client(ns: str, py: list[str], env: dict, seconds: float, seed: int, attacks: bool,
                files: list[str], workers: int = 3, profile: str = "basic",
                shared: Optional[tuple[str, ...]] = None) -> dict:
    cmd = ["ip", "netns", "exec", ns, *py, "client", str(seconds), str(seed), str(int(attacks)), ",".join(files),
           str(workers), profile, ",".join(shared or ())]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"the client driver failed: {res.stderr[-800:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m lightning_ext.traffic.capture --out DIR [--seconds S] [--seed N] [--attacks]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "offloads-off":  # internal: runs inside a namespace
        print(offloads_off(argv[1]))
        return 0
    if argv and argv[0] == "serve":
        _serve(Path(argv[1]), Path(argv[2]), Path(argv[3]), Path(argv[4]), *argv[5:6], *map(float, argv[6:7]),
               *map(int, argv[7:8]))
        return 0
    if argv and argv[0] == "client":
        shared = tuple(argv[7].split(",")) if len(argv) > 7 and argv[7] else None
        print(json.dumps(_drive(float(argv[1]), int(argv[2]), bool(int(argv[3])), argv[4].split(","),
                                *map(int, argv[5:6]), *argv[6:7], shared=shared)))
        return 0
    parser = argparse.ArgumentParser(prog="python -m lightning_ext.traffic.capture", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for capture.pcap and capture.labels.json")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long clients run sessions (default 60)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attacks", action="store_true", help="add bounded attack flows (basic: scan and flood; "
                        "mixed: scan and a slow HTTPS login brute force)")
    parser.add_argument("--profile", choices=["basic", "mixed", "mid"], default="basic",
                        help="basic (default): one protocol and port per application, separable flow by flow; mixed: "
                        "four applications over TLS on one port, DNS lookups from every application, overlapping "
                        "seeded sizes and timing (lightning_ext.traffic.capture_mixed); mid: --shared of those TLS "
                        "applications beside separable mail, voip and dns, no lookups from applications")
    parser.add_argument("--shared", default=None, help="mid profile: comma-separated TLS applications sharing the "
                        "port, 1-4 of web,api,download,video (default web,api,video)")
    parser.add_argument("--rate-mbit", type=float, default=None,
                        help="shape both veth ends with a token bucket (tc tbf) of this rate (default: off)")
    parser.add_argument("--server-delay-ms", type=float, default=0.0,
                        help="mixed profile: mean seeded log-normal delay before each HTTPS response (default 0)")
    parser.add_argument("--workers", type=int, default=3, help="concurrent client threads (default 3)")
    args = parser.parse_args(argv)
    if not 0 < args.seconds <= 3600:
        parser.error(f"--seconds must be in (0, 3600], got {args.seconds}")
    if args.rate_mbit is not None and not (math.isfinite(args.rate_mbit) and 0.1 <= args.rate_mbit <= 10_000):
        parser.error(f"--rate-mbit must be in [0.1, 10000], got {args.rate_mbit}")
    if not (math.isfinite(args.server_delay_ms) and 0 <= args.server_delay_ms <= 1000):
        parser.error(f"--server-delay-ms must be in [0, 1000], got {args.server_delay_ms}")
    if not 1 <= args.workers <= 32:
        parser.error(f"--workers must be in [1, 32], got {args.workers}")
    shared = tuple(args.shared.split(",")) if args.shared else None
    if shared is not None and args.profile != "mid":
        parser.error("--shared applies to --profile mid only")
    try:
        manifest = capture(Path(args.out), args.seconds, args.seed, args.attacks, args.profile, args.rate_mbit,
                           args.server_delay_ms, args.workers, shared)
    except ValueError as err:
        parser.error(str(err))
    except (PermissionError, FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", None)
        print(f"capture failed: {err}" + (f" ({detail.strip()[-300:]})" if detail else ""), file=sys.stderr)
        return 2
    print(json.dumps({k: manifest[k] for k in ("sessions", "errors", "offloads")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
