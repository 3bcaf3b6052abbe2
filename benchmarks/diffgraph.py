"""DiffGraph vs LightGCN on MovieLens-100K's target behaviour (rating >= 4) with "rated at all" as the auxiliary one.

Claim (DiffGraph, WSDM 2025; the spec's pass rule): on the target behaviour, DiffGraph's test Recall@20 is at least
1.05x the better LightGCN variant: LightGCN trained on the target behaviour only, and LightGCN trained on the union
of behaviours (the honest baseline: it sees every auxiliary pair too, in one graph).

Protocol (fixed before the runs; the page states it):
- Data: ``MultiBehaviorDataModule`` (recbole's ML-100K): each user's rated pairs split per user at random 80/20
  train/test, validation = 10% of the rest (split_seed 0); target = training pairs rated >= 4, auxiliary = every
  training pair; val/test positives = held-out pairs rated >= 4. Every known training pair of any behaviour is
  masked before ranking, for every model alike. Batch 4,096 triples for every arm (official 2,048 on Retail
  Rocket's 9.5k buys is 5 steps an epoch; 4,096 here is 10 target steps an epoch and halves the CPU cost).
- Metric: full-ranking Recall@20 (selection) and NDCG@20 (the family's ``RankingMetrics``).
- Premise check first: popularity (training target counts) must lose to tuned LightGCN (target) on validation
  Recall@20; otherwise "not testable here".
- Tuning alike: each arm on seed 0 over lr {1e-3, 5e-3} x its L2 regulariser {official, official/10}
  (LightGCN's 1e-4 on layer-0 embeddings, DiffGraph's 3e-2 on final embeddings; Adam without weight decay in both
  official codes, kept). Official defaults are in the grid. Selection on best validation Recall@20; the selected
  configuration then runs seeds 1 and 2 (seed = initialisation, batch order, negatives, diffusion draws). (A first
  pass had cut the regulariser axis to a probe for the CPU budget; the DiffGraph probe beat DiffGraph's selected
  official regulariser, so the full grid was restored for every arm.)
- Early stopping: validation every 2 epochs, stop after 5 evaluations without a new best (not before epoch 40: at
  lr 1e-3 LightGCN sits on a popularity-level plateau for its first ~20 epochs), at most 200 epochs;
  the best validation epoch's weights are tested once. A selected run whose best evaluation is its last makes
  the verdict inconclusive.
- Ablation (reported, not in the verdict): DiffGraph without diffusion (a direct aux -> target MLP, same loss) at
  DiffGraph's selected configuration, 3 seeds.
- Verdict: reproduced if DiffGraph's mean test Recall@20 >= 1.05x the better LightGCN's mean; partly reproduced if
  it beats both by more than the larger seed std but by less than 5%; else not reproduced.
- 1 thread (``torch.set_num_threads(1)``), ``nice -n 10``.

Run::

    nice -n 10 python benchmarks/diffgraph.py          # trains, writes docs/results/diffgraph.{json,md,png}
    python benchmarks/diffgraph.py --render-only
"""

from __future__ import annotations

import copy
import hashlib
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import page_main  # noqa: E402

JSON = REPO / "docs" / "results" / "diffgraph.json"
CACHE = Path("/tmp/diffgraph_bench_cache")  # finished runs keyed by their signature: an interrupted run resumes
warnings.filterwarnings("ignore")

SEEDS = [0, 1, 2]
MAX_EPOCHS, MIN_EPOCHS, EVAL_EVERY, PATIENCE, BATCH, K = 200, 40, 2, 5, 4096, 20
LRS = [1e-3, 5e-3]
REG_FACTORS = [1.0, 0.1]  # the selection grid: lr x {official, official/10} regulariser
#: a first pass cut the regulariser axis to a probe (official/10 at the selected lr) for the CPU budget after it
#: made no difference to LightGCN (target); the DiffGraph probe then beat DiffGraph's selected configuration by 0.03
#: validation Recall@20, so the full grid is back for every arm (finished fits are cached; nothing was discarded)
PROBE_REG_FACTOR = None
ARMS = {  # label: (class, train_on, fixed kwargs, official reg)
    "LightGCN (target)": ("LightGCN", "target", {"num_layers": 3}, 1e-4),
    "LightGCN (union)": ("LightGCN", "union", {"num_layers": 3}, 1e-4),
    "DiffGraph": ("DiffGraphRec", "target", {}, 3e-2),
}
ABLATION = "DiffGraph (no diffusion)"
STOP_AFTER = "15:20"  # UTC: no new run starts after this (the shared machine's deadline); None runs everything
COMMAND = "nice -n 10 python benchmarks/diffgraph.py"
PROTOCOL = {"seeds": SEEDS, "max_epochs": MAX_EPOCHS, "min_epochs": MIN_EPOCHS, "eval_every": EVAL_EVERY, "patience": PATIENCE,
            "batch": BATCH, "lrs": LRS, "reg_factors": REG_FACTORS, "probe_reg_factor": PROBE_REG_FACTOR, "k": K,
            "threads": 1}
#: the cache key's protocol part, as at the first launch (the grid is not part of one run's identity)
_KEY = {"seeds": SEEDS, "max_epochs": MAX_EPOCHS, "min_epochs": MIN_EPOCHS, "eval_every": EVAL_EVERY,
        "patience": PATIENCE, "batch": BATCH, "lrs": [1e-3, 5e-3], "reg_factors": [1.0, 0.1], "k": K, "threads": 1}


def datamodule(train_on: str):
    from lightning_ext.recsys.multi_behavior import MultiBehaviorDataModule

    dm = MultiBehaviorDataModule(train_on=train_on, batch_size=BATCH)
    dm.setup("fit")
    return dm


@torch.no_grad()
def ranking(user_emb, item_emb, loader, scores_fn=None) -> dict:
    from lightning_ext.recsys.metrics import RankingMetrics

    metrics = RankingMetrics((K,))
    for batch in loader:
        scores = scores_fn(batch["users"]) if scores_fn else user_emb[batch["users"]] @ item_emb.T
        metrics.update(scores, batch["target"], batch["exclude"])
    return {k.split("@")[0]: float(v) for k, v in metrics.compute().items()}


def popularity(dm) -> dict:
    d = dm.interactions
    pop = torch.bincount(torch.as_tensor(d.target_train[:, 1]), minlength=d.num_items).float()
    fn = lambda u: pop.expand(len(u), -1).clone()  # noqa: E731
    return {"val": ranking(None, None, dm.val_dataloader(), fn), "test": ranking(None, None, dm.test_dataloader(), fn)}


class Tracker(Callback):
    """Validation Recall@20 every ``EVAL_EVERY`` epochs, early stopping, best-state snapshot, training CPU time."""

    def __init__(self, loader):
        self.loader, self.curve, self.best, self.bad, self.cpu, self.c0 = loader, [], None, 0, 0.0, 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self.c0 = time.process_time()

    def on_train_epoch_end(self, trainer, pl_module):
        self.cpu += time.process_time() - self.c0
        epoch = trainer.current_epoch + 1
        if epoch % EVAL_EVERY and epoch != trainer.max_epochs:
            return
        pl_module.eval()
        m = ranking(*pl_module.propagate(), self.loader)
        pl_module.train()
        self.curve.append({"epoch": epoch, "step": trainer.global_step, "val_recall": m["recall"], "cpu": self.cpu})
        if self.best is None or m["recall"] > self.best["val_recall"]:
            self.best = {"epoch": epoch, "step": trainer.global_step, "val_recall": m["recall"],
                         "val_ndcg": m["ndcg"], "state": copy.deepcopy(pl_module.state_dict())}
            self.bad = 0
        else:
            self.bad += 1
            if self.bad >= PATIENCE and epoch >= MIN_EPOCHS:
                trainer.should_stop = True


def make_model(label: str, lr: float, reg: float, seed: int):
    from lightning_ext.recsys.diffgraph import DiffGraphRec
    from lightning_ext.recsys.lightgcn import LightGCN

    if label == ABLATION:
        return DiffGraphRec(lr=lr, reg_weight=reg, diffusion=False, seed=seed)
    cls_name, _, fixed, _ = ARMS[label]
    if cls_name == "DiffGraphRec":
        return DiffGraphRec(lr=lr, reg_weight=reg, seed=seed, **fixed)
    return LightGCN(lr=lr, reg_weight=reg, **fixed)


def run(label: str, lr: float, reg: float, seed: int, dms: dict) -> dict:
    train_on = "target" if label == ABLATION else ARMS[label][1]
    dm = dms[train_on]
    key = json.dumps([label, lr, reg, seed, _KEY, dm.name])
    path = CACHE / (hashlib.sha1(key.encode()).hexdigest() + ".json")
    if path.exists():
        return json.loads(path.read_text())
    seed_everything(seed, verbose=False)
    dm.shuffle_seed = seed
    model = make_model(label, lr, reg, seed)
    tracker = Tracker(list(dm.val_dataloader()))
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, max_epochs=MAX_EPOCHS, callbacks=[tracker])
    trainer.fit(model, datamodule=dm)
    best, last = tracker.best, tracker.curve[-1]
    model.load_state_dict(best["state"])
    model.eval()
    with torch.no_grad():
        emb = model.propagate()
    out = {"model": label, "lr": lr, "reg": reg, "seed": seed, "best_epoch": best["epoch"], "best_step": best["step"],
           "val_recall": best["val_recall"], "val_ndcg": best["val_ndcg"], "epochs_run": last["epoch"],
           "steps_run": trainer.global_step, "samples_seen": trainer.global_step * BATCH,
           "still_improving": best["epoch"] == last["epoch"], "train_cpu": tracker.cpu, "curve": tracker.curve,
           "test": ranking(*emb, dm.test_dataloader()), "params": sum(p.numel() for p in model.parameters())}
    print(f"  {label:26s} lr {lr:g} reg {reg:g} seed {seed}: val R@20 {best['val_recall']:.4f} "
          f"(ep {best['epoch']}/{last['epoch']}) test R@20 {out['test']['recall']:.4f} cpu {tracker.cpu:.0f}s",
          flush=True)
    from lightning_ext.core.io import atomic_write_json

    CACHE.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, path)
    return out


def main_runs(data: dict) -> None:
    """Arms in the order LightGCN (target), DiffGraph, LightGCN (union), ablation; the JSON is saved after each arm,
    and no new run starts after ``STOP_AFTER`` (UTC, ``HH:MM``; a shared machine's deadline): the page then says
    what is missing."""
    from lightning_ext.core.io import atomic_write_json

    t0, c0 = time.time(), time.process_time()
    dms = {"target": datamodule("target"), "union": datamodule("union")}
    data.update(protocol=dms["target"].name, stats=dms["target"].interactions.stats(),
                union_train=len(dms["union"].interactions.train), popularity=popularity(dms["target"]),
                runs=[], selected={}, skipped=[])
    print("popularity", data["popularity"], flush=True)

    def save():
        data["wall_s"], data["cpu_s"] = time.time() - t0, time.process_time() - c0
        data["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        atomic_write_json(data, JSON, indent=1)

    def go(label, lr, reg, seed):
        if STOP_AFTER and time.strftime("%H:%M", time.gmtime()) >= STOP_AFTER:
            data["skipped"].append({"model": label, "lr": lr, "reg": reg, "seed": seed})
            return None
        return run(label, lr, reg, seed, dms)

    for label in ["LightGCN (target)", "DiffGraph", "LightGCN (union)"]:
        official = ARMS[label][3]
        tuning = [r for r in (go(label, lr, official * f, SEEDS[0]) for lr in LRS for f in REG_FACTORS) if r]
        if len(tuning) < len(LRS) * len(REG_FACTORS):
            data["runs"] += [{**r, "role": "tuning (incomplete grid)"} for r in tuning]
            save()
            continue
        best = max(tuning, key=lambda r: r["val_recall"])
        data["selected"][label] = {"lr": best["lr"], "reg": best["reg"]}
        for r in tuning:
            r["role"] = "tuning+seed" if r is best else "tuning"
        data["runs"] += tuning + [{**r, "role": "seed"} for r in (go(label, best["lr"], best["reg"], s) for s in SEEDS[1:]) if r]
        save()
    sel = data["selected"].get("DiffGraph")
    if sel:
        data["selected"][ABLATION] = dict(sel)
        data["runs"] += [{**r, "role": "seed"} for r in (go(ABLATION, sel["lr"], sel["reg"], s) for s in SEEDS) if r]
        save()
    for label in ARMS if PROBE_REG_FACTOR else []:  # the first pass's regulariser probe (see PROBE_REG_FACTOR)
        if label in data["selected"]:
            lr, official = data["selected"][label]["lr"], ARMS[label][3]
            regs = [official * f for f in (1.0, PROBE_REG_FACTOR)] if label == "LightGCN (target)" else \
                [official * PROBE_REG_FACTOR]
            lrs = LRS if label == "LightGCN (target)" else [lr]
            for x in lrs:
                for reg in regs:
                    if reg == official and x in LRS:
                        continue
                    r = go(label, x, reg, SEEDS[0])
                    if r:
                        data["runs"].append({**r, "role": "probe"})
    save()


def seeds_of(data: dict, label: str) -> list:
    sel = data.get("selected", {}).get(label)
    if not sel:
        return []
    return [r for r in data["runs"] if r["model"] == label and r["lr"] == sel["lr"] and r["reg"] == sel["reg"]]


def ms(values, digits: int = 4) -> str:
    values = list(values)
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def verdict(data: dict) -> tuple[str, str]:
    dg = seeds_of(data, "DiffGraph")
    bases = {b: seeds_of(data, b) for b in ("LightGCN (target)", "LightGCN (union)")}
    if len(dg) < 3 or any(len(v) < 3 for v in bases.values()):
        return "inconclusive", "fewer than 3 seeds finished for an arm"
    pop = data["popularity"]["val"]["recall"]
    if statistics.mean(r["val_recall"] for r in bases["LightGCN (target)"]) <= pop:
        return "not testable here", f"tuned LightGCN (target) does not beat popularity on validation ({pop:.4f})"
    improving = [r for r in dg + sum(bases.values(), []) if r["still_improving"]]
    if improving:
        return "inconclusive", f"{len(improving)} selected run(s) best at their last evaluation (budget)"
    mean = {b: statistics.mean(r["test"]["recall"] for r in v) for b, v in bases.items()}
    better = max(mean, key=mean.get)
    d = statistics.mean(r["test"]["recall"] for r in dg)
    band = max(statistics.stdev(r["test"]["recall"] for r in v) for v in [dg, *bases.values()])
    ratio = d / mean[better]
    why = f"DiffGraph {d:.4f} = {ratio:.3f}x the better LightGCN ({better}, {mean[better]:.4f})"
    if ratio >= 1.05:
        return "reproduced", why + " >= 1.05x"
    if all(d - m > band for m in mean.values()):
        return "partly reproduced", why + f": above both by more than the larger seed std {band:.4f}, below 1.05x"
    return "not reproduced", why + f" (larger seed std {band:.4f}); the 1.05x rule fails"


def plot(data: dict, res, path) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    labels = [*ARMS, ABLATION]
    fig, axes = new_figure(1, 2, figsize=(12, 4.5))
    for label in labels:
        runs = [r for r in seeds_of(data, label) if r["seed"] == 0]
        if runs:
            c = runs[0]["curve"]
            axes[0].plot([p["step"] for p in c], [p["val_recall"] for p in c], marker="o", ms=3, label=label)
    if "popularity" in data:
        axes[0].axhline(data["popularity"]["val"]["recall"], color="grey", ls="--", label="popularity")
    axes[0].set_xlabel("optimizer steps (seed 0, selected configuration)")
    axes[0].set_ylabel("validation Recall@20")
    axes[0].legend(fontsize=8)
    shown = [m for m in labels if seeds_of(data, m)]
    for j, key in enumerate(["recall", "ndcg"]):
        vals = [[r["test"][key] for r in seeds_of(data, m)] for m in shown]
        xs = [i + 0.38 * j for i in range(len(shown))]
        axes[1].bar(xs, [statistics.mean(v) for v in vals], 0.38,
                    yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], capsize=3, label=f"{key}@20")
    axes[1].set_xticks([i + 0.19 for i in range(len(shown))], shown, fontsize=7)
    axes[1].set_ylabel("test (mean ± std over seeds)")
    axes[1].legend(fontsize=8)
    save_figure(fig, path)


def render(data: dict):
    v, why = verdict(data) if data.get("runs") else ("inconclusive", "no runs yet")
    rows = []
    for label in [*ARMS, ABLATION]:
        runs = seeds_of(data, label)
        if not runs:
            continue
        s = data["selected"][label]
        rows.append(
            f"| {label} | {s['lr']:g} | {s['reg']:g} | {len(runs)} | {ms(r['val_recall'] for r in runs)} | "
            f"**{ms(r['test']['recall'] for r in runs)}** | {ms(r['test']['ndcg'] for r in runs)} | "
            f"{ms((r['best_epoch'] for r in runs), 1)} / {ms((r['epochs_run'] for r in runs), 1)} | "
            f"{sum(r['still_improving'] for r in runs)} | {ms((r['steps_run'] for r in runs), 0)} | "
            f"{ms((r['samples_seen'] / 1e6 for r in runs), 2)} | {ms((r['train_cpu'] for r in runs), 0)} | "
            f"{runs[0]['params']:,} |")
    tune = [f"| {r['model']} | {r['lr']:g} | {r['reg']:g} | {r['val_recall']:.4f} | {r['best_epoch']}/{r['epochs_run']} "
            f"| {'yes' if r['still_improving'] else 'no'} | {r['role']} |"
            for r in data.get("runs", []) if r.get("role", "").startswith(("tuning", "probe"))]
    pop = data.get("popularity", {})
    stats = data.get("stats", {})
    notes = []
    for r in data.get("runs", []):
        sel = data.get("selected", {}).get(r["model"])
        if r.get("role") == "probe" and sel:
            base = [x for x in data["runs"] if x["model"] == r["model"] and x["seed"] == 0 and x["lr"] == sel["lr"]
                    and x["reg"] == sel["reg"]]
            if base:
                better = r["val_recall"] > base[0]["val_recall"]
                notes.append(f"{r['model']} lr {r['lr']:g} reg {r['reg']:g}: validation Recall@20 {r['val_recall']:.4f} vs "
                             f"{base[0]['val_recall']:.4f} selected ({'the probe is better' if better else 'not better'})")
    dg, ab = seeds_of(data, "DiffGraph"), seeds_of(data, ABLATION)
    ablation_note = ""
    if dg and ab:
        gap = statistics.mean(r["test"]["recall"] for r in dg) - statistics.mean(r["test"]["recall"] for r in ab)
        sd = max(statistics.stdev(r["test"]["recall"] for r in x) if len(x) > 1 else 0.0 for x in (dg, ab))
        ablation_note = (f"Here DiffGraph minus its ablation is {gap:+.4f} test Recall@20 "
                         f"({'within' if abs(gap) <= sd else 'beyond'} the larger seed std {sd:.4f}). The ablation "
                         "also changes the alignment loss's weight: 1 for every node (t = 0) instead of 1 for the "
                         "~0.5% of nodes drawn at t = 0 and ~0.045 for the rest, so a gap may come from that "
                         "weighting as much as from the noise.")
    reading = ""
    lt, lu = seeds_of(data, "LightGCN (target)"), seeds_of(data, "LightGCN (union)")
    if dg and lt and lu:
        m = {k: statistics.mean(r["test"]["recall"] for r in v) for k, v in (("dg", dg), ("lt", lt), ("lu", lu))}
        reading = (f"- Reading: DiffGraph is {m['dg'] - m['lu']:+.4f} test Recall@20 over LightGCN on the union and "
                   f"{m['dg'] - m['lt']:+.4f} over LightGCN on the target only; LightGCN on the union is "
                   f"{m['lu'] - m['lt']:+.4f} against the target-only graph (the extra, lower-rated pairs in one graph "
                   "hurt). DiffGraph keeps the behaviours in separate graphs and reaches its best validation in about "
                   "half the steps, but its margin over the target-only baseline is within seed noise, and its "
                   "official regulariser (3e-2) was 0.03 validation Recall@20 worse than 3e-3 here.")
    probed = {r["model"] for r in data.get("runs", []) if r.get("role") == "probe"}
    unprobed = [m for m in ARMS if m in data.get("selected", {}) and m not in probed]
    probe_note = ("  Probe results: " + "; ".join(notes) + "." if notes else "  No probe finished.") + (
        f" Not probed (deadline): {', '.join(unprobed)}." if unprobed else "")
    skipped = data.get("skipped", [])
    missing = ("\n**Missing (the run stopped starting new fits at " + f"{STOP_AFTER} UTC, the shared machine's deadline):** "
               + "; ".join(f"{r['model']} lr {r['lr']:g} reg {r['reg']:g} seed {r['seed']}" for r in skipped) + ".\n"
               ) if skipped else ""
    page = f"""# DiffGraph vs LightGCN on MovieLens-100K's target behaviour

**Verdict: {v}** ({why}).
{missing}
Claim (DiffGraph, Li et al., WSDM 2025, arXiv 2501.02313; the spec's pass rule): with auxiliary behaviours,
DiffGraph's Recall@20 on the target behaviour is at least 1.05x that of the better of LightGCN on the target
behaviour only and LightGCN on the union of behaviours. The paper reports Retail Rocket (Recall@20 0.0620 vs
0.0524 for its best baseline); that split ships without a licence, so the behaviours here are derived from
MovieLens-100K's ratings: **auxiliary = rated at all, target = rated >= 4**.

Command: `{COMMAND}` (`--render-only` re-renders from `diffgraph.json`). 1 thread (`torch.set_num_threads(1)`),
`nice -n 10`, on a CPU shared with other jobs (this process got 10-20% of a core). Training CPU summed over all
{len(data.get('runs', []))} fits: {sum(r['train_cpu'] for r in data.get('runs', [])) / 60:.1f} min (evaluation
excluded); the last invocation took {data.get('wall_s', 0) / 60:.1f} min wall and {data.get('cpu_s', 0) / 60:.1f} min
CPU (finished runs are cached under `/tmp/diffgraph_bench_cache` and reused; finished {data.get('finished', 'n/a')}).

## Protocol

- Data: `{data.get('protocol', '')}`. {stats.get('train', 0):,} target training pairs,
  {data.get('union_train', 0):,} union (= auxiliary) training pairs, {stats.get('val', 0):,} validation and
  {stats.get('test', 0):,} test positives; {stats.get('users', 0)} users x {stats.get('items', 0)} items. Every
  training pair of any behaviour is masked before ranking, for every model alike (a held-out pair is never a
  training pair, so the mask hides no positive).
- Models: `DiffGraphRec` (official `params.py` defaults: d 64, 2 weightless GCN layers, T = 200, noise
  1e-4 x [1e-4, 1e-3], denoiser [64], time embedding 8, dropout 0.5, Xavier init), `LightGCN` (3 layers,
  LightGCN-PyTorch defaults, N(0, 0.1) init), batch {BATCH} for all, Adam.
- Tuning alike, on validation Recall@20 of seed 0: lr {LRS} x regulariser {{official, official/10}} (LightGCN
  1e-4 -> {{1e-4, 1e-5}}, DiffGraph 3e-2 -> {{3e-2, 3e-3}}); then seeds 1 and 2 at the selected configuration.
  A first pass (`diffgraph_first_pass.json`) had cut the regulariser axis to a probe after it made no difference to
  LightGCN (target); DiffGraph's probe (3e-3) beat its official 3e-2 by 0.03 validation Recall@20, so the full
  grid was restored for every arm before any verdict (finished fits are cached and reused).
- Early stopping: validation every {EVAL_EVERY} epochs, patience {PATIENCE} evaluations (no stop before epoch
  {MIN_EPOCHS}: at lr 1e-3 LightGCN sits on a popularity-level plateau for its first ~20 epochs), at most
  {MAX_EPOCHS} epochs; the best validation epoch is tested once.
- Premise check: popularity (training target counts) scores validation Recall@20
  {pop.get('val', {}).get('recall', float('nan')):.4f} (test {pop.get('test', {}).get('recall', float('nan')):.4f},
  NDCG@20 {pop.get('test', {}).get('ndcg', float('nan')):.4f}); tuned LightGCN (target) must beat it.

## Results (selected configuration per arm; mean ± std over seeds)

| arm | lr | reg | seeds | val Recall@20 | test Recall@20 | test NDCG@20 | best / last epoch | best at last eval | steps | samples (M) | train CPU s | params |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

The ablation (DiffGraph without diffusion: noise-free input, t = 0, one denoiser call) runs at DiffGraph's selected
configuration and is not part of the verdict.

![validation curves and test metrics](diffgraph.png)

## Tuning and probe runs (seed 0)

| arm | lr | reg | val Recall@20 | best / last epoch | best at last eval | role |
|---|---|---|---|---|---|---|
{chr(10).join(tune)}

## What this does and does not show

- Derived behaviours are not Retail Rocket's views/carts/buys: "rated at all" is a superset of the target, and
  its extra pairs are the lower ratings, so the auxiliary signal here is what a user watched but did not like.
- The official schedule's betas are ~1e-8 (β_0 = 1e-4), so DiffGraph's diffusion is nearly a deterministic
  aux -> target map (noise std ~0.01 per coordinate at every step; the reverse chain's coefficient on the
  denoiser is ~4.5e-6 until t = 0, where the output is f(x_1, 0)); the no-diffusion row measures what the noise
  and the step weighting add. {ablation_note}
- The official code selects its epoch on the test split; here selection is on validation only.
{reading}
"""
    return page, None, v


if __name__ == "__main__":
    page_main(JSON, "diffgraph", PROTOCOL, COMMAND, main_runs, render, plot)
