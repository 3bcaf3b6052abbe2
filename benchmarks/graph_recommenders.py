"""Graph collaborative filtering on LastFM (LightGCN split) and MovieLens-100K: MF-BPR, LightGCN, UltraGCN,
LightGCL, DCCF (+ ablations), 3 seeds, full-ranking Recall/NDCG@20 with training items masked.

Protocol (fixed before any run):
- Validation = 10% of each user's training items (split_seed 0). Model selection (learning rate, best epoch)
  uses validation Recall@20 only; the test split is evaluated once per selected checkpoint.
- Tuning: on LastFM, seed 0, each model's learning rate over ``GRID``; the selected setting is then run with
  seeds 1 and 2 (the seed-0 run of the selected setting *is* the tuning run: same seed, same config). Ablations
  reuse their parent's learning rate. ML-100K reuses LastFM's learning rates (no tuning on ML-100K).
- Epoch budgets: ``EPOCHS`` (MF/LightGCN get more, they are ~10x cheaper per epoch); for the claims "at equal
  epochs" LightGCN's best-validation checkpoint within the first ``EQUAL_EPOCHS`` epochs is tested as well.
- UltraGCN: trained for at most ``ULTRA_BUDGET`` x LightGCN's training time of the same seed; time-to-target
  = training wall-clock (evaluation excluded) until validation Recall@20 first reaches LightGCN's best
  validation Recall@20 of that seed; LightGCN's time is measured the same way (until its own best).
- Speed: our LightGCN (Lightning Trainer) vs a re-implementation of PyG's ``examples/lightgcn.py`` loop
  (torch_geometric.nn.LightGCN, per-batch message passing on edge_index, unfiltered negatives,
  ``recommendation_loss``; its batched top-k evaluation) on LastFM, same batch sizes, 3 layers, 1 thread.

Run: ``nice -n 5 python benchmarks/graph_recommenders.py`` (``--quick``: 2 epochs, 1 seed, smoke test).
Writes docs/results/graph_recommenders.{json,png}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything

from lightning_ext.recsys.lastfm import LastFMDataModule
from lightning_ext.recsys.movielens100k import MovieLens100KDataModule
from lightning_ext.modules import DCCF, MFBPR, LightGCL, LightGCN, UltraGCN

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "docs" / "results"
warnings.filterwarnings("ignore")

# name -> (class, fixed kwargs, training batch size, parent whose lr is reused or None)
MODELS = {
    "MF-BPR": (MFBPR, {}, 2048, None),
    "LightGCN": (LightGCN, {"num_layers": 3}, 2048, None),
    "UltraGCN": (UltraGCN, {"negative_num": 50}, 1024, None),
    "LightGCL": (LightGCL, {}, 4096, None),
    "LightGCL (cl_weight=0)": (LightGCL, {"cl_weight": 0.0}, 4096, "LightGCL"),
    "DCCF": (DCCF, {}, 10240, None),
    "DCCF (1 intent)": (DCCF, {"num_intents": 1}, 10240, "DCCF"),
    "DCCF (no adaptive aug.)": (DCCF, {"adaptive_augmentation": False}, 10240, "DCCF"),
}
GRID = {"MF-BPR": [1e-3, 5e-3, 1e-2], "LightGCN": [1e-3, 5e-3, 1e-2], "UltraGCN": [5e-3, 1e-2],
        "LightGCL": [5e-3, 1e-2], "DCCF": [5e-3, 1e-2]}
EPOCHS = {"MF-BPR": 40, "LightGCN": 40, "LightGCL": 10, "DCCF": 10}
EQUAL_EPOCHS = 10
ULTRA_BUDGET = 1.5
SEEDS = [0, 1, 2]
ABLATIONS = {"LastFM": list(MODELS), "ML-100K": ["MF-BPR", "LightGCN", "UltraGCN", "LightGCL", "DCCF"]}


class Tracker(Callback):
    """Training wall-clock without evaluation, the validation curve, best-validation snapshots per horizon,
    and (optionally) a stop once a time budget is spent."""

    def __init__(self, horizons=(), time_budget=None, target=None):
        self.train_time, self.t0, self.curve = 0.0, None, []
        self.horizons = sorted(horizons)
        self.best = {}  # horizon (or 'all') -> {"recall": .., "epoch": .., "state": ..}
        self.time_budget, self.target, self.time_to_target = time_budget, target, None
        self.epoch_times = []

    def _stop_clock(self):
        if self.t0 is not None:
            self.train_time += time.perf_counter() - self.t0
            self.t0 = None

    def on_train_epoch_start(self, trainer, pl_module):
        self.t0 = time.perf_counter()
        self.epoch_start = self.train_time

    def on_validation_epoch_start(self, trainer, pl_module):
        self._stop_clock()  # inside fit the clock runs from the epoch start; evaluation is not training time

    def on_validation_end(self, trainer, pl_module):  # after the module logged its epoch metrics
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        epoch = trainer.current_epoch + 1
        recall = metrics["val_recall@20"]
        self.curve.append({"epoch": epoch, "train_time": self.train_time, **metrics})
        if self.target is not None and self.time_to_target is None and recall >= self.target:
            self.time_to_target = self.train_time
        for h in [*(h for h in self.horizons if epoch <= h), "all"]:
            if h not in self.best or recall > self.best[h]["recall"]:
                self.best[h] = {"recall": recall, "epoch": epoch, "train_time": self.train_time,
                                "state": copy.deepcopy(pl_module.state_dict())}
        if self.time_budget is not None and self.train_time >= self.time_budget:
            trainer.should_stop = True
        if trainer.state.fn == "fit":
            self.t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module):
        self._stop_clock()
        self.epoch_times.append(self.train_time - self.epoch_start)


def quiet_trainer(**kwargs) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, **kwargs)


def run(name, dm, seed, lr, epochs, horizons=(), time_budget=None, target=None):
    cls, kwargs, batch_size, _ = MODELS[name]
    seed_everything(seed, verbose=False)
    dm.batch_size, dm.shuffle_seed = batch_size, seed
    model = cls(lr=lr, **kwargs)
    tracker = Tracker(horizons, time_budget, target)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[tracker], check_val_every_n_epoch=1)
    trainer.fit(model, datamodule=dm)
    out = {"model": name, "seed": seed, "lr": lr, "epochs_run": trainer.current_epoch, "train_time": tracker.train_time,
           "epoch_time": statistics.median(tracker.epoch_times), "curve": tracker.curve,
           "time_to_target": tracker.time_to_target, "target": target, "best": {}}
    for h, best in tracker.best.items():
        model.load_state_dict(best["state"])
        test = quiet_trainer().test(model, datamodule=dm, verbose=False)[0]
        out["best"][str(h)] = {"epoch": best["epoch"], "train_time": best["train_time"], "val_recall@20": best["recall"],
                               **{k: float(v) for k, v in test.items()}}
    b = out["best"]["all"]
    print(f"  {name:26s} seed {seed} lr {lr:g}: val R@20 {b['val_recall@20']:.4f} (ep {b['epoch']}) test R@20 "
          f"{b['test_recall@20']:.4f} N@20 {b['test_ndcg@20']:.4f}  {out['train_time']:.0f}s train, "
          f"{out['epoch_time']:.2f}s/epoch", flush=True)
    return out


def family(name):
    return MODELS[name][3] or name


def dataset_runs(label, dm, lrs, seeds, tune, models):
    """All runs on one dataset; returns (runs, chosen lrs)."""
    runs = []
    chosen = dict(lrs)
    lgn_by_seed = {}
    order = ["MF-BPR", "LightGCN", "UltraGCN", "LightGCL", "DCCF"] + [m for m in models if MODELS[m][3]]
    for name in [m for m in order if m in models]:
        base = family(name)
        epochs = EPOCHS.get(base)
        for seed in seeds:
            kwargs = {"horizons": (EQUAL_EPOCHS,) if name == "LightGCN" else ()}
            if name == "UltraGCN":
                lgn = lgn_by_seed[seed]
                kwargs.update(time_budget=ULTRA_BUDGET * lgn["train_time"], target=lgn["best"]["all"]["val_recall@20"])
                epochs = 10_000
            candidates = GRID[name] if (tune and seed == seeds[0] and name in GRID) else [chosen[base]]
            results = [run(name, dm, seed, lr, epochs, **kwargs) for lr in candidates]
            for r in results:
                r["dataset"], r["tuning"] = label, len(candidates) > 1
            if len(candidates) > 1:
                best = max(results, key=lambda r: r["best"]["all"]["val_recall@20"])
                chosen[name] = best["lr"]
                print(f"  -> {name}: lr {best['lr']:g} chosen on validation", flush=True)
                for r in results:
                    r["selected"] = r is best
            else:
                results[0]["selected"] = True
                chosen.setdefault(name, results[0]["lr"])
            runs.extend(results)
            sel = next(r for r in results if r["selected"])
            if name == "LightGCN":
                lgn_by_seed[seed] = sel
    return runs, chosen


def pyg_reference_speed(dm, epochs=3, batch_size=2048, eval_users=1024):
    """Epoch and full-ranking-eval seconds of PyG's examples/lightgcn.py loop on the same training pairs."""
    from torch_geometric.nn import LightGCN as PyGLightGCN
    from torch_geometric.utils import degree

    data = dm.interactions
    n_u, n_i = data.num_users, data.num_items
    tr = torch.as_tensor(data.train.T.copy())
    train_edge_label_index = torch.stack([tr[0], tr[1] + n_u])
    edge_index = torch.cat([train_edge_label_index, train_edge_label_index.flip(0)], 1)
    te = torch.as_tensor(data.test.T.copy())
    test_edge_label_index = torch.stack([te[0], te[1] + n_u])
    seed_everything(0, verbose=False)
    model = PyGLightGCN(num_nodes=n_u + n_i, embedding_dim=64, num_layers=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(range(train_edge_label_index.size(1)), shuffle=True, batch_size=batch_size)

    def train():
        for index in loader:
            pos = train_edge_label_index[:, index]
            neg = torch.stack([pos[0], torch.randint(n_u, n_u + n_i, (index.numel(),))])
            eli = torch.cat([pos, neg], 1)
            opt.zero_grad()
            pos_rank, neg_rank = model(edge_index, eli).chunk(2)
            loss = model.recommendation_loss(pos_rank, neg_rank, node_id=eli.unique())
            loss.backward()
            opt.step()

    @torch.no_grad()
    def test(k=20):
        emb = model.get_embedding(edge_index)
        user_emb, item_emb = emb[:n_u], emb[n_u:]
        recall = total = 0
        for start in range(0, n_u, eval_users):
            end = start + eval_users
            logits = user_emb[start:end] @ item_emb.t()
            m = (train_edge_label_index[0] >= start) & (train_edge_label_index[0] < end)
            logits[train_edge_label_index[0, m] - start, train_edge_label_index[1, m] - n_u] = float("-inf")
            gt = torch.zeros_like(logits, dtype=torch.bool)
            m = (test_edge_label_index[0] >= start) & (test_edge_label_index[0] < end)
            gt[test_edge_label_index[0, m] - start, test_edge_label_index[1, m] - n_u] = True
            count = degree(test_edge_label_index[0, m] - start, num_nodes=logits.size(0))
            hits = gt.gather(1, logits.topk(k, dim=-1).indices)
            recall += float((hits.sum(-1) / count.clamp(1e-6)).sum())
            total += int((count > 0).sum())
        return recall / total

    epoch_times, eval_times = [], []
    for _ in range(epochs):
        t = time.perf_counter()
        train()
        epoch_times.append(time.perf_counter() - t)
        t = time.perf_counter()
        test()
        eval_times.append(time.perf_counter() - t)
    return statistics.median(epoch_times), statistics.median(eval_times)


class EvalTimer(Callback):
    def on_test_epoch_start(self, trainer, pl_module):
        self.t = time.perf_counter()

    def on_test_epoch_end(self, trainer, pl_module):
        self.times = getattr(self, "times", []) + [time.perf_counter() - self.t]


def ours_speed(dm, epochs=3):
    seed_everything(0, verbose=False)
    dm.batch_size, dm.shuffle_seed = 2048, 0
    model = LightGCN(num_layers=3)
    tracker = Tracker()
    quiet_trainer(max_epochs=epochs, callbacks=[tracker], limit_val_batches=0).fit(model, datamodule=dm)
    timer = EvalTimer()
    trainer = quiet_trainer(callbacks=[timer])
    for _ in range(epochs):
        trainer.test(model, datamodule=dm, verbose=False)
    return statistics.median(tracker.epoch_times), statistics.median(timer.times)


def summarise(runs):
    import numpy as np

    table = {}
    for r in runs:
        if not r["selected"]:
            continue
        for h in ("all", str(EQUAL_EPOCHS)):
            if h not in r["best"]:
                continue
            key = (r["dataset"], r["model"] if h == "all" else f"{r['model']} @<= {EQUAL_EPOCHS} ep")
            table.setdefault(key, []).append(r["best"][h])
    out = {}
    for (ds, model), bests in table.items():
        entry = {}
        for metric in ("test_recall@20", "test_ndcg@20", "test_recall@40", "test_ndcg@40", "val_recall@20"):
            vals = np.array([b[metric] for b in bests])
            entry[metric] = [float(vals.mean()), float(vals.std(ddof=1)) if len(vals) > 1 else 0.0]
        entry["epochs"] = [b["epoch"] for b in bests]
        out.setdefault(ds, {})[model] = entry
    return out


def plot(runs, path):
    from lightning_ext.core.plotting import new_figure, save_figure

    datasets = sorted({r["dataset"] for r in runs})
    fig, axes = new_figure(1, len(datasets), figsize=(6.5 * len(datasets), 4.5), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        for r in runs:
            if r["dataset"] != ds or not r["selected"] or r["seed"] != 0:
                continue
            xs = [c["epoch"] for c in r["curve"]]
            ys = [c["val_recall@20"] for c in r["curve"]]
            ax.plot(xs, ys, marker=".", label=r["model"])
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation Recall@20")
        ax.set_title(f"{ds} (seed 0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def supplement(path: Path):
    result = json.loads(path.read_text())
    lastfm = LastFMDataModule(val_fraction=0.1)
    lastfm.setup()
    MODELS["DCCF (batch 2048)"] = (DCCF, {}, 2048, "DCCF")
    load = os.getloadavg()
    runs = []
    for seed in SEEDS:
        r = run("DCCF (batch 2048)", lastfm, seed, result["chosen_lr"]["DCCF"], EPOCHS["DCCF"])
        r["dataset"], r["selected"], r["tuning"] = "LastFM", True, False
        runs.append(r)
    result["supplement"] = {"runs": runs, "summary": summarise(runs), "loadavg_start": load,
                            "loadavg_end": os.getloadavg()}
    path.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["supplement"]["summary"], indent=1))


def timing(path: Path):
    """LightGCN, then UltraGCN with at most ULTRA_BUDGET x LightGCN's training time, per seed and dataset."""
    result = json.loads(path.read_text())
    lrs = result["chosen_lr"]
    load = os.getloadavg()
    runs = []
    for label, dm in (("LastFM", LastFMDataModule(val_fraction=0.1)),
                      ("ML-100K", MovieLens100KDataModule(min_rating=4, val_fraction=0.1))):
        dm.setup()
        for seed in SEEDS:
            lgn = run("LightGCN", dm, seed, lrs["LightGCN"], EPOCHS["LightGCN"])
            ultra = run("UltraGCN", dm, seed, lrs["UltraGCN"], 10_000, time_budget=ULTRA_BUDGET * lgn["train_time"],
                        target=lgn["best"]["all"]["val_recall@20"])
            for r in (lgn, ultra):
                r["dataset"], r["selected"], r["tuning"] = label, True, False
            runs += [lgn, ultra]
    result["timing_rerun"] = {"runs": runs, "loadavg_start": load, "loadavg_end": os.getloadavg()}
    path.write_text(json.dumps(result, indent=1))
    plot_time(runs, path.with_name(path.stem + "_time.png"))


def plot_time(runs, path):
    from lightning_ext.core.plotting import new_figure, save_figure

    datasets = sorted({r["dataset"] for r in runs})
    fig, axes = new_figure(1, len(datasets), figsize=(6.5 * len(datasets), 4.2), squeeze=False)
    colors = {"LightGCN": "tab:orange", "UltraGCN": "tab:green"}
    for ax, ds in zip(axes[0], datasets):
        for r in runs:
            if r["dataset"] != ds:
                continue
            ax.plot([c["train_time"] for c in r["curve"]], [c["val_recall@20"] for c in r["curve"]],
                    color=colors[r["model"]], alpha=0.8, label=f"{r['model']} seed {r['seed']}")
        ax.set_xlabel("training wall-clock, s (1 thread, evaluation excluded)")
        ax.set_ylabel("validation Recall@20")
        ax.set_title(f"{ds}: UltraGCN vs LightGCN over time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def speed_only(path: Path, rounds: int = 3, epochs: int = 2):
    """Alternate ours and PyG's loop ``rounds`` times (so both see the same load drift); medians of all epochs."""
    lastfm = LastFMDataModule(val_fraction=0.1)
    lastfm.setup()
    load = os.getloadavg()
    per_round = []
    for _ in range(rounds):
        per_round.append((*ours_speed(lastfm, epochs=epochs), *pyg_reference_speed(lastfm, epochs=epochs)))
    ours_epoch, ours_eval, pyg_epoch, pyg_eval = (statistics.median(x) for x in zip(*per_round))
    speed = {"ours_epoch_s": ours_epoch, "ours_eval_s": ours_eval, "pyg_epoch_s": pyg_epoch, "pyg_eval_s": pyg_eval,
             "epoch_speedup": pyg_epoch / ours_epoch, "eval_speedup": pyg_eval / ours_eval,
             "per_round_epoch_speedup": [p[2] / p[0] for p in per_round],
             "per_round_eval_speedup": [p[3] / p[1] for p in per_round], "rounds": rounds, "epochs": epochs,
             "loadavg_start": load, "loadavg_end": os.getloadavg()}
    print(speed, flush=True)
    result = json.loads(path.read_text()) if path.is_file() else {}
    result.setdefault("speed_reruns", []).append(speed)
    path.write_text(json.dumps(result, indent=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs, 1 seed, no grid: a smoke test")
    parser.add_argument("--out", default=str(OUT / "graph_recommenders.json"))
    parser.add_argument("--supplement", action="store_true",
                        help="DCCF with batch 2048 (5x the optimizer steps per epoch) on LastFM, 3 seeds, LastFM's "
                             "chosen lr; added to an existing --out JSON")
    parser.add_argument("--timing", action="store_true",
                        help="rerun LightGCN then UltraGCN (chosen lrs, 3 seeds, both datasets) for the time-to-target "
                             "claim; added to an existing --out JSON")
    parser.add_argument("--speed-only", action="store_true",
                        help="re-measure only ours-vs-PyG speed (5 epochs each) and add it to an existing --out JSON")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.speed_only:
        return speed_only(Path(args.out))
    if args.supplement:
        return supplement(Path(args.out))
    if args.timing:
        return timing(Path(args.out))
    global SEEDS, EQUAL_EPOCHS
    if args.quick:
        for k in EPOCHS:
            EPOCHS[k] = 2
        for k in GRID:
            GRID[k] = GRID[k][:1]
        SEEDS, EQUAL_EPOCHS = [0], 1
    start = time.time()
    load_start = os.getloadavg()
    print(f"load average at start: {load_start}", flush=True)
    lastfm = LastFMDataModule(val_fraction=0.1)
    ml = MovieLens100KDataModule(min_rating=4, val_fraction=0.1)
    for dm in (lastfm, ml):
        dm.setup()
        print(dm.name, dm.interactions.stats(), flush=True)

    print("speed: ours vs PyG examples/lightgcn.py (LastFM, 3 layers, batch 2048)", flush=True)
    ours_epoch, ours_eval = ours_speed(lastfm, epochs=2 if args.quick else 3)
    pyg_epoch, pyg_eval = pyg_reference_speed(lastfm, epochs=2 if args.quick else 3)
    speed = {"ours_epoch_s": ours_epoch, "ours_eval_s": ours_eval, "pyg_epoch_s": pyg_epoch, "pyg_eval_s": pyg_eval,
             "epoch_speedup": pyg_epoch / ours_epoch, "eval_speedup": pyg_eval / ours_eval}
    print("  ", {k: round(v, 3) for k, v in speed.items()}, flush=True)

    runs = []
    print("LastFM", flush=True)
    lastfm_runs, lrs = dataset_runs("LastFM", lastfm, {}, SEEDS, tune=True, models=ABLATIONS["LastFM"])
    runs += lastfm_runs
    print("ML-100K (learning rates from LastFM):", lrs, flush=True)
    ml_runs, _ = dataset_runs("ML-100K", ml, lrs, SEEDS, tune=False, models=ABLATIONS["ML-100K"])
    runs += ml_runs

    result = {
        "command": "python benchmarks/graph_recommenders.py" + (" --quick" if args.quick else ""),
        "protocols": {"LastFM": lastfm.name, "ML-100K": ml.name},
        "stats": {"LastFM": lastfm.interactions.stats(), "ML-100K": ml.interactions.stats()},
        "grid": GRID, "epochs": EPOCHS, "equal_epochs": EQUAL_EPOCHS, "ultra_budget": ULTRA_BUDGET, "seeds": SEEDS,
        "chosen_lr": lrs, "speed": speed, "summary": summarise(runs), "runs": runs,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "wall_s": time.time() - start,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(runs, Path(args.out).with_suffix(".png"))
    print(json.dumps(result["summary"], indent=1))
    print(f"wall {result['wall_s']:.0f}s, load {load_start} -> {result['loadavg_end']}", flush=True)




def report(path: Path) -> str:
    """Markdown tables (results, tuning, UltraGCN time-to-target, speed) from a finished run's JSON."""
    import numpy as np

    r = json.loads(path.read_text())
    lines = []
    for ds, models in r["summary"].items():
        lines += [f"### {ds}", "", "| model | lr | test Recall@20 | test NDCG@20 | test Recall@40 | test NDCG@40 | val Recall@20 | best epochs |",
                  "|---|---|---|---|---|---|---|---|"]
        for model, e in models.items():
            base = model.split(" @<=")[0]
            fmt = lambda m: f"{e[m][0]:.4f} ± {e[m][1]:.4f}"
            lines.append(f"| {model} | {r['chosen_lr'].get(base, '')} | {fmt('test_recall@20')} | {fmt('test_ndcg@20')} | "
                         f"{fmt('test_recall@40')} | {fmt('test_ndcg@40')} | {fmt('val_recall@20')} | {e['epochs']} |")
        lines.append("")
    lines += ["### Tuning (LastFM, seed 0, validation Recall@20 of the best epoch)", "", "| model | lr | val Recall@20 | epochs run |", "|---|---|---|---|"]
    for run in r["runs"]:
        if run.get("tuning"):
            lines.append(f"| {run['model']} | {run['lr']:g} | {run['best']['all']['val_recall@20']:.4f} | {run['epochs_run']} |")
    lines += ["", "### UltraGCN time to LightGCN's best validation Recall@20", "",
              "| dataset | seed | LightGCN best val R@20 | LightGCN time to it (s) | UltraGCN time to it (s) | UltraGCN best val R@20 | UltraGCN trained (s) | ratio |",
              "|---|---|---|---|---|---|---|---|"]
    timing_runs = r.get("timing_rerun", {}).get("runs", r["runs"])
    lgn = {(x["dataset"], x["seed"]): x for x in timing_runs if x["model"] == "LightGCN" and x["selected"]}
    for x in timing_runs:
        if x["model"] != "UltraGCN" or not x["selected"]:
            continue
        g = lgn[(x["dataset"], x["seed"])]
        t_l = g["best"]["all"]["train_time"]
        t_u = x["time_to_target"]
        ratio = f"{t_l / t_u:.2f}x" if t_u else "not reached"
        lines.append(f"| {x['dataset']} | {x['seed']} | {x['target']:.4f} | {t_l:.0f} | {t_u if t_u is None else round(t_u)} | "
                     f"{x['best']['all']['val_recall@20']:.4f} | {x['train_time']:.0f} | {ratio} |")
    lines += ["", "### Seconds per training epoch (median, 1 thread, shared machine)", "", "| dataset | model | s/epoch |", "|---|---|---|"]
    per = {}
    for x in r["runs"] + r.get("timing_rerun", {}).get("runs", []):
        if x["selected"]:
            x_model = x["model"] + (" (timing rerun)" if x in r.get("timing_rerun", {}).get("runs", []) else "")
            per.setdefault((x["dataset"], x_model), []).append(x["epoch_time"])
    for (ds, m), v in per.items():
        lines.append(f"| {ds} | {m} | {np.median(v):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__" and "--report" in sys.argv:
    print(report(Path(sys.argv[-1])))
    sys.exit(0)


if __name__ == "__main__":
    sys.exit(main())
