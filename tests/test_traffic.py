"""The traffic family: pcap parsing and its bad inputs, the representations and their leakage masks, the DataModules'
cache and splits, the selective scan against the Mamba recurrence, the MAE loss, the modules, resume, the capture."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("dpkt")

from lightning_ext.testing import assert_same_parameters, crash_and_resume  # noqa: E402
from lightning_ext.traffic import pcap as P  # noqa: E402
from lightning_ext.traffic.flow_transformer import FlowTransformer  # noqa: E402
from lightning_ext.traffic.flow_transformer_module import FlowTransformerModule  # noqa: E402
from lightning_ext.traffic.flow_windows import FlowWindowDataModule  # noqa: E402
from lightning_ext.traffic.mamba import MambaBlock, selective_scan  # noqa: E402
from lightning_ext.traffic.net_mamba import NetMamba, masked_patch_mse  # noqa: E402
from lightning_ext.traffic.net_mamba_module import NetMambaModule  # noqa: E402
from lightning_ext.traffic.pcap_bursts import PcapBurstDataModule  # noqa: E402

DATA = Path(__file__).parent / "data" / "traffic"
PCAP = DATA / "capture.pcap"
BENIGN = ["http", "tls", "dns", "smtp", "stream"]


def _copy_capture(tmp_path: Path) -> Path:
    for f in DATA.iterdir():
        shutil.copy(f, tmp_path / f.name)
    return tmp_path / "capture.pcap"


# ------------------------------------------------------------------------------------------ parsing and bad input


def test_reads_the_fixture_capture_into_labelled_flows():
    packets = P.read_packets(PCAP)
    flows = P.flows_of(packets)
    assert len(packets) == 529 and 60 <= len(flows) <= 90
    assert all(f.packets == sorted(f.packets, key=lambda p: p.ts) for f in flows)
    tcp = [f for f in flows if f.proto == 6]
    assert all(f.forward[0] for f in tcp)  # the client sent the first packet
    assert any(not all(f.forward) for f in tcp)  # and the server answers in the same flow


def test_truncated_pcap_names_the_file_and_offset(tmp_path):
    data = PCAP.read_bytes()
    bad = tmp_path / "cut.pcap"
    bad.write_bytes(data[:24 + 16 + 10])  # global header, one record header, 10 of its bytes
    with pytest.raises(ValueError, match=r"cut\.pcap is truncated at byte offset 24: the record there declares"):
        P.read_packets(bad)
    bad.write_bytes(data[:24 + 7])
    with pytest.raises(ValueError, match=r"truncated at byte offset 24: a record header needs 16 bytes"):
        P.read_packets(bad)


def test_unsupported_link_type_is_one_line(tmp_path):
    data = bytearray(PCAP.read_bytes())
    data[20:24] = struct.pack("<I", 147)  # DLT_USER0
    bad = tmp_path / "user.pcap"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"user\.pcap has link type 147, which is not supported") as err:
        P.read_packets(bad)
    assert "\n" not in str(err.value)


def test_a_label_without_flows_is_refused(tmp_path):
    dm = PcapBurstDataModule([str(PCAP)], labels=["http", "file"], cache_dir=None)
    with pytest.raises(ValueError, match=r"no flows of label 'file'"):
        dm.setup()


def test_missing_manifest_and_no_pcaps_are_one_line(tmp_path):
    pcap = tmp_path / "x.pcap"
    shutil.copy(PCAP, pcap)
    with pytest.raises(FileNotFoundError, match="has no label manifest x.labels.json"):
        PcapBurstDataModule([str(pcap)], cache_dir=None).setup()
    with pytest.raises(FileNotFoundError, match="no pcap files found"):
        PcapBurstDataModule([str(tmp_path / "none")], cache_dir=None).setup()


# ------------------------------------------------------------------------------------------ representations


def _first_tcp_flow() -> P.Flow:
    return next(f for f in P.flows_of(P.read_packets(PCAP)) if f.proto == 6 and len(f.packets) >= 6)


def test_netfound_tokens_follow_the_field_layout():
    flow = _first_tcp_flow()
    tokens, meta = P.netfound_tokens(flow)
    assert tokens.shape == (12, 1 + 6 * 12) and meta.shape == (12, 4)
    syn = flow.packets[0]
    assert tokens[0, 0] == P.CLS and meta[0, 0] == 1.0
    ip = syn.ip
    expected = [(ip[0] & 15) + 1, ip[1] + 1, struct.unpack("!H", ip[2:4])[0] + 1, (ip[6] >> 5) + 1, ip[8] + 1,
                syn.tcp_flags + 1]
    assert tokens[0, 1:7].tolist() == expected
    assert tokens[0, 9:13].tolist() == [1, 1, 1, 1]  # relative seq and ack of the first packet are 0
    assert meta[:, 2].sum() == min(len(flow.packets), meta[:, 2].sum())
    # ports only when asked, payload tokens only when asked
    with_ports, _ = P.netfound_tokens(flow, include_ports=True, payload_tokens=2)
    assert with_ports.shape[1] == 1 + 6 * 16
    assert with_ports[0, 13:15].tolist() == [syn.sport + 1, syn.dport + 1]


def test_netmamba_bytes_zero_addresses_ports_and_ids():
    flow = _first_tcp_flow()
    masked = P.netmamba_bytes(flow, packets=2, header_bytes=40, payload_bytes=8).reshape(2, 48)
    open_ = P.netmamba_bytes(flow, packets=2, header_bytes=40, payload_bytes=8, mask_ports=False,
                             mask_ids=False).reshape(2, 48)
    assert not masked[:, 12:20].any() and not open_[:, 12:20].any()  # addresses always zeroed
    assert not masked[:, 20:24].any() and open_[0, 20:24].any()  # ports
    assert not masked[:, 4:6].any() and not masked[:, 10:12].any() and open_[:, 10:12].any()  # IP-ID, checksum
    assert (masked[:, 0] == 0x45).all() and (masked[:, 9] == 6).all()  # version/IHL and protocol survive
    raw = flow.packets[0].ip
    assert bytes(open_[0, :40]) == raw[:12] + bytes(8) + raw[20:40]  # otherwise the packet's own header bytes


def test_shortcut_check_finds_a_field_that_names_the_class():
    dm = PcapBurstDataModule([str(PCAP)], labels=BENIGN, cache_dir=None, representation="netmamba_bytes",
                             val_fraction=0.3, test_fraction=0.1)
    dm.setup()
    assert dm.shortcuts["addresses"] >= 0.9  # the client address names the application by construction
    assert set(dm.shortcuts) == {"server_port", "client_port", "addresses"}
    x, y = dm.split_dataset("train")[:]
    assert x.min() >= -1 and x.max() <= 1 and x.shape[1] == 1600


def test_burst_datamodule_caches_atomically_and_rebuilds_a_broken_cache(tmp_path):
    pcap = _copy_capture(tmp_path)
    cache = tmp_path / "cache"
    dm = PcapBurstDataModule([str(pcap)], labels=BENIGN, cache_dir=str(cache))
    dm.setup()
    files = list(cache.glob("*.pt"))
    assert len(files) == 1
    again = PcapBurstDataModule([str(pcap)], labels=BENIGN, cache_dir=str(cache))
    again.setup()
    torch.testing.assert_close(dm.split_dataset("val")[:][0], again.split_dataset("val")[:][0])
    files[0].write_bytes(b"not a torch file")
    third = PcapBurstDataModule([str(pcap)], labels=BENIGN, cache_dir=str(cache))
    third.setup()
    torch.testing.assert_close(dm.split_dataset("test")[:][0], third.split_dataset("test")[:][0])
    assert torch.load(files[0], weights_only=True)["key"]  # rewritten valid


def test_few_shot_keeps_k_training_flows_per_class():
    dm = PcapBurstDataModule([str(PCAP)], labels=["http", "tls", "stream"], labels_per_class=2, cache_dir=None,
                             val_fraction=0.25, test_fraction=0.25)
    dm.setup()
    y = dm.split_dataset("train")[:][-1]
    assert torch.bincount(y).tolist() == [2, 2, 2]


def test_flow_windows_are_consecutive_flows_labelled_by_the_last():
    dm = FlowWindowDataModule([str(PCAP)], benign_labels=BENIGN, window=4, balanced_train=False, cache_dir=None)
    dm.setup()
    ds = dm.split_dataset("train")
    num, cat, y = ds[0]
    assert num.shape == (4, dm.num_numeric) and cat.shape == (4, 5)
    end = int(ds.ends[0])
    assert y == ds.y[end] and torch.equal(num, ds.num[end - 3:end + 1])
    assert ds.num[: int(ds.ends[-1]) + 1].max() <= 1.0 + 1e-6 and ds.num.min() >= 0  # fitted on training rows
    assert dm.class_names == ["benign", "attack"]
    balanced = FlowWindowDataModule([str(PCAP)], benign_labels=BENIGN, window=4, cache_dir=None)
    balanced.setup()
    counts = torch.bincount(torch.stack([balanced.split_dataset("train")[i][2]
                                         for i in range(len(balanced.split_dataset("train")))]))
    assert counts[0] == counts[1]


# ------------------------------------------------------------------------------------------ scan and losses


def _naive_scan(u, delta, A, B, C, D):
    """Mamba's recurrence written per element from the paper's equations (zero-order hold on A, Euler on B)."""
    bsz, length, di = u.shape
    n = A.shape[1]
    y = torch.zeros_like(u)
    for b in range(bsz):
        h = torch.zeros(di, n, dtype=u.dtype)
        for t in range(length):
            for d in range(di):
                for k in range(n):
                    h[d, k] = torch.exp(delta[b, t, d] * A[d, k]) * h[d, k] + delta[b, t, d] * B[b, t, k] * u[b, t, d]
                y[b, t, d] = (h[d] * C[b, t]).sum() + D[d] * u[b, t, d]
    return y


@pytest.mark.parametrize("chunk", [1, 4, 32])
def test_selective_scan_matches_the_recurrence(chunk):
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(2, 11, 3, generator=g), torch.rand(2, 11, 3, generator=g)
    A, D = -torch.rand(3, 4, generator=g) * 2, torch.randn(3, generator=g)
    B, C = torch.randn(2, 11, 4, generator=g), torch.randn(2, 11, 4, generator=g)
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, D, chunk), _naive_scan(u, delta, A, B, C, D),
                               atol=1e-5, rtol=1e-5)


def test_mamba_block_is_causal_and_backpropagates():
    torch.manual_seed(0)
    block = MambaBlock(8, d_state=4, backend="torch", chunk=4)
    x = torch.randn(1, 10, 8, requires_grad=True)
    y = block(x)
    x2 = x.detach().clone()
    x2[:, 6:] += 1.0
    torch.testing.assert_close(block(x2)[:, :6], y[:, :6].detach())
    y[:, 3].sum().backward()
    assert x.grad[:, 4:].abs().max() == 0 and x.grad[:, :4].abs().max() > 0
    if importlib.util.find_spec("mamba_ssm") is None:
        with pytest.raises(ModuleNotFoundError, match="backend='mamba_ssm' needs the CUDA package mamba-ssm"):
            MambaBlock(8, backend="mamba_ssm")


def test_masked_patch_mse_matches_an_independent_implementation():
    g = torch.Generator().manual_seed(1)
    pred, target = torch.randn(3, 10, 4, generator=g), torch.randn(3, 10, 4, generator=g)
    mask = (torch.rand(3, 10, generator=g) > 0.3).float()
    chosen = mask.bool()
    reference = torch.nn.functional.mse_loss(pred[chosen], target[chosen])  # mean over masked tokens and bytes
    torch.testing.assert_close(masked_patch_mse(pred, target, mask), reference)


def test_mae_masks_the_ratio_and_reconstructs_only_masked_tokens():
    net = NetMamba(byte_length=64, stride=4, dim=16, depth=1, num_classes=2, d_state=4, decoder_dim=8,
                   decoder_depth=1)
    x = torch.randn(3, 64)
    loss, pred, mask = net.mae(x, 0.75, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [12.0] * 3
    torch.testing.assert_close(loss, masked_patch_mse(pred, net.patches(x), mask))
    _, _, same = net.mae(x, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(mask, same)


# ------------------------------------------------------------------------------------------ modules


def _tiny_mamba(**kw):
    torch.manual_seed(0)
    base = dict(byte_length=96, dim=16, depth=1, d_state=4, decoder_dim=8, decoder_depth=1, drop_path=0.0,
                backend="torch")
    return NetMambaModule(**{**base, **kw})


def _bytes_dm(**kw):
    return PcapBurstDataModule([str(PCAP)], labels=["http", "tls", "stream"], representation="netmamba_bytes",
                               packets=2, header_bytes=40, payload_bytes=8, cache_dir=None, batch_size=8,
                               val_fraction=0.25, test_fraction=0.25, **kw)


def test_pretrained_encoder_loads_into_the_classifier(tmp_path):
    pre = _tiny_mamba(task="mae")
    torch.save({"state_dict": pre.state_dict()}, tmp_path / "mae.ckpt")
    clf = _tiny_mamba(num_classes=3, pretrained_path=str(tmp_path / "mae.ckpt"), freeze_encoder=True)
    torch.testing.assert_close(clf.net.blocks[0].mixer.A_log, pre.net.blocks[0].mixer.A_log)
    assert [n for n, p in clf.named_parameters() if p.requires_grad] == ["net.head.weight", "net.head.bias"]
    with pytest.raises(ValueError, match="does not fit this network"):
        _tiny_mamba(dim=8, num_classes=3, pretrained_path=str(tmp_path / "mae.ckpt"))
    with pytest.raises(ValueError, match="freeze_encoder=True needs pretrained_path"):
        _tiny_mamba(freeze_encoder=True)


def test_modules_refuse_a_mismatched_datamodule(tmp_path):
    from lightning.pytorch import Trainer

    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"gives 96 bytes per flow but NetMambaModule has byte_length=64"):
        trainer.fit(_tiny_mamba(num_classes=3, byte_length=64), datamodule=_bytes_dm())
    with pytest.raises(ValueError, match=r"has 3 classes but NetMambaModule has num_classes=2"):
        trainer.fit(_tiny_mamba(num_classes=2), datamodule=_bytes_dm())
    dm = FlowWindowDataModule([str(PCAP)], benign_labels=BENIGN, window=4, cache_dir=None)
    with pytest.raises(ValueError, match=r"the datamodule has window=4 but FlowTransformerModule has 8"):
        trainer.fit(FlowTransformerModule(d_model=16), datamodule=dm)


@pytest.mark.parametrize("head", ["last_token", "cls", "gap", "flatten"])
def test_flow_transformer_heads(head):
    torch.manual_seed(0)
    net = FlowTransformer(3, [4, 5], 2, window=6, head=head, d_model=16, encoder="decoder", dropout=0.0).eval()
    num, cat = torch.rand(2, 6, 3), torch.randint(0, 4, (2, 6, 2))
    out = net(num, cat)
    assert out.shape == (2, 2)
    num2 = num.clone()
    num2[:, 0] += 1.0  # the first record changes
    changed = not torch.allclose(net(num2, cat), out)
    assert changed  # every head reads the first record (causal: the last positions see it)


def test_netmamba_mae_resumes_mid_epoch(tmp_path):
    full, resumed, info = crash_and_resume(lambda: _tiny_mamba(task="mae"), _bytes_dm, lambda: [], max_epochs=2,
                                           crash_step=3, tmp_path=tmp_path)
    assert info["resumed_from_step"] == 3
    assert_same_parameters(full, resumed)


def test_flow_transformer_resumes_mid_epoch(tmp_path):
    def dm():
        return FlowWindowDataModule([str(PCAP)], benign_labels=BENIGN, window=4, cache_dir=None, batch_size=8)

    def model():
        torch.manual_seed(0)
        return FlowTransformerModule(window=4, d_model=16, dropout=0.0)

    full, resumed, _ = crash_and_resume(model, dm,
                                        lambda: [], max_epochs=2, crash_step=4, tmp_path=tmp_path)
    assert_same_parameters(full, resumed)


# ------------------------------------------------------------------------------------------ the capture recipe


@pytest.mark.slow
def test_capture_recipe_makes_a_labelled_ethernet_capture(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the capture needs root (network namespaces)")
    missing = [t for t in ("ip", "tcpdump", "openssl") if shutil.which(t) is None]
    if missing:
        pytest.skip(f"the capture needs {missing} (Debian: apt-get install iproute2 tcpdump openssl)")
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    out = subprocess.run([sys.executable, "-m", "lightning_ext.traffic.capture", "--out", str(tmp_path),
                          "--seconds", "4", "--seed", "1", "--attacks"], capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads((tmp_path / "capture.labels.json").read_text())
    packets = P.read_packets(tmp_path / "capture.pcap")
    assert max(len(p.ip) for p in packets) <= 1500  # offloads off: Ethernet-sized frames, no 64 KB super-packets
    seen = {manifest["labels"].get(str(__import__("ipaddress").ip_address(p.src))) for p in packets}
    ran = {k for k, n in manifest["sessions"].items() if n > 0}
    assert len(ran) >= 3 and ran <= seen  # every application that ran a session shows up under its label
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before
    assert np.isfinite(manifest["seconds"])


# ------------------------------------------------------------------------------------------ netFound


def _bursts_dm(**kw):
    return PcapBurstDataModule([str(PCAP)], labels=["http", "tls", "stream"], cache_dir=None, batch_size=8,
                               val_fraction=0.25, test_fraction=0.25, **kw)


def _tiny_netfound(**kw):
    from lightning_ext.traffic.net_found_module import NetFoundModule

    torch.manual_seed(0)
    return NetFoundModule(**{**dict(num_classes=3, hidden=16, layers=1, heads=2, ff_dim=32, dropout=0.0), **kw})


def test_netfound_corruption_swaps_and_masks_only_real_tokens():
    from lightning_ext.traffic.net_found import mask_bursts

    dm = _bursts_dm()
    dm.setup()
    tok, meta, _ = dm.split_dataset("train")[:16]
    out = mask_bursts(tok, meta, 0.3, 0.5, torch.Generator().manual_seed(0))
    assert out["mlm"].any() and out["swapped"].any()
    assert not ((out["targets"] == P.CLS) & out["mlm"]).any() and not ((out["targets"] == P.PAD) & out["mlm"]).any()
    assert (out["tokens"][out["mlm"]] == P.MASK).all() and torch.equal(out["tokens"][~out["mlm"]],
                                                                       out["targets"][~out["mlm"]])
    unswapped = out["swapped"] == 0
    torch.testing.assert_close(out["targets"][unswapped], tok[unswapped])
    share = out["mlm"].sum() / ((tok != P.PAD) & (tok != P.CLS)).sum()
    assert 0.2 < float(share) < 0.4
    assert (out["meta"][out["meta_mask"]] == 0).all()


def test_netfound_losses_match_an_independent_computation():
    from lightning_ext.traffic.net_found import mask_bursts, netfound_losses

    dm = _bursts_dm()
    dm.setup()
    tok, meta, _ = dm.split_dataset("train")[:6]
    net = _tiny_netfound().net.eval()
    batch = mask_bursts(tok, meta, 0.3, 0.5, torch.Generator().manual_seed(1))
    got = netfound_losses(net, batch, metadata_weight=0.4)
    h, _ = net.encode(batch["tokens"], batch["meta"])
    hi = lo = n = 0.0
    for b, i, j in batch["mlm"].nonzero().tolist():  # token by token: value = token - 1 = 256 * hi + lo
        v = int(batch["targets"][b, i, j]) - 1
        hi = hi - torch.log_softmax(net.mlm_hi(h[b, i, j]), -1)[v // 256]
        lo = lo - torch.log_softmax(net.mlm_lo(h[b, i, j]), -1)[v % 256]
        n += 1
    sw, k, mae, m = 0.0, 0, 0.0, 0
    for b in range(tok.shape[0]):
        for i in range(tok.shape[1]):
            if batch["tokens"][b, i, 0] == P.PAD:
                continue
            sw = sw - torch.log_softmax(net.swap_head(h[b, i, 0]), -1)[int(batch["swapped"][b, i])]
            k += 1
            if batch["meta_mask"][b, i]:
                tm = batch["target_meta"][b, i]
                target = torch.cat([tm[:1], torch.log1p(tm[1:].clamp(min=0))])
                mae = mae + (net.meta_head(h[b, i, 0]) - target).abs().mean()
                m += 1
    expected = hi / n + lo / n + sw / k + 0.4 * mae / m
    torch.testing.assert_close(got["loss"], expected, atol=1e-4, rtol=1e-4)


def test_netfound_flat_ablation_and_frozen_fine_tuning(tmp_path):
    pre = _tiny_netfound(task="pretrain")
    torch.save({"state_dict": pre.state_dict()}, tmp_path / "pre.ckpt")
    clf = _tiny_netfound(pretrained_path=str(tmp_path / "pre.ckpt"), freeze_encoder=True)
    torch.testing.assert_close(clf.net.token.weight, pre.net.token.weight)
    assert {n.split(".")[1] for n, p in clf.named_parameters() if p.requires_grad} == {"head", "pool"}
    assert len(_tiny_netfound(flat=True).net.flow_layers) == 0
    with pytest.raises(ValueError, match="does not fit this network"):
        _tiny_netfound(hidden=8, pretrained_path=str(tmp_path / "pre.ckpt"))


def test_netfound_pretraining_resumes_mid_epoch(tmp_path):
    full, resumed, _ = crash_and_resume(lambda: _tiny_netfound(task="pretrain"), _bursts_dm, lambda: [],
                                        max_epochs=2, crash_step=3, tmp_path=tmp_path)
    assert_same_parameters(full, resumed)
