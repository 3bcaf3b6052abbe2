"""The capture recipe's options (issue 28): the mixed profile, token-bucket shaping, server delay and workers."""

from __future__ import annotations

import ipaddress
import json
import os
import random
import shutil
import subprocess
import sys

import pytest

from lightning_ext.traffic import capture as C

pytest.importorskip("dpkt")


def test_profiles_give_every_label_its_own_client_address():
    for profile in ("basic", "mixed", "mid"):
        apps, attacks = C.profile_addresses(profile)
        addresses = [a[0] for a in apps.values()] + list(attacks.values())
        assert len(set(addresses)) == len(addresses)  # labels come from the client address: they must not collide
        assert all(ipaddress.ip_address(a) in ipaddress.ip_network(f"{C.SUBNET}.0/24") for a in addresses)
    mixed, _ = C.profile_addresses("mixed")
    from lightning_ext.traffic.capture_mixed import TLS_PORT

    # four applications share one TLS port: the port cannot name them
    assert sum(port == TLS_PORT for _, port, _ in mixed.values()) == 4
    with pytest.raises(ValueError, match="profile must be"):
        C.capture(__import__("pathlib").Path("/nonexistent"), 1.0, profile="fancy")


def test_log_uniform_stays_in_range_and_spreads_over_decades():
    from lightning_ext.traffic.capture_mixed import log_uniform

    rng = random.Random(0)
    draws = [log_uniform(rng, 100, 1_000_000) for _ in range(2000)]
    assert min(draws) >= 100 and max(draws) <= 1_000_000
    per_decade = [sum(10**k <= d < 10 ** (k + 1) for d in draws) for k in range(2, 6)]
    assert min(per_decade) > 350  # about 500 per decade, not piled at one end


def test_mid_profile_puts_only_the_shared_applications_on_the_tls_port():
    from lightning_ext.traffic.capture_mixed import TLS_PORT, mid_apps

    for shared in (("web", "video"), ("web", "api", "video"), ("web", "api", "download", "video")):
        apps, _ = C.profile_addresses("mid", shared)
        assert {k for k, (_, port, _) in apps.items() if port == TLS_PORT} == set(shared)
        assert set(apps) == set(shared) | {"mail", "voip", "dns"}  # the separable three stay
        assert apps["dns"] == C.APPS["dns"]  # dns is its own application, not lookups of the others
    assert mid_apps() == C.profile_addresses("mid")[0]
    for bad in (("web", "mail"), ("web", "web"), ()):
        with pytest.raises(ValueError, match="shared must be"):
            mid_apps(bad)
    with pytest.raises(ValueError, match="profile='mid' only"):
        C.capture(__import__("pathlib").Path("/nonexistent"), 1.0, profile="mixed", shared=("web",))


def test_mid_sessions_make_no_dns_lookups(monkeypatch):
    from lightning_ext.traffic import capture_mixed as M

    calls = []
    monkeypatch.setattr(M, "_lookups", lambda rng, src, n: calls.append(n))
    monkeypatch.setattr(M, "udp_play", lambda *a: None)
    M._voip(random.Random(0), lookups=False)
    M._voip(random.Random(0))
    assert calls[0] == 0 and calls[1] >= 1  # the mixed profile's session looks up, the mid profile's does not


@pytest.mark.parametrize("args, message", [(["--rate-mbit", "0"], "--rate-mbit"),
                                           (["--shared", "web"], "--profile mid only"),
                                           (["--profile", "mid", "--shared", "web,ftp"], "shared must be"),
                                           (["--server-delay-ms", "nan"], "--server-delay-ms"),
                                           (["--workers", "0"], "--workers"),
                                           (["--profile", "odd"], "invalid choice")])
def test_bad_capture_options_are_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as err:
        C.main(["--out", "/tmp/unused", *args])
    assert err.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_mixed_profile_capture_shares_the_tls_port_and_labels_dns_by_application(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the capture needs root (network namespaces)")
    missing = [t for t in ("ip", "tcpdump", "openssl", "tc") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"the capture needs {missing} (Debian: apt-get install iproute2 tcpdump openssl)")
    from lightning_ext.traffic.capture_mixed import TLS_PORT
    from lightning_ext.traffic.flows import labelled_flows

    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out = subprocess.run([sys.executable, "-m", "lightning_ext.traffic.capture", "--out", str(tmp_path), "--seconds",
                          "8", "--seed", "1", "--profile", "mixed", "--rate-mbit", "50", "--server-delay-ms", "5",
                          "--workers", "4"], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads((tmp_path / "capture.labels.json").read_text())
    assert manifest["profile"] == "mixed" and "tbf" in manifest["shaping"]
    flows, names, _ = labelled_flows([tmp_path / "capture.pcap"], "manifest", 60.0, 1, None, "test")
    tls = {n for f, n in zip(flows, names) if f.proto == 6 and f.sport == TLS_PORT}
    dns = {n for f, n in zip(flows, names) if f.proto == 17 and f.sport == 5353}
    assert len(tls) >= 2 and tls <= {"web", "api", "download", "video", "bruteforce"}
    assert len(dns) >= 2  # DNS lookups come from several applications' addresses, labelled by application
    assert sum(manifest["errors"].values()) == 0, manifest.get("last_error")
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before
