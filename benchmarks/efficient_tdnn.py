"""EfficientTDNN on real voices: weight-shared sub-networks of a TDNN supernet against the same sub-networks trained
from scratch, across MACs budgets (speaker verification EER on unseen hedgewars voice packs).

Claims under test (Wang et al., EfficientTDNN, arXiv 2103.13581, "the supernet generalises to sub-networks"; spec
domains.md 3b, its smallest CPU experiment scaled down), fixed before the runs:
- (a) weight sharing is nearly free: at each from-scratch budget, the weight-shared sub-network's test EER is within
  3 points of the same architecture trained alone for as many steps (mean over 3 seeds; one claim per budget);
- (b) bigger is better inside the supernet: Spearman correlation between MACs and test EER over the 5 weight-shared
  sub-networks (largest, three uniform shrinks, smallest) <= -0.7 (mean over seeds);
- (c) the spec's level check: the largest weight-shared network's test EER <= 20%.
Rules: premise first: every from-scratch sub-network must verify clearly better than chance (mean test EER <= 40%,
chance 50%), otherwise (a) is "not testable here"; a claim any of whose arms has its best validation check at its
last check is "inconclusive"; all decided claims hold = reproduced, some = partly reproduced, none = not reproduced.

Protocol. Data: ``SpeakerDataModule(files=[HEDGEWARS], speaker_from="parent_dir")``, the 15 voice packs of Debian
``hedgewars-data`` (839 clips, mostly 0.5-2 s, the same ~60 phrases per pack; a pack is taken as a speaker, though
some packs may share a voice actor), resampled to 16 kHz mono; per seed a different speaker split (``split_seed`` =
seed): 9 training packs, 3 validation packs, 3 test packs, disjoint. Training: random 0.8 s crops (a seeded pool); evaluation: one centred 1.2 s crop per clip; clips shorter than a crop
are wrap-padded (repeated, as the reference's loader does); trials = every pair of a split's clips (cosine
scoring). A first launch with silence padding and no TTS voices (1,600 steps) was stopped at step 900 of seed 0's
supernet with validation EER still 44-45% for every sub-network (chance 50%): the padding length tells clip
duration, not voice. A second launch (wrap padding, plus 16 synthetic espeak-ng voices as extra training speakers,
the spec's optional TTS scale-up) was stopped at step 500 with validation EER 47-49% for every sub-network, worse
than a largest-network probe without the TTS voices (42% at step 400): formant-synthesised voices did not help
here, so this run uses the 9 real training packs only. Supernet
(reference layout scaled down): 40 log-mel bands, trunk 64 channels, 3 SE-Res2 blocks of width 64 (Res2 scale 8),
kernel 5, catconv 192, attention 32, embedding 64; space depth {1,2,3}, widths ratios 0.25-1.0, kernels {1,3,5}.
AAM-softmax (margin 0.2, scale 30), AdamW lr 1e-3, batch 32 (reference defaults, untuned, the same for every arm).
Supernet: the ``SubnetSampling`` callback, rule "random" (one uniformly drawn sub-network per step, the spec's
protocol). From scratch: the same module with the sub-network fixed as ``net.active`` (only its slice trains). Both:
the same number of steps; every ``val_every`` steps each tracked sub-network is evaluated on the validation packs
after BatchNorm recalibration (``BNRecalibration.recalibrated``: its own statistics on 4 seeded training batches,
the training statistics put back afterwards), and each keeps its own best-validation weights, which are then
scored on the test packs (recalibrated the same way). One torch thread, niced, one process.

Run: ``python benchmarks/efficient_tdnn.py --seeds 0 1 2`` (resumes from the JSON; ``--render-only``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, Trainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mean_std, verdict_of  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "docs" / "results"
JSON = OUT / "efficient_tdnn.json"
P = {"data": {"speaker_from": "parent_dir", "val_speakers": 3, "test_speakers": 3, "sample_rate": 16000,
              "crop_s": 0.8, "eval_crop_s": 1.2, "num_train_crops": 6400, "batch_size": 32, "pad_mode": "wrap"},
     "net": {"sample_rate": 16000, "n_mels": 40, "channels": 64, "widths": 64, "num_blocks": 3, "kernel_size": 5,
             "catconv_channels": 192, "embed_dim": 64, "attention_dim": 32},
     "steps": 1200, "val_every": 100, "lr": 1e-3, "recal_batches": 4, "rule": "random",
     "ratios": [0.75, 0.5, 0.35], "scratch": [0.75, 0.35], "frames": 101, "premise_eer": 40.0, "within": 3.0,
     "spearman": -0.7, "largest_eer": 20.0}


def _configs(net) -> dict:
    out = {"largest": net.largest_config()}
    out.update({f"uniform x{r}": net.uniform_config(r) for r in P["ratios"]})
    out["smallest"] = net.smallest_config()
    return out


class Track(Callback):
    """Every ``val_every`` steps: validation EER of each tracked sub-network (BatchNorm recalibrated), best weights
    kept per sub-network."""

    def __init__(self, configs: dict, recal, val_set) -> None:
        self.configs, self.recal, self.val_set = configs, recal, val_set
        self.history = {k: [] for k in configs}
        self.best = {k: (float("inf"), None) for k in configs}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % P["val_every"]:
            return
        for name, config in self.configs.items():
            eer, _ = evaluate(trainer, pl_module, self.recal, config, self.val_set)
            self.history[name].append((step, eer))
            if eer < self.best[name][0]:
                self.best[name] = (eer, {k: v.detach().clone() for k, v in pl_module.state_dict().items()})
        print(f"  step {step} " + " ".join(f"{k} {h[-1][1]:.1f}" for k, h in self.history.items()), flush=True)


@torch.no_grad()
def evaluate(trainer, module, recal, config, eval_set) -> tuple[float, float]:
    """EER (%) and minDCF(0.01) of ``config`` on ``eval_set`` after BatchNorm recalibration."""
    from lightning_ext.audio.speaker_verification import cosine_trials, equal_error_rate, min_dcf

    wav, labels = eval_set
    with recal.recalibrated(trainer, module, config):
        module.eval()
        emb = torch.cat([module(wav[i:i + 64]) for i in range(0, len(wav), 64)])
        module.train()
    scores, targets = cosine_trials(emb, labels)
    return 100.0 * equal_error_rate(scores, targets), min_dcf(scores, targets)


def _eval_set(dm, split):
    ds = dm.split_dataset(split)
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items])


def fit(dm, seed, configs, val_set, test_set, sampling, fixed=None) -> dict:
    """Train one module for ``P["steps"]`` steps; per tracked sub-network its best-validation weights' test EER."""
    from lightning_ext.audio.bn_recalibration import BNRecalibration
    from lightning_ext.audio.speaker_verification import SpeakerVerificationModule
    from lightning_ext.audio.subnet_sampling import SubnetSampling

    torch.manual_seed(seed)
    module = SpeakerVerificationModule(num_classes=dm.num_classes, **P["net"], lr=P["lr"], subnet_sampling="none")
    module.net.active = fixed
    recal = BNRecalibration(num_batches=P["recal_batches"], seed=10_000 + seed)
    track = Track(configs, recal, val_set)
    callbacks = [track] + ([SubnetSampling(rule=P["rule"], seed=seed)] if sampling else [])
    trainer = Trainer(max_steps=P["steps"], accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, callbacks=callbacks)
    start, cpu = time.time(), time.process_time()
    trainer.fit(module, datamodule=dm)
    wall, cpu_s = time.time() - start, time.process_time() - cpu
    arms = {}
    for name, config in configs.items():
        best_eer, state = track.best[name]
        module.load_state_dict(state)
        eer, dcf = evaluate(trainer, module, recal, config, test_set)
        h = track.history[name]
        best_at = min(range(len(h)), key=lambda i: h[i][1])
        arms[name] = {"config": config, "macs": module.net.macs(config, P["frames"]), "val_eer": best_eer,
                      "test_eer": eer, "test_mindcf": dcf, "history": h, "best_step": h[best_at][0],
                      "best_is_last": best_at == len(h) - 1}
        print(f"  {name}: test EER {eer:.2f} (best val {best_eer:.2f} at step {h[best_at][0]})", flush=True)
    return {"arms": arms, "steps": int(trainer.global_step), "samples": int(trainer.global_step) * P["data"][
        "batch_size"], "wall_s": wall, "cpu_s": cpu_s}


def run_seed(seed) -> dict:
    from lightning_ext.audio.speakers import HEDGEWARS, SpeakerDataModule

    torch.set_num_threads(1)
    dm = SpeakerDataModule(files=[HEDGEWARS], **P["data"], split_seed=seed, seed=seed, shuffle_seed=seed)
    dm.setup()
    val_set, test_set = _eval_set(dm, "val"), _eval_set(dm, "test")
    out = {"speakers": dm.speakers, "utterances": {k: len(v) for k, v in dm.files.items()}}
    from lightning_ext.audio.efficient_tdnn import EfficientTDNN

    probe = EfficientTDNN(**{k: v for k, v in P["net"].items() if k != "sample_rate"})
    configs = _configs(probe)
    print(f"seed {seed}: supernet ({dm.speakers})", flush=True)
    out["supernet"] = fit(dm, seed, configs, val_set, test_set, sampling=True)
    out["scratch"] = {}
    for r in P["scratch"]:
        name = f"uniform x{r}"
        print(f"seed {seed}: {name} from scratch", flush=True)
        out["scratch"][name] = fit(dm, seed, {name: configs[name]}, val_set, test_set, sampling=False,
                                   fixed=configs[name])
    return out


def _spearman(x, y) -> float:
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    return float(np.corrcoef(rx, ry)[0, 1])


def claims(data):
    seeds = data.get("seeds", {})
    if not seeds:
        return [], {}
    few = len(seeds) < 3
    ws = {a: [s["supernet"]["arms"][a]["test_eer"] for s in seeds.values()] for a in
          next(iter(seeds.values()))["supernet"]["arms"]}
    out = []
    for name in [f"uniform x{r}" for r in P["scratch"]]:
        sc = [s["scratch"][name]["arms"][name]["test_eer"] for s in seeds.values()]
        last = any(s["scratch"][name]["arms"][name]["best_is_last"] or s["supernet"]["arms"][name]["best_is_last"]
                   for s in seeds.values())
        d = statistics.mean(ws[name]) - statistics.mean(sc)
        if statistics.mean(sc) > P["premise_eer"]:
            out.append((f"a {name}", None, f"not testable here: from scratch test EER {statistics.mean(sc):.1f}% > "
                                           f"{P['premise_eer']:.0f}% (premise fails)"))
        elif last or few:
            out.append((f"a {name}", None, "inconclusive: " + ("an arm's best validation check was its last" if last
                                                                else "fewer than 3 seeds") + f" (ws - scratch = {d:+.2f})"))
        else:
            out.append((f"a {name}", d <= P["within"], f"weight-shared - scratch = {d:+.2f} EER points "
                                                        f"({statistics.mean(ws[name]):.2f} vs {statistics.mean(sc):.2f})"))
    last_ws = any(a["best_is_last"] for s in seeds.values() for a in s["supernet"]["arms"].values())
    rho = statistics.mean(_spearman([a["macs"] for a in s["supernet"]["arms"].values()],
                                    [a["test_eer"] for a in s["supernet"]["arms"].values()]) for s in seeds.values())
    undecided = "inconclusive: " + ("a weight-shared sub-network's best validation check was its last" if last_ws
                                    else "fewer than 3 seeds")
    out.append(("b", None if (last_ws or few) else rho <= P["spearman"],
                (undecided + f" (rho = {rho:+.2f})") if (last_ws or few) else f"mean Spearman(MACs, EER) = {rho:+.2f}"))
    lg = statistics.mean(ws["largest"])
    last_lg = any(s["supernet"]["arms"]["largest"]["best_is_last"] for s in seeds.values())
    out.append(("c", None if (last_lg or few) else lg <= P["largest_eer"],
                ("inconclusive: largest best at its last check" if last_lg else "inconclusive: fewer than 3 seeds")
                if (last_lg or few) else f"largest weight-shared test EER {lg:.2f}%"))
    return out, ws


def render(data):
    seeds = data.get("seeds", {})
    cl, ws = claims(data)
    verdict = verdict_of(cl) if cl else "inconclusive"
    lines = ["# EfficientTDNN: weight-shared vs from-scratch sub-networks on real voice packs", "",
             f"**Verdict: {verdict}.**", "", __doc__.split("Run:")[0].strip(), "", "## Command", "",
             *[f"    {c}" for c in data.get("meta", {}).get("commands", [])], "",
             f"Seeds run: {sorted(seeds)}. Machine: {data.get('meta', {}).get('machine', '?')}.", ""]
    missing = [k for k in ("0", "1", "2") if k not in seeds]
    if missing:
        lines += [f"Status: seed(s) {', '.join(missing)} did not finish ({data.get('meta', {}).get('status', '')}); "
                  "the command above resumes from the JSON and runs only the missing seeds.", ""]
    if seeds:
        lines += ["## Test results (unseen packs; mean ± std over seeds)", "",
                  "| sub-network | MACs (1 s) | weight-shared test EER % | from scratch test EER % | weight-shared "
                  "minDCF(0.01) | weight-shared val EER % |", "|---|---|---|---|---|---|"]
        for name in ws:
            rows = [s["supernet"]["arms"][name] for s in seeds.values()]
            sc = [s["scratch"][name]["arms"][name] for s in seeds.values() if name in s["scratch"]]
            lines.append(f"| {name} | {rows[0]['macs'] / 1e6:.2f} M | {mean_std([r['test_eer'] for r in rows])} | "
                         f"{mean_std([r['test_eer'] for r in sc]) if sc else '-'} | "
                         f"{mean_std([r['test_mindcf'] for r in rows], 3)} | {mean_std([r['val_eer'] for r in rows])} |")
        lines += ["", "## Claims", ""] + [f"- ({n}) {'holds' if h else 'fails' if h is False else 'undecided'}: {w}"
                                          for n, h, w in cl]
        lines += ["", "## Runs", "", "| seed | test packs | run | steps | samples | best val step per sub-network "
                  "(of {0}) | wall s | cpu s |".format(P["steps"]), "|---|---|---|---|---|---|---|---|"]
        for k, s in sorted(seeds.items()):
            runs = [("supernet", s["supernet"])] + [(f"scratch {n}", r) for n, r in s["scratch"].items()]
            for label, r in runs:
                best = ", ".join(f"{n} {a['best_step']}" for n, a in r["arms"].items())
                lines.append(f"| {k} | {', '.join(s['speakers']['test'])} | {label} | {r['steps']} | {r['samples']} | "
                             f"{best} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} |")
    lines += ["", "![EER vs MACs and validation curves](efficient_tdnn.png)", "",
              "Caveats: a hedgewars pack is a game voice (acted, sometimes processed: `Robot`), 39-67 short clips of the "
              "same phrases; three test packs per seed give few speakers, so the seed spread mixes initialisation "
              "with which packs are held out. The paper's numbers are on VoxCeleb (EER 2.20% at 204 M MACs); this "
              "is a small-scale check of the weight-sharing claim, not of those levels. An earlier run on synthetic "
              "pseudo-speakers (one voice warped) tested search and weight sharing and was inconclusive: "
              "its results are kept in [efficient_tdnn_pseudo_speakers.json](efficient_tdnn_pseudo_speakers.json) "
              "(`python benchmarks/efficient_tdnn_pseudo_speakers.py --render-only` renders that page).", ""]
    return "\n".join(lines), verdict


def plot(data, path):
    from lightning_ext.core.plotting import new_figure, save_figure

    seeds = data.get("seeds", {})
    fig, (ax1, ax2) = new_figure(1, 2, figsize=(11, 4))
    for k, s in sorted(seeds.items()):
        arms = s["supernet"]["arms"]
        ax1.plot([a["macs"] / 1e6 for a in arms.values()], [a["test_eer"] for a in arms.values()], "o-",
                 label=f"seed {k} weight-shared")
        sc = [r["arms"][n] for n, r in s["scratch"].items()]
        ax1.scatter([a["macs"] / 1e6 for a in sc], [a["test_eer"] for a in sc], marker="x", s=60,
                    label=f"seed {k} from scratch")
        for n, a in arms.items():
            if n in ("largest", "smallest") or n in s["scratch"]:
                h = a["history"]
                ax2.plot([x[0] for x in h], [x[1] for x in h], "-", label=f"s{k} ws {n}")
        for n, r in s["scratch"].items():
            h = r["arms"][n]["history"]
            ax2.plot([x[0] for x in h], [x[1] for x in h], "--", label=f"s{k} scratch {n}")
    ax1.set_xlabel("MACs per 1 s (M)")
    ax1.set_ylabel("test EER (%)")
    ax1.legend(fontsize=6)
    ax2.set_xlabel("step")
    ax2.set_ylabel("validation EER (%)")
    ax2.legend(fontsize=5, ncol=2)
    save_figure(fig, path)


def main():
    from lightning_ext.core.io import atomic_write_json, atomic_write_text

    global JSON, OUT
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--smoke", action="store_true", help="a few steps, written under /tmp (checks the script runs)")
    args = ap.parse_args()
    if args.smoke:
        OUT = Path("/tmp/efficient_tdnn_smoke")
        OUT.mkdir(exist_ok=True)
        JSON = OUT / "efficient_tdnn.json"
        P.update(steps=4, val_every=2, recal_batches=1)
    torch.set_num_threads(1)
    data = json.loads(JSON.read_text()) if JSON.exists() else {}
    command = "python benchmarks/efficient_tdnn.py --seeds " + " ".join(map(str, args.seeds))
    data.setdefault("meta", {"commands": []})
    data["meta"].update(protocol=P, machine=f"{platform.machine()}, torch {torch.__version__}, 1 thread")
    if not args.render_only:
        if command not in data["meta"]["commands"]:
            data["meta"]["commands"].append(command)
        for seed in args.seeds:
            if str(seed) in data.get("seeds", {}):
                continue
            data.setdefault("seeds", {})[str(seed)] = run_seed(seed)
            atomic_write_json(data, JSON, indent=1)
    page, verdict = render(data)
    plot(data, OUT / "efficient_tdnn.png")
    atomic_write_text(page, OUT / "efficient_tdnn.md")
    print("verdict:", verdict)


if __name__ == "__main__":
    main()
