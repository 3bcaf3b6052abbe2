"""The capture recipe's ``--profile mixed``: applications that are not separable flow by flow.

Used by :mod:`lightning_ext.traffic.capture` (servers in the server namespace, sessions in the client namespace);
never run at import time. The basic profile gives every application its own protocol and port, so a single flow's
size and flags name its label (a logistic regression on one flow record reaches macro-F1 1.0). Here:

- four applications speak HTTPS to the **same TLS port** (``TLS_PORT``) of one keep-alive HTTP/1.1 server: ``web``
  (pages and objects of a shared log-uniform size pool), ``api`` (small POSTs), ``download`` (large objects) and
  ``video`` (segments fetched at a steady pace); ``mail`` (SMTP) and ``voip`` (RTP-like UDP) keep their own protocols;
- every session starts with **DNS lookups from the application's own client address** (labelled as that
  application), so DNS flows of every label look alike and only their context (the flows around them) tells them
  apart;
- sizes, request counts, request header padding (cookies) and think times are drawn per session from seeded
  distributions that overlap across applications; the server delays each HTTPS response by a seeded log-normal
  time (``server_delay_ms``), and the recipe can shape the veth with a token bucket (``--rate-mbit``, ``tc tbf``:
  queueing between concurrent flows; ``netem`` is absent from this kernel);
- with attacks: a TCP connect ``scan`` and a slow HTTPS login ``bruteforce`` on the same TLS port.

Labels still come from the client address (ground truth by construction).
"""

from __future__ import annotations

import math
import os
import random
import socket
import ssl
import threading
import time
from typing import Callable

from lightning_ext.traffic.capture import APPS as BASIC_APPS
from lightning_ext.traffic.capture import SERVER_IP, SUBNET, udp_play

TLS_PORT = 8444
#: application -> (client address, server port, transport); every TCP application but mail on TLS_PORT
MIXED_APPS = {
    "web": (f"{SUBNET}.31", TLS_PORT, "tcp"),
    "api": (f"{SUBNET}.32", TLS_PORT, "tcp"),
    "download": (f"{SUBNET}.33", TLS_PORT, "tcp"),
    "video": (f"{SUBNET}.34", TLS_PORT, "tcp"),
    "mail": (f"{SUBNET}.35", BASIC_APPS["smtp"][1], "tcp"),
    "voip": (f"{SUBNET}.36", BASIC_APPS["stream"][1], "udp"),
}
MIXED_ATTACKS = {"scan": f"{SUBNET}.41", "bruteforce": f"{SUBNET}.42"}
_MAX_OBJECT = 4_000_000


def log_uniform(rng: random.Random, low: float, high: float) -> int:
    """An integer drawn log-uniformly from ``[low, high]``."""
    return int(math.exp(rng.uniform(math.log(low), math.log(high))))


# ---------------------------------------------------------------------------------------------------- server


def start_https_server(cert: str, key: str, delay_ms: float, seed: int) -> Callable[[], None]:
    """Start the keep-alive HTTPS server on ``TLS_PORT`` (``GET /gen/N``, ``POST /api/N``: N random bytes back after a
    seeded log-normal delay of mean ``delay_ms``); return its shutdown function."""
    import http.server

    rng, lock = random.Random(seed + 7919), threading.Lock()

    class Gen(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # noqa: D102 - silence the access log
            pass

        def _reply(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0) or 0))
            try:
                n = min(int(self.path.rsplit("/", 1)[-1]), _MAX_OBJECT)
            except ValueError:
                n = 0
            if delay_ms > 0:
                with lock:
                    wait = rng.lognormvariate(math.log(delay_ms / 1e3), 0.6)
                time.sleep(min(wait, 1.0))
            body = os.urandom(n)
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(n))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802, D102 - http.server's hook names
            self._reply()

        def do_POST(self):  # noqa: N802, D102
            self._reply()

    httpd = http.server.ThreadingHTTPServer((SERVER_IP, TLS_PORT), Gen)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    httpd.socket = ctx.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd.shutdown


# ---------------------------------------------------------------------------------------------------- clients


def _https(src: str):
    import http.client

    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    return http.client.HTTPSConnection(SERVER_IP, TLS_PORT, timeout=10, context=ctx, source_address=(src, 0))


def _request(conn, rng: random.Random, method: str, size: int, body: bytes = b"") -> None:
    headers = {"Cookie": "s=" + "x" * rng.randint(0, 600), "Accept": "*/*"}
    path = f"/{'gen' if method == 'GET' else 'api'}/{size}"
    conn.request(method, path, body=body or None, headers=headers)
    conn.getresponse().read()


def _lookups(rng: random.Random, src: str, n: int) -> None:
    """``n`` DNS queries from ``src`` to the namespace's DNS server (one UDP flow)."""
    if n <= 0:
        return
    import dpkt

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src, 0))
        s.settimeout(2)
        for _ in range(n):
            name = f"{rng.choice(['www', 'api', 'cdn', 'mail', 'media'])}.{rng.randrange(10**5)}.example.internal"
            q = dpkt.dns.DNS(id=rng.randrange(65536), op=dpkt.dns.DNS_RD,
                             qd=[dpkt.dns.DNS.Q(name=name, type=rng.choice([dpkt.dns.DNS_A, dpkt.dns.DNS_AAAA]))])
            s.sendto(bytes(q), (SERVER_IP, BASIC_APPS["dns"][1]))
            try:
                s.recvfrom(2048)
            except socket.timeout:
                pass
            time.sleep(rng.uniform(0, 0.05))


def _web(rng: random.Random, lookups: bool = True) -> None:
    src = MIXED_APPS["web"][0]
    _lookups(rng, src, rng.randint(1, 3) if lookups else 0)
    for _ in range(rng.randint(1, 3)):
        conn = _https(src)
        for _ in range(rng.randint(1, 6)):
            _request(conn, rng, "GET", log_uniform(rng, 300, 300_000))
            time.sleep(rng.uniform(0, 0.3))
        conn.close()


def _api(rng: random.Random, lookups: bool = True) -> None:
    src = MIXED_APPS["api"][0]
    _lookups(rng, src, rng.randint(0, 2) if lookups else 0)
    for _ in range(rng.randint(1, 2)):
        conn = _https(src)
        for _ in range(rng.randint(1, 12)):
            _request(conn, rng, rng.choice(["POST", "POST", "GET"]), log_uniform(rng, 100, 20_000),
                     os.urandom(log_uniform(rng, 50, 4_000)))
            time.sleep(rng.expovariate(1 / 0.1))
        conn.close()


def _download(rng: random.Random, lookups: bool = True) -> None:
    src = MIXED_APPS["download"][0]
    _lookups(rng, src, rng.randint(1, 2) if lookups else 0)
    conn = _https(src)
    for _ in range(rng.randint(1, 2)):
        _request(conn, rng, "GET", log_uniform(rng, 20_000, 2_000_000))
    conn.close()


def _video(rng: random.Random, lookups: bool = True) -> None:
    src = MIXED_APPS["video"][0]
    _lookups(rng, src, rng.randint(1, 2) if lookups else 0)
    conn = _https(src)
    pace = rng.uniform(0.1, 0.5)
    for _ in range(rng.randint(2, 12)):
        _request(conn, rng, "GET", log_uniform(rng, 10_000, 250_000))
        time.sleep(pace * rng.uniform(0.7, 1.3))
    conn.close()


def _mail(rng: random.Random, lookups: bool = True) -> None:
    import smtplib

    src, port, _ = MIXED_APPS["mail"]
    _lookups(rng, src, rng.randint(1, 3) if lookups else 0)
    with smtplib.SMTP(SERVER_IP, port, timeout=5, source_address=(src, 0)) as smtp:
        for _ in range(rng.randint(1, 3)):
            body = "x" * log_uniform(rng, 50, 60_000)
            smtp.sendmail("a@example.internal", ["b@example.internal"], f"Subject: t\r\n\r\n{body}")
            time.sleep(rng.uniform(0, 0.2))


def _voip(rng: random.Random, lookups: bool = True) -> None:
    src, port, _ = MIXED_APPS["voip"]
    _lookups(rng, src, rng.randint(1, 2) if lookups else 0)
    udp_play(src, port, rng.randint(10, 150), rng.choice([0.01, 0.02, 0.03]), log_uniform(rng, 80, 1000))


def _scan(rng: random.Random, lookups: bool = True) -> None:
    start = rng.randrange(1, 60_000)
    for port in range(start, start + rng.randint(10, 40)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((MIXED_ATTACKS["scan"], 0))
            s.settimeout(0.2)
            s.connect_ex((SERVER_IP, port))
        time.sleep(rng.uniform(0, 0.05))


def _bruteforce(rng: random.Random, lookups: bool = True) -> None:
    """Slow login guessing: a few short HTTPS POSTs per connection, pauses between attempts."""
    src = MIXED_ATTACKS["bruteforce"]
    _lookups(rng, src, rng.randint(0, 1) if lookups else 0)
    for _ in range(rng.randint(1, 4)):
        conn = _https(src)
        for _ in range(rng.randint(1, 3)):
            body = f"user=admin&password={rng.randrange(10**rng.randint(4, 12))}".encode()
            _request(conn, rng, "POST", log_uniform(rng, 100, 400), body)
            time.sleep(rng.uniform(0.1, 0.6))
        conn.close()


MIXED_SESSIONS: dict[str, Callable[[random.Random], None]] = {
    "web": _web, "api": _api, "download": _download, "video": _video, "mail": _mail, "voip": _voip,
    "scan": _scan, "bruteforce": _bruteforce,
}


def mixed_session(kind: str, rng: random.Random, files: list[str]) -> None:
    """Run one session of ``kind`` (the driver's session signature; ``files`` unused: objects are generated)."""
    MIXED_SESSIONS[kind](rng)


# ---------------------------------------------------------------------------------------------------- mid profile

#: ``--profile mid``'s default group of mixed applications that share the TLS port
MID_SHARED = ("web", "api", "video")
_TLS_APPS = ("web", "api", "download", "video")


def check_shared(shared) -> tuple[str, ...]:
    """The mid profile's shared-TLS group, checked: 1 to 4 distinct names of ``web, api, download, video``."""
    shared = tuple(shared)
    bad = [s for s in shared if s not in _TLS_APPS]
    if bad or not 1 <= len(shared) <= 4 or len(set(shared)) != len(shared):
        raise ValueError(f"shared must be 1-4 distinct names of {', '.join(_TLS_APPS)}, got {','.join(shared)!r}.")
    return shared


def mid_apps(shared=MID_SHARED) -> dict[str, tuple]:
    """``--profile mid``: between ``basic`` and ``mixed``. The ``shared`` applications of the mixed profile speak HTTPS
    to the one TLS port (not separable flow by flow); ``mail`` and ``voip`` keep their own protocols, and ``dns`` is
    its own application (the basic profile's resolver client), so **no application makes DNS lookups** (the mixed
    profile's label-ambiguous DNS flows, about 44% of its flows, are gone). Separable and confusable applications
    side by side: a difficulty between the two other profiles, set by the size of ``shared``."""
    shared = check_shared(shared)
    return {**{k: MIXED_APPS[k] for k in shared}, "mail": MIXED_APPS["mail"], "voip": MIXED_APPS["voip"],
            "dns": BASIC_APPS["dns"]}


def mid_session(kind: str, rng: random.Random, files: list[str]) -> None:
    """Run one mid-profile session of ``kind``: a mixed session without DNS lookups, or the basic ``dns`` session."""
    if kind == "dns":
        from lightning_ext.traffic.capture import SESSIONS

        SESSIONS["dns"](rng, files)
    else:
        MIXED_SESSIONS[kind](rng, lookups=False)


__all__ = ["MID_SHARED", "MIXED_APPS", "MIXED_ATTACKS", "TLS_PORT", "check_shared", "log_uniform", "mid_apps",
           "mid_session", "mixed_session", "start_https_server"]
