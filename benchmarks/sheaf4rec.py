"""Sheaf4Rec vs LightGCN and MF-BPR on MovieLens-100K (the v1 claim: higher F1@10), earned verdict.

Protocol (fixed before the runs; the page states it):
- Data: recbole's ML-100K through ``MovieLens100KDataModule(min_rating=3, test_fraction=0.1)`` (Sheaf4Rec's
  positives: rating >= 3) with validation = 1/9 of each user's remaining items, i.e. 80/10/10 per user.
  Scaled down / changed from the official protocol: a per-user random split instead of a global random split
  of interactions (the existing DataModule), batch 4,096 instead of 1,024, at most ``MAX_EPOCHS`` epochs.
- Metric: F1@10 = 2 P̄ R̄ / (P̄ + R̄) from the mean precision and mean recall over users (the official
  definition), seen items masked with -inf; the official multiplicative mask (seen items score 0) is also
  reported on test. Model selection (configuration and epoch) on validation F1@10 only; test once.
- Premise check: every tuned model must beat the item-popularity ranking on validation F1@10.
- Tuning: each model's lr on seed 0 over {1e-3 (official for all three), 5e-3, 1e-2}; regulariser at each model's
  official value (Sheaf4Rec 1, LightGCN / MF 1e-4). Sheaf4Rec's "mean" readout (v1) runs at the lr chosen for
  "concat". 3 seeds (seed = init, shuffling and negatives; the split is fixed).
- Verdict: reproduced if Sheaf4Rec (concat) mean test F1@10 exceeds tuned LightGCN's by more than the larger
  seed std; not reproduced if it is lower by more than that; otherwise inconclusive. A selected run whose best
  validation epoch is its last makes the verdict inconclusive (budget).
- 1 thread (``torch.set_num_threads(1)``), ``nice -n 10``.

Run::

    nice -n 10 python benchmarks/sheaf4rec.py          # trains, writes docs/results/sheaf4rec.{json,md,png}
    python benchmarks/sheaf4rec.py --render-only
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"
JSON = OUT / "sheaf4rec.json"
warnings.filterwarnings("ignore")

SEEDS = [0, 1, 2]
MAX_EPOCHS, EVAL_EVERY, PATIENCE, BATCH = 40, 2, 4, 4096
# per-model epoch budgets: MF-BPR and LightGCN epochs cost ~10x less than Sheaf4Rec's, so they get a larger budget
# (a first pass at 50 epochs and batch 2,048 left LightGCN best at its last evaluation)
BUDGET = {"MF-BPR": 150, "LightGCN": 150, "Sheaf4Rec (concat)": MAX_EPOCHS, "Sheaf4Rec (mean)": MAX_EPOCHS}
LRS = [1e-3, 5e-3, 1e-2]
K = 10
MODELS = {  # label: (class name, fixed kwargs)
    "MF-BPR": ("MFBPR", {"reg_weight": 1e-4}),
    "LightGCN": ("LightGCN", {"num_layers": 3, "reg_weight": 1e-4}),
    "Sheaf4Rec (concat)": ("Sheaf4Rec", {"num_layers": 5, "readout": "concat", "reg_weight": 1.0}),
    "Sheaf4Rec (mean)": ("Sheaf4Rec", {"num_layers": 5, "readout": "mean", "reg_weight": 1.0}),
}
COMMAND = "nice -n 10 python benchmarks/sheaf4rec.py"


def datamodule():
    from lightning_ext.recsys.movielens100k import MovieLens100KDataModule

    dm = MovieLens100KDataModule(min_rating=3, test_fraction=0.1, val_fraction=1 / 9, batch_size=BATCH)
    dm.setup("fit")
    return dm


@torch.no_grad()
def f1_at_k(users_emb, items_emb, loader, k=K, multiplicative=False, scores_fn=None):
    """Mean-P/mean-R F1@k, precision, recall, NDCG@k over the users of ``loader``."""
    p_sum = r_sum = n_sum = 0.0
    n = 0
    for batch in loader:
        scores = scores_fn(batch["users"]) if scores_fn else users_emb[batch["users"]] @ items_emb.T
        ex = batch["exclude"]
        if multiplicative:
            scores[ex[0], ex[1]] = 0.0  # the official code: scores * (1 - seen)
        else:
            scores[ex[0], ex[1]] = float("-inf")
        truth = torch.zeros_like(scores, dtype=torch.bool)
        truth[batch["target"][0], batch["target"][1]] = True
        top = scores.topk(k, dim=1).indices
        hits = truth.gather(1, top).float()
        n_true = truth.sum(1).float()
        valid = n_true > 0
        disc = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float32))
        idcg = torch.cumsum(disc, 0)[(n_true.clamp(max=k) - 1).clamp(min=0).long()]
        p_sum += float((hits.sum(1) / k)[valid].sum())
        r_sum += float((hits.sum(1) / n_true.clamp(min=1))[valid].sum())
        n_sum += float(((hits * disc).sum(1) / idcg)[valid].sum())
        n += int(valid.sum())
    p, r = p_sum / n, r_sum / n
    return {"f1": 2 * p * r / (p + r) if p + r else 0.0, "precision": p, "recall": r, "ndcg": n_sum / n}


def popularity_val_f1(dm):
    d = dm.interactions
    pop = torch.bincount(torch.as_tensor(d.train[:, 1]), minlength=d.num_items).float()
    return f1_at_k(None, None, list(dm.val_dataloader()),
                   scores_fn=lambda u: pop.expand(len(u), -1).clone())["f1"]


class Tracker(Callback):
    """Validation F1@10 every ``EVAL_EVERY`` epochs, early stop after ``PATIENCE`` evaluations without a new best,
    best-state snapshot, training CPU time."""

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
        with torch.no_grad():
            m = f1_at_k(*pl_module.propagate(), self.loader)
        pl_module.train()
        self.curve.append({"epoch": epoch, "step": trainer.global_step, "val_f1": m["f1"], "cpu": self.cpu})
        if self.best is None or m["f1"] > self.best["val_f1"]:
            self.best = {"epoch": epoch, "step": trainer.global_step, "val_f1": m["f1"],
                         "state": copy.deepcopy(pl_module.state_dict())}
            self.bad = 0
        else:
            self.bad += 1
            if self.bad >= PATIENCE:
                trainer.should_stop = True


CACHE = Path("/tmp/sheaf4rec_cache")  # finished runs, keyed by their full signature: an interrupted run resumes


def run(label, lr, seed, dm, budget=None):
    """One fit (or its cached result); ``budget`` epochs, default ``BUDGET[label]`` (the LastFM page sets its own)."""
    import hashlib

    budget = budget or BUDGET[label]
    key = json.dumps([label, MODELS[label], lr, seed, BATCH, budget, EVAL_EVERY, PATIENCE, dm.name])
    path = CACHE / (hashlib.sha1(key.encode()).hexdigest() + ".json")
    if path.exists():
        return json.loads(path.read_text())
    out = _run(label, lr, seed, dm, budget)
    from lightning_ext.core.io import atomic_write_json

    CACHE.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, path)
    return out


def _run(label, lr, seed, dm, budget):
    import lightning_ext.recsys.lightgcn as lg
    import lightning_ext.recsys.mf_bpr as mf
    import lightning_ext.recsys.sheaf4rec as sh

    cls_name, fixed = MODELS[label]
    cls = {"MFBPR": mf.MFBPR, "LightGCN": lg.LightGCN, "Sheaf4Rec": sh.Sheaf4Rec}[cls_name]
    seed_everything(seed, verbose=False)
    dm.shuffle_seed = seed
    model = cls(lr=lr, embedding_dim=64, **fixed)
    tracker = Tracker(list(dm.val_dataloader()))
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, max_epochs=budget, callbacks=[tracker])
    trainer.fit(model, datamodule=dm)
    b, last = tracker.best, tracker.curve[-1]
    model.load_state_dict(b["state"])
    model.eval()
    with torch.no_grad():
        emb = model.propagate()
    test = list(dm.test_dataloader())
    out = {"model": label, "lr": lr, "seed": seed, "config": fixed, "best_epoch": b["epoch"], "best_step": b["step"],
           "val_f1": b["val_f1"], "epochs_run": last["epoch"], "steps_run": trainer.global_step,
           "samples_seen": trainer.global_step * BATCH, "max_epochs": budget, "still_improving": b["epoch"] == last["epoch"],
           "train_cpu": tracker.cpu, "curve": tracker.curve,
           "test": f1_at_k(*emb, test), "test_multiplicative_mask": f1_at_k(*emb, test, multiplicative=True),
           "params": sum(p.numel() for p in model.parameters())}
    print(f"  {label:20s} lr {lr:g} seed {seed}: val F1 {b['val_f1']:.4f} (ep {b['epoch']}/{last['epoch']}) "
          f"test F1 {out['test']['f1']:.4f} cpu {tracker.cpu:.0f}s", flush=True)
    return out


def train_all(only=None):
    """Every part, or (``only``) rerun one tuned model's part into the existing JSON."""
    torch.set_num_threads(1)
    dm = datamodule()
    if only:
        data = json.loads(JSON.read_text())
        data["runs"] = [r for r in data["runs"] if r["model"] != only]
        data.setdefault("reruns", []).append({"model": only, "max_epochs": BUDGET[only]})
    else:
        data = {"protocol": dm.name, "stats": dm.interactions.stats(), "popularity_val_f1": popularity_val_f1(dm),
                "runs": [], "selected_lr": {}}
    t0, c0 = time.time(), time.process_time()
    if only:
        t0, c0 = t0 - data.get("wall_s", 0), c0 - data.get("cpu_s", 0)
    for label in [only] if only else ["MF-BPR", "LightGCN", "Sheaf4Rec (concat)"]:
        tuning = [run(label, lr, SEEDS[0], dm) for lr in LRS]
        best = max(tuning, key=lambda r: r["val_f1"])
        data["selected_lr"][label] = best["lr"]
        for r in tuning:
            r["role"] = "tuning+seed" if r is best else "tuning"
        data["runs"] += tuning + [run(label, best["lr"], s, dm) for s in SEEDS[1:]]
        _save(data, t0, c0)
    if only:
        return data
    lr = data["selected_lr"]["Sheaf4Rec (concat)"]
    data["selected_lr"]["Sheaf4Rec (mean)"] = lr
    data["runs"] += [{**run("Sheaf4Rec (mean)", lr, s, dm), "role": "seed"} for s in SEEDS]
    _save(data, t0, c0)
    return data


def _save(data, t0, c0):
    from lightning_ext.core.io import atomic_write_json

    data["wall_s"], data["cpu_s"] = time.time() - t0, time.process_time() - c0
    data["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    atomic_write_json(data, JSON)


def seeds_of(data, label):
    lr = data["selected_lr"].get(label)
    return [r for r in data["runs"] if r["model"] == label and r["lr"] == lr]


def ms(values, digits=4):
    values = list(values)
    if not values:
        return "n/a"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def verdict(data):
    sheaf, light = seeds_of(data, "Sheaf4Rec (concat)"), seeds_of(data, "LightGCN")
    if len(sheaf) < 2 or len(light) < 2:
        return "inconclusive", "fewer than 2 seeds finished on one side"
    pop = data["popularity_val_f1"]
    if any(r["val_f1"] <= pop for r in sheaf + light):
        return "not testable here", "a tuned model does not beat the popularity ranking on validation"
    a, b = [r["test"]["f1"] for r in sheaf], [r["test"]["f1"] for r in light]
    gap = statistics.mean(a) - statistics.mean(b)
    band = max(statistics.stdev(a), statistics.stdev(b))
    improving = [r for r in sheaf + light if r["still_improving"]]
    if improving:
        return "inconclusive", f"{len(improving)} selected run(s) best at their last epoch (budget)"
    rel = gap / statistics.mean(b)
    if gap > band:
        return "reproduced", f"gap {gap:+.4f} ({rel:+.1%}) > larger seed std {band:.4f}"
    if gap < -band:
        return "not reproduced", f"gap {gap:+.4f} ({rel:+.1%}) below minus the larger seed std {band:.4f}"
    return "inconclusive", f"gap {gap:+.4f} ({rel:+.1%}) within the larger seed std {band:.4f}"


def plot(data, path):
    from lightning_ext.core.plotting import new_figure, save_figure

    fig, axes = new_figure(1, 2, figsize=(12, 4.5))
    for label in MODELS:
        runs = seeds_of(data, label)
        if runs:
            c = runs[0]["curve"]
            axes[0].plot([p["step"] for p in c], [p["val_f1"] for p in c], marker="o", ms=3, label=label)
    axes[0].axhline(data["popularity_val_f1"], color="grey", ls="--", label="popularity")
    axes[0].set_xlabel("optimizer steps (seed 0, selected lr)")
    axes[0].set_ylabel("validation F1@10")
    axes[0].legend(fontsize=8)
    labels = [m for m in MODELS if seeds_of(data, m)]
    for j, key in enumerate(["test", "test_multiplicative_mask"]):
        vals = [[r[key]["f1"] for r in seeds_of(data, m)] for m in labels]
        xs = [i + 0.38 * j for i in range(len(labels))]
        axes[1].bar(xs, [statistics.mean(v) for v in vals], 0.38,
                    yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in vals], capsize=3,
                    label="-inf mask (ours)" if j == 0 else "multiplicative mask (official)")
    axes[1].set_xticks([i + 0.19 for i in range(len(labels))], labels, fontsize=8)
    axes[1].set_ylabel("test F1@10 (mean ± std, 3 seeds)")
    axes[1].legend(fontsize=8)
    save_figure(fig, path)


def caveats(data):
    """Observations on the finished runs that bound the verdict (computed from the JSON)."""
    out = []
    same = all(abs(r["test"]["f1"] - r["test_multiplicative_mask"]["f1"]) < 1e-9 for r in data["runs"])
    if same:
        out.append("- The official multiplicative mask gives the same F1@10 as the -inf mask on every run: no seen "
                   "item at score 0 entered a top 10 (every user had at least ten unseen items scoring above 0), so "
                   "trap 2 of the spec has no effect on these models.")
    unfinished = [r for r in data["runs"] if r.get("role") == "tuning" and r["still_improving"]]
    for r in unfinished:
        out.append(f"- {r['model']} at lr {r['lr']:g} (a tuning run, not selected) was still improving at its "
                   f"{r['epochs_run']}-epoch budget (validation F1@10 {r['val_f1']:.4f}); with a larger budget "
                   "that lr might overtake the chosen one.")
    early = [r for r in data["runs"] if r.get("role") == "tuning" and r["epochs_run"] < 20]
    for r in early:
        out.append(f"- {r['model']} at lr {r['lr']:g} stopped at epoch {r['epochs_run']} on an early plateau "
                   f"(validation F1@10 {r['val_f1']:.4f}): patience {PATIENCE} evaluations is short for a slow "
                   "start; that lr was not chosen for either side.")
    out.append("- Sheaf4Rec keeps the official regulariser weight 1 (about 10^4 x LightGCN's) untuned; only lr was "
               "tuned for every model. Sheaf4Rec costs about 2.5x LightGCN's CPU time per run here.")
    return "\n".join(out)


def render(data):
    v, why = verdict(data)
    rows = []
    for label in MODELS:
        runs = seeds_of(data, label)
        if not runs:
            continue
        rows.append(f"| {label} | {data['selected_lr'][label]:g} | {len(runs)} | {ms(r['val_f1'] for r in runs)} | "
                    f"**{ms(r['test']['f1'] for r in runs)}** | {ms(r['test']['ndcg'] for r in runs)} | "
                    f"{ms(r['test']['recall'] for r in runs)} | {ms(r['test_multiplicative_mask']['f1'] for r in runs)} | "
                    f"{ms((r['best_epoch'] for r in runs), 1)} / {ms((r['epochs_run'] for r in runs), 1)} | "
                    f"{sum(r['still_improving'] for r in runs)} | {runs[0]['params']:,} | "
                    f"{ms((r['train_cpu'] for r in runs), 0)} |")
    tuning = "\n".join(f"| {r['model']} | {r['lr']:g} | {r['val_f1']:.4f} | {r['best_epoch']} / {r['epochs_run']} | "
                       f"{'yes' if r.get('role') == 'tuning+seed' else ''} |"
                       for r in data["runs"] if r.get("role", "").startswith("tuning"))
    st = data["stats"]
    page = f"""# Sheaf4Rec vs LightGCN on MovieLens-100K (F1@10)

Rendered by `benchmarks/sheaf4rec.py` from `sheaf4rec.json`. Claim (Sheaf4Rec arXiv 2304.09097 v1): Sheaf4Rec beats
graph CF baselines on ML-100K F1@10 (about +5% relative). Spec: `graph-and-recsys.md` §14, `modules-and-data.md` §2e.

## Verdict: **{v}**

{why}. Sheaf4Rec (concat, the final official code) test F1@10 {ms(r['test']['f1'] for r in seeds_of(data, 'Sheaf4Rec (concat)'))} vs tuned LightGCN {ms(r['test']['f1'] for r in seeds_of(data, 'LightGCN'))} ({len(seeds_of(data, 'Sheaf4Rec (concat)'))} and {len(seeds_of(data, 'LightGCN'))} seeds).
Premise check: item popularity reaches validation F1@10 {data['popularity_val_f1']:.4f}; lowest seed of each tuned model:
({', '.join(f"{m} {min(r['val_f1'] for r in seeds_of(data, m)):.4f}" for m in MODELS if seeds_of(data, m))} lowest seed).

**Rule (fixed before the runs):** reproduced if Sheaf4Rec (concat)'s mean test F1@10 exceeds tuned LightGCN's by
more than the larger seed std, not reproduced if lower by more than that, else inconclusive; a selected run whose
best validation epoch is its last makes it inconclusive.

## Results (test, mean ± std over seeds 0, 1, 2; weights of the best validation F1@10 epoch)

| model | lr (chosen on seed-0 val) | seeds | val F1@10 | test F1@10 | test NDCG@10 | test Recall@10 | test F1@10, official multiplicative mask | best / last epoch | best = last | parameters | train CPU-s per run |
|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Tuning (seed 0, validation F1@10):

| model | lr | val F1@10 | best / last epoch | chosen |
|---|---|---|---|---|
{tuning}

![curves and test F1](sheaf4rec.png)

## Caveats (read before citing the verdict)

{caveats(data)}

## Protocol

- Data: {data['protocol']}; {st['users']} users, {st['items']} items, {st['train']:,} train / {st['val']:,} val /
  {st['test']:,} test positives (rating >= 3, the official positive rule).
- **Scaled down / changed from the official protocol** (`train.py`): per-user random 80/10/10 split (the library's
  DataModule) instead of a global random 80/10/10 split of interactions; one BPR triple per training interaction
  per epoch in batches of {BATCH} (official: 1,024 sampled users per step, same number of samples per epoch; the
  larger batch quarters the number of full-graph propagations, the cost of a Sheaf4Rec step);
  at most {MAX_EPOCHS} epochs for Sheaf4Rec ({MAX_EPOCHS} x {-(-st['train'] // BATCH)} = {MAX_EPOCHS * -(-st['train'] // BATCH)} steps,
  {MAX_EPOCHS * st['train']:,} samples) and {BUDGET['LightGCN']} for LightGCN and MF-BPR (their epochs cost ~10x less;
  reruns: {data.get('reruns', 'none')}) with validation every {EVAL_EVERY} epochs and early stopping after {PATIENCE}
  evaluations without a new best (official: 50-100 epochs, no model selection).
- Models: Sheaf4Rec 5 layers, dim 64, step 1, regulariser weight 1 (official); LightGCN 3 layers, MF-BPR, both
  with the LightGCN-PyTorch regulariser 1e-4; all N(0, 0.1) init, Adam. lr tuned on seed 0 over {LRS}.
  Sheaf4Rec "mean" (v1 readout) uses the lr chosen for "concat" (not tuned separately).
- Metric: F1@10 = 2 P̄ R̄ / (P̄ + R̄) from mean precision and recall (official); seen items masked with -inf;
  the official multiplicative mask (`scores * (1 - seen)`, letting seen items with score 0 outrank unseen items
  with negative scores) is reported in its own column on the same weights.
- 1 thread (`torch.set_num_threads(1)`), `nice -n 10`, on a 2-core machine shared with other jobs.

## Command and runtime

```bash
{COMMAND}
```

Wall {data['wall_s']:.0f} s, CPU {data['cpu_s']:.0f} s, finished {data['finished']}.
"""
    from lightning_ext.core.io import atomic_write_text

    atomic_write_text(page, OUT / "sheaf4rec.md")
    plot(data, OUT / "sheaf4rec.png")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--render-only", action="store_true")
    ap.add_argument("--rerun", choices=["MF-BPR", "LightGCN"], help="retune one baseline into the existing JSON")
    args = ap.parse_args()
    sys.path.insert(0, str(REPO))
    data = json.loads(JSON.read_text()) if args.render_only else train_all(args.rerun)
    render(data)
    print(verdict(data))


if __name__ == "__main__":
    main()
