"""Render docs/results/flow_transformer.md and docs/results/net_mamba.md (+ PNGs) from docs/results/traffic.json.

Verdict rules (fixed before the runs; see each page): a claim whose compared runs had their best validation epoch at
their last epoch is inconclusive; a failed premise makes it "not testable here".
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mean_std, verdict_of  # noqa: E402

from lightning_ext.core.io import atomic_write_text  # noqa: E402
from lightning_ext.core.plotting import new_figure, save_figure  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
CMD = ("`nice -n 10 .venv/bin/python benchmarks/traffic.py --capture /tmp/lx_cap/day0 --part all` (first run), then "
       "`--part rerun` (8-way FlowTransformer, 5-packet port check) and `--part pretrain5`, each resuming from "
       "traffic.json; `--render-only` re-renders the pages")
CAPTURE_CMD = "sudo .venv/bin/python -m lightning_ext.traffic.capture --out /tmp/lx_cap/day0 --seconds 120 --seed 0 --attacks"


def _vals(runs: dict, key: str = "test_f1") -> list[float]:
    return [float(r["test"][key]) for r in runs.values()]


def _row(name: str, runs: dict) -> str:
    last = sum(not r["converged"] for r in runs.values())
    return (f"| {name} | {len(runs)} | {mean_std([r['best_val'] for r in runs.values()], 3)} | "
            f"**{mean_std(_vals(runs), 3)}** | {mean_std(_vals(runs, 'test_balanced_acc'), 3)} | "
            f"{mean_std([r['best_epoch'] + 1 for r in runs.values()], 1)} / {mean_std([r['epochs'] for r in runs.values()], 1)} | "
            f"{last} | {int(statistics.mean(r['steps'] for r in runs.values()))} | "
            f"{int(statistics.mean(r['samples'] for r in runs.values()))} | "
            f"{statistics.mean(r['wall_s'] for r in runs.values()):.0f} |")


HEADER = ("| arm | seeds | val macro-F1 (best epoch) | test macro-F1 | test balanced acc | best / last epoch | "
          "runs with best = last | steps | samples seen | wall s per run |\n|---|---|---|---|---|---|---|---|---|---|")


def _compare(a: dict, b: dict, margin: float, name: str, tolerance_text: str):
    if any(not r["converged"] for r in [*a.values(), *b.values()]):
        return (name, None, "inconclusive: a compared run's best validation epoch was its last")
    ma, mb = statistics.mean(_vals(a)), statistics.mean(_vals(b))
    return (name, ma >= mb + margin, f"{ma:.3f} vs {mb:.3f} ({tolerance_text})")


def _capture_text(data: dict) -> str:
    cap = data.get("meta", {}).get("capture", {})
    sessions = cap.get("sessions", {})
    return (f"one {cap.get('seconds', '?')} s capture made by the recipe (`{CAPTURE_CMD}`): client and server in two "
            f"network namespaces joined by a veth pair, offloads off ({cap.get('offloads', ['?'])[0]}), sessions "
            f"{sessions}; ssh {cap.get('ssh', '?')}; no netem here, so all flows see ~0 RTT (timing features are weak)")


def _mixed_capture_text(cap: dict) -> str:
    return (f"one {cap.get('seconds', '?')} s capture of the recipe's mixed profile (`sudo .venv/bin/python -m "
            f"lightning_ext.traffic.capture --out /tmp/lx_cap/mixed0 --seconds {cap.get('seconds', 0):g} --seed "
            f"{cap.get('seed')} --attacks --profile mixed --rate-mbit 20 --server-delay-ms "
            f"{cap.get('server_delay_ms', 0):g} --workers {cap.get('workers')}`): web, api, download and video over TLS "
            "to one server port, mail (SMTP) and voip (RTP-like UDP), every session starting with DNS lookups from the "
            "application's own address (so DNS flows of every label look alike), overlapping seeded sizes, counts, "
            f"cookies and think times, a seeded log-normal server delay, {cap.get('shaping')}; attacks: a TCP connect "
            f"scan and a slow HTTPS login brute force on the same TLS port; sessions {cap.get('sessions', {})}")


def _flow_section(flow: dict, task: str) -> tuple[list, str]:
    runs = flow.get("runs", {})
    arms = ("last_token_w8", "gap_w8", "last_token_w1")
    if not all(k in runs and len(runs[k]) == 3 for k in arms):
        return ([(f"{task}: last token vs GAP", None, "inconclusive: not every arm and seed finished")],
                f"### {task}\n\nNot every arm and seed finished in the time available; rerun the command below.\n")
    lt8, gap8, lt1 = runs["last_token_w8"], runs["gap_w8"], runs["last_token_w1"]
    probe = flow.get("probe", {})
    best = max(statistics.mean(_vals(r)) for r in (lt8, gap8, lt1))
    learnable = max(statistics.mean(_vals(lt1)), probe.get("no_ports", 0.0)) >= 0.5
    room = best <= 0.98
    claims = [_compare(lt8, gap8, 0.05, f"{task}: last token beats global average pooling by >= 0.05 macro-F1",
                       "margin 0.05"),
              _compare(lt8, lt1, -0.01, f"{task}: window 8 >= window 1", "tolerance 0.01")]
    if not (learnable and room):
        why = ("every arm is at the ceiling (best mean test F1 %.3f > 0.98): no head or window can differ" % best
               if not room else "not learnable from the last flow (F1 < 0.5)")
        claims = [(n, None, f"not testable: {why}") for n, _, _ in claims]
    window_probe = (f"; on the last 8 records concatenated {probe['window8_no_ports']:.3f}"
                    if "window8_no_ports" in probe else "")
    text = (f"### {task}\n\nPremise check: learnable from the labelled (last) flow (window-1 test F1 "
            f"{mean_std(_vals(lt1), 3)}; logistic-regression probe on the last record {probe.get('no_ports', float('nan')):.3f}, "
            f"with ports {probe.get('with_ports', float('nan')):.3f}{window_probe}; needs >= 0.5) and room for a difference (best arm "
            f"<= 0.98 F1): {'holds' if learnable and room else 'fails'}.\n\n{HEADER}\n"
            + "\n".join(_row(k, runs[k]) for k in arms) + "\n")
    return claims, text


def _claim_lines(claims) -> str:
    return "\n".join(f"- {n}: **{'holds' if c else ('fails' if c is False else 'undecided')}** ({why})"
                     for n, c, why in claims)


def render_flow(data: dict) -> str:
    multi_claims, multi = _flow_section(data.get("flow_multiclass", {}), "8-way: 6 applications + scan + flood")
    bin_claims, binary = _flow_section(data.get("flow", {}), "binary: benign vs attack (the paper's NIDS task)")
    claims = multi_claims + bin_claims
    body = _claim_lines(claims) + "\n\n" + multi + "\n" + binary
    mixed = data.get("mixed", {})
    if mixed.get("flow_multiclass"):
        cap = mixed.get("meta", {}).get("capture", {})
        m_claims, m_multi = _flow_section(mixed["flow_multiclass"], "mixed capture, 8-way: 6 applications + scan + "
                                          "brute force")
        b_claims, m_bin = _flow_section(mixed.get("flow", {}), "mixed capture, binary: benign vs attack")
        done = sum(len(r) for r in mixed.get("flow", {}).get("runs", {}).values())
        if done < 9:
            b_claims, m_bin = [], (f"### mixed capture, binary: benign vs attack\n\n{done} of 9 runs finished in the "
                                   "time the shared CPU left (`--part flow8` ran the 8-way task first); not judged.\n")
        judged = m_claims + b_claims
        body = (f"Judged on the mixed capture (the first, basic capture was at the ceiling for every arm; its "
                f"section is kept below).\n\n{_claim_lines(judged)}\n\n## Mixed capture (judged)\n\nData: "
                f"{_mixed_capture_text(cap)}; same flow records, split, model and training as below. Runtime of this "
                f"part {sum(mixed.get('meta', {}).get(k, 0) for k in ('flow_wall_s', 'flow8_wall_s')) / 60:.1f} min wall (`benchmarks/traffic.py "
                f"--capture /tmp/lx_cap/mixed0 --part {mixed.get('meta', {}).get('command', 'flow').split()[-1]}`).\n\n{m_multi}\n{m_bin}\n"
                f"## Basic capture (first run): not testable here\n\n{body}")
        claims = judged
    verdict = verdict_of(claims)
    return f"""# FlowTransformer: classification head and window size on a real capture

Rendered by `benchmarks/traffic_pages.py` from `traffic.json`. Claims (FlowTransformer, arXiv 2304.14746): the
classification head matters most and global average pooling "performs very poorly"; context (window 8) helps
(spec `domains.md` 2c: LastToken F1 >= GAP F1 + 0.05; window 8 >= window 1).

## Verdict: **{verdict}**

{body}
**Rule:** mean test macro-F1 over seeds 0-2; a claim holds at the stated margin (margins fixed before the runs); a
run whose best validation epoch is its last makes its claim inconclusive; a task at the ceiling (best arm > 0.98) or
not learnable from the last flow (< 0.5) is not testable. The binary task ran first and sat at the ceiling (scan and
flood flows are trivially separable, as the spec expected), so the ceiling premise and the 8-way labels of the last
flow were added after those runs (the binary rows are kept below).

## Set-up

- Data: {_capture_text(data)}. Flows (dpkt, bidirectional 5-tuple) in start-time order; NetFlow-like records
  (15 numeric fields, 5 categorical; ports left out), FlowTransformer's log min-max and top-32 level
  pre-processing fitted on training rows; split by time 60/20/20; tasks: benign (http, tls, dns, smtp, file,
  stream) vs attack (TCP connect scan, connection flood), and the 8 labels themselves; windows of 8 (or 1) consecutive flows labelled by the last;
  training windows resampled to balanced classes (official 50/50), evaluation unbalanced (macro-F1).
- Model: `FlowTransformerModule` record_embed encoding, 2 pre-norm encoder layers, d_model 64, 2 heads, FFN 128,
  MLP [128], dropout 0.1; AdamW lr 1e-3 (the official Adam default; a one-point grid, the same for every arm,
  because of the shared 2-core CPU), batch 128, early stopping on validation macro-F1 (patience 4, at most 20
  epochs), best epoch's weights tested. One torch thread, niced; the machine was shared by ~12 processes.
- Command: {CMD} (parts: `--part flow`); runtime of this part {data.get('meta', {}).get('flow_wall_s', 0) / 60:.1f} min wall.

![test F1 per arm](flow_transformer.png)
"""


def _ports_section(ports: dict, title: str):
    pr = ports.get("runs", {})
    name = f"port check ({title.split(',')[0]}): with ports masked NetMamba stays within 0.05 macro-F1 of unmasked"
    if not all(k in pr and len(pr[k]) == 3 for k in ("ports_masked", "ports_unmasked")):
        return (name, None, "inconclusive: not every seed finished"), f"### Port check, {title}\n\nNot finished.\n"
    sc, probe = ports.get("shortcuts_ports_unmasked", {}), ports.get("probe", {})
    shortcut = max(sc.get("server_port", 0.0), probe.get("sizes_and_ports", 0.0)) >= 0.9
    control = statistics.mean(_vals(pr["ports_unmasked"])) >= 0.8
    claim = _compare(pr["ports_masked"], pr["ports_unmasked"], -0.05, name, "tolerance 0.05")
    if not shortcut:
        claim = (name, None, "not testable: the ports do not name the class here")
    elif not control:
        claim = (name, None, "not testable: positive control failed: with the ports in its input NetMamba reaches "
                 f"{statistics.mean(_vals(pr['ports_unmasked'])):.3f} test F1 while a logistic regression on the port "
                 f"reaches {probe.get('sizes_and_ports', float('nan')):.3f}, so it did not learn to read a shortcut "
                 "that is there, and masking it cannot show anything")
    text = (f"### Port check, {title}\n\nPremise (the ports are a shortcut): the server port alone predicts the "
            f"application with {sc.get('server_port', float('nan')):.3f} validation accuracy; logistic regression on "
            f"packet sizes {probe.get('sizes_only', float('nan')):.3f}, sizes + port "
            f"{probe.get('sizes_and_ports', float('nan')):.3f} test macro-F1: {'holds' if shortcut else 'fails'}. "
            f"Positive control (unmasked NetMamba >= 0.8 test F1, i.e. it can read a shortcut that is present; added "
            f"after the first run): {'holds' if control else 'fails'}.\n\n{HEADER}\n"
            + "\n".join(_row(k, pr[k]) for k in ("ports_masked", "ports_unmasked")) + "\n")
    if probe.get("sizes_only", 0.0) >= 0.95:
        text += ("\nCaveat: the first packets' sizes alone also name the application on this capture (probe "
                 f"{probe['sizes_only']:.3f}), so the check shows NetMamba does not need the ports, not that it avoids "
                 "every shortcut.\n")
    return claim, text


def _pretrain_section(pre: dict, title: str, handshake_only: bool):
    rr = pre.get("runs", {})
    name = f"MAE-pretrained beats scratch by >= 0.05 macro-F1 at 10 labels per class ({title.split(',')[0]})"
    if not ("mae" in pre and all(k in rr and len(rr[k]) == 3 for k in ("pretrained", "scratch"))):
        return (name, None, "inconclusive: not every run finished"), f"### Pretraining, {title}\n\nNot finished.\n"
    mae = pre["mae"]
    drop = 1 - min(mae["history"]) / mae["val_loss_at_init"]
    premise = drop >= 0.1
    c = _compare(rr["pretrained"], rr["scratch"], 0.05, name, "margin 0.05")
    claim = c if premise else (name, None, "not testable: MAE pretraining did not lower its loss 10%")
    caveat = ("Caveat: the first 3 packets of a TCP flow are its handshake (no payload), so with ports masked these "
              "bytes carry little beyond the transport protocol and TCP options; both arms are capped by that.\n\n"
              if handshake_only else "")
    text = (f"### MAE pretraining vs scratch at 10 labels per class, {title}\n\n{caveat}"
            f"Premise (pretraining learned something): validation MAE loss {mae['val_loss_at_init']:.4f} at "
            f"initialisation -> {min(mae['history']):.4f} (-{drop:.0%}) after {mae['epochs']} epochs "
            f"({mae['steps']} steps, {mae['samples']} flows seen, best epoch {mae['best_epoch'] + 1}, "
            f"{mae['wall_s'] / 60:.1f} min): {'holds' if premise else 'fails'}.\n\n{HEADER}\n"
            + "\n".join(_row(k, rr[k]) for k in ("pretrained", "scratch")) + "\n"
            f"\nScale: MAE pretraining ran {mae['steps']} steps (NetMamba's scripts: 150,000) and each few-shot run about "
            f"{int(statistics.mean(r['steps'] for r in rr['pretrained'].values()))} optimizer steps (60 labelled flows, "
            "batch 32) before early stopping; with 40 flows per class and up to 30 epochs the same network reaches "
            "0.99 (port check above), so the few-shot arms are limited by their labels and steps, alike.\n")
    return claim, text


def render_mamba(data: dict) -> str:
    speed = data.get("speed", {})
    claims, parts = [], []
    judged = "ports5" if "ports5" in data else "ports"
    for key, title in (("ports5", "5 packets x (40 + 24) bytes, 1 Mamba block, up to 30 epochs"),
                       ("ports", "3 packets x (40 + 24) bytes, 2 Mamba blocks, up to 12 epochs (first run)")):
        claim, text = _ports_section(data.get(key, {}), title)
        if key == judged:
            claims.append(claim)
        parts.append(text)
    judged = "pretrain5" if "pretrain5" in data else "pretrain"
    for key, title in (("pretrain5", "5 packets x (40 + 24) bytes, 1 Mamba block"),
                       ("pretrain", "3 packets x (40 + 24) bytes, 2 Mamba blocks (first run)")):
        claim, text = _pretrain_section(data.get(key, {}), title, key == "pretrain")
        if key == judged:
            claims.append(claim)
        parts.append(text)
    verdict = verdict_of(claims)
    lines = "\n".join(f"- {n}: **{'holds' if c else ('fails' if c is False else 'undecided')}** ({why})"
                      for n, c, why in claims)
    speed_rows = "\n".join(
        f"| {t} | {v['batch']} | {v['params_mamba']:,} | {v['params_transformer']:,} | {v['mamba_s'] * 1e3:.1f} | "
        f"{v['transformer_s'] * 1e3:.1f} | {v['ratio_transformer_over_mamba']:.2f} |" for t, v in speed.items())
    details = "\n\n".join(parts)
    return f"""# NetMamba: port-masking shortcut check, MAE pretraining at 10 labels per class, CPU speed

Rendered by `benchmarks/traffic_pages.py` from `traffic.json`. Claims (NetMamba, arXiv 2405.11449): pretraining
helps few-shot classification; the shortcut check of spec `domains.md` 2b: the model does not read the label from
the ports (which the official pipeline leaves in the bytes). The 60x inference speed-up rests on the CUDA
selective-scan kernel and is **not testable here** (CPU only); the CPU ratio is reported, not judged.

## Verdict: **{verdict}**

{lines}

**Rule:** mean test macro-F1 over seeds 0-2; masked within 0.05 of unmasked; pretrained >= scratch + 0.05 (margins
fixed before the runs); a run whose best validation epoch is its last makes its claim inconclusive. The first runs
used 3 packets, which for TCP flows are the handshake only; the port check's positive control and the 5-packet runs
were added after them, and the 5-packet runs are the judged ones (the first runs are kept below).

{details}

## CPU inference: Mamba encoder (PyTorch scan) vs a transformer encoder of about the same size

One torch thread, batch 32, median of 5 timed forward passes after one warm-up, both measured in the same process
(2 layers, width 64; Mamba d_state 16, expand 2; transformer 4 heads, FFN 120). Ratio > 1: Mamba faster.

| tokens | batch | Mamba params | transformer params | Mamba ms | transformer ms | transformer / Mamba |
|---|---|---|---|---|---|---|
{speed_rows}

## Set-up

- Data: {_capture_text(data)}. Application flows only (http, tls, dns, smtp, file, stream); split by flow start
  time 60/20/20; NetMamba bytes of the first 3 packets x (40 header + 24 payload) = 192 bytes (NetMamba uses
  5 x (80 + 240); cut for the CPU; the later runs use 5 packets), addresses always zeroed, IP-ID and checksums zeroed, ports zeroed unless
  "unmasked"; training flows capped at 40 per class (NetMamba caps per class too) for the port check, 10 per class
  (seeded) for the few-shot runs.
- Model: `NetMambaModule` dim 32, 2 Mamba blocks (d_state 8, expand 2, PyTorch scan), stride 4 (48 tokens + CLS
  last), label smoothing 0.1, AdamW lr 2e-3 (NetMamba's fine-tune base lr), weight decay 0.05, batch 32, early
  stopping on validation macro-F1 (port check: patience 3, at most 12 epochs; few-shot: patience 6, at most 25), no
  tuning grid for any arm (the comparisons are data ablations of one model; CPU budget). MAE: mask ratio 0.9,
  decoder dim 16 x 1 block, lr 1e-3, 8 epochs on every training flow without labels (pretraining seed 0; the
  fine-tuning seeds vary the 10 labelled flows and the head's initialisation). One torch thread, niced, on a 2-core
  machine shared by ~12 processes.
- Command: {CMD}; wall-clock runtimes (min): {', '.join(f"{k[:-7]} {v / 60:.1f}" for k, v in
  data.get('meta', {}).items() if k.endswith('_wall_s') and k != 'flow_wall_s')}.

![test F1 per arm](net_mamba.png)
"""


def _plot(groups: dict, path: Path, title: str) -> None:
    fig, ax = new_figure(figsize=(max(6.0, 0.75 * len(groups)), 3.4))
    names = [k for k, v in groups.items() if v]
    for i, k in enumerate(names):
        vals = _vals(groups[k])
        ax.scatter([i] * len(vals), vals, color="tab:blue")
        ax.errorbar([i], [statistics.mean(vals)], yerr=[statistics.stdev(vals) if len(vals) > 1 else 0], fmt="_",
                    color="black", capsize=6, markersize=20)
    ax.set_xticks(range(len(names)), names, rotation=25 if len(names) > 8 else 10, fontsize=7 if len(names) > 8 else None)
    ax.set_ylabel("test macro-F1")
    ax.set_title(title)
    save_figure(fig, path)


def render_all(data: dict) -> None:
    """Write both pages and plots."""
    atomic_write_text(render_flow(data), OUT / "flow_transformer.md")
    mixed = data.get("mixed", {})
    _plot({**{f"{k} (mixed 8-way)": v for k, v in mixed.get("flow_multiclass", {}).get("runs", {}).items()},
           **{f"{k} (mixed binary)": v for k, v in mixed.get("flow", {}).get("runs", {}).items()},
           **{f"{k} (8-way)": v for k, v in data.get("flow_multiclass", {}).get("runs", {}).items()},
           **{f"{k} (binary)": v for k, v in data.get("flow", {}).get("runs", {}).items()}},
          OUT / "flow_transformer.png", "FlowTransformer (seeds 0-2)")
    atomic_write_text(render_mamba(data), OUT / "net_mamba.md")
    _plot({**{f"{k} (5 pkts)": v for k, v in data.get("ports5", {}).get("runs", {}).items()},
           **{f"{k} (3 pkts)": v for k, v in data.get("ports", {}).get("runs", {}).items()},
           **{f"{k} 10/cls (5)": v for k, v in data.get("pretrain5", {}).get("runs", {}).items()},
           **{f"{k} 10/cls (3)": v for k, v in data.get("pretrain", {}).get("runs", {}).items()}},
          OUT / "net_mamba.png", "NetMamba (seeds 0-2)")
    print("pages written")
