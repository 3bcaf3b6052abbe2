"""Benchmark: ForwardGNN (single-forward, forward-forward) vs backpropagation on Cora, accuracy and step memory.

Claim (Park et al., "Forward Learning of Graph Neural Networks", ICLR 2024, arXiv 2403.11004): the single-forward
(SF) layer-local objective reaches accuracy comparable to backpropagation (BP) at lower memory per step. The spec's
pass rule: SF test accuracy within about 2 points of BP (or better), and per-layer accuracy rising with depth.

Arms, all the same 4-layer GCN stack (hidden 128, PyG ``GCNConv``, full batch, Cora public split 140/500/1000):
``bp`` (end to end, the last layer outputs the classes), ``sf`` (virtual class nodes), ``sf_noedges`` (the same,
virtual nodes not linked: the paper's ablation), ``ff`` (forward-forward with label appending, one lr only).
Tuning alike: lr in {1e-3 (official), 1e-2} picked on validation accuracy with seed 0; then seeds 0, 1, 2.
BP early-stops after ``--patience`` epochs without a better validation accuracy and keeps its best weights; each
forward layer does the same on its own validation accuracy (``patience`` per layer). Memory: the bytes of the
tensors autograd saves for backward in one training step (distinct storages, ``saved_tensors_hooks``; the
activation memory held at the step's peak), maximum over the run's steps, plus the parameters + gradients + Adam
state that step touches. Writes ``docs/results/forward_gnn.{md,json,png}``; the JSON is saved after every run.

    nice -n 10 python benchmarks/forward_gnn.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import KeepBestWeights, mean_std  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "results"
ROOT = "/work/shared/data/planetoid"


def run_one(learning: str, lr: float, seed: int, args, virtual_edges: bool = True) -> dict:
    import logging
    import warnings

    from lightning.pytorch import Callback, Trainer, seed_everything

    from lightning_ext.graph.forward_gnn import ForwardGNN
    from lightning_ext.graph.planetoid import PlanetoidDataModule

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    seed_everything(seed, verbose=False)
    dm = PlanetoidDataModule(root=ROOT, name=args.dataset)
    ff = learning == "forward_forward"
    model = ForwardGNN(num_features=dm.num_features, num_classes=dm.num_classes, learning=learning, lr=lr,
                       num_layers=args.layers, hidden=args.hidden, seed=seed, virtual_edges=virtual_edges,
                       epochs_per_layer=args.ff_epochs if ff else args.epochs_per_layer,
                       patience=args.ff_patience if ff else args.patience)

    class Watch(Callback):
        def __init__(self):
            self.saved = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.saved = max(self.saved, pl_module.last_saved_bytes)

    watch = Watch()
    callbacks = [watch]
    keeper = None
    if learning == "backprop":
        keeper = KeepBestWeights("val_acc", args.patience)
        callbacks.insert(0, keeper)
        max_epochs = args.bp_epochs
    else:
        max_epochs = args.layers * model.hparams.epochs_per_layer
    start, cpu = time.time(), time.process_time()
    trainer = Trainer(max_epochs=max_epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      callbacks=callbacks)
    trainer.fit(model, datamodule=dm)
    wall, cpu_s = time.time() - start, time.process_time() - cpu
    res = trainer.test(model, datamodule=dm, verbose=False)[0]
    dm.setup()
    g = dm.graph
    with torch.no_grad():
        model.eval()
        val = float((model.class_scores(g).argmax(1)[g.val_mask] == g.y[g.val_mask]).float().mean())
    params = [p for p in (model.convs if learning == "backprop" else model.convs[0]).parameters()]
    n_state = sum(p.numel() for p in params) * 4 * 4  # weights, gradients, Adam exp_avg and exp_avg_sq (fp32)
    out = {"learning": learning, "virtual_edges": virtual_edges, "lr": lr, "seed": seed, "val_acc": val,
           "test_acc": res["test_acc"], "steps": int(trainer.global_step), "epochs": trainer.current_epoch,
           "saved_bytes": watch.saved, "state_bytes_largest_step": n_state, "wall_s": wall, "cpu_s": cpu_s,
           "layer_test_acc": [res.get(f"test_layer{i}_acc") for i in range(args.layers)]}
    if keeper is not None:
        out.update(best_epoch=keeper.best_epoch, converged=keeper.best_epoch < len(keeper.history) - 1,
                   epochs_run=len(keeper.history))
    else:
        out.update(layers=model.layer_history,
                   converged=all(r["best_epoch"] < r["epochs"] - 1 for r in model.layer_history))
    print(f"  {learning}{'' if virtual_edges else '-noedges'} lr={lr} seed={seed}: val {val:.3f} test "
          f"{res['test_acc']:.3f} saved {watch.saved / 2**20:.1f} MiB, {wall:.0f} s", flush=True)
    return out


ARMS = {"bp": ("backprop", True), "sf": ("single_forward", True), "sf_noedges": ("single_forward", False),
        "ff": ("forward_forward", True)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="Cora")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--epochs_per_layer", type=int, default=150)
    p.add_argument("--patience", type=int, default=50)
    p.add_argument("--bp_epochs", type=int, default=400)
    p.add_argument("--ff_epochs", type=int, default=50)
    p.add_argument("--ff_patience", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ablation_seeds", type=int, nargs="+", default=[0],
                   help="seeds of sf_noedges (at sf's chosen lr) and of ff (time: each ff run is the slowest)")
    p.add_argument("--resume", default=None, help="a saved JSON: its finished runs (same arm, lr, seed) are kept")
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    path = OUT / "forward_gnn.json"
    if args.render:
        write_report(json.loads(path.read_text()))
        return
    results = {"args": vars(args), "runs": [], "started": time.time(), "machine": platform.machine(),
               "torch": torch.__version__}
    from lightning_ext.core.io import atomic_write_json

    def save():
        results["elapsed_s"] = time.time() - results["started"]
        atomic_write_json(results, path, indent=1)

    done = {}
    if args.resume:
        old = json.loads(Path(args.resume).read_text())
        done = {(r["arm"], r["lr"], r["seed"]): r for r in old["runs"]}
        earlier = (old.get("resumed_from") or {}).get("elapsed_s") or 0  # a chain of resumes: all earlier time
        results["resumed_from"] = {"file": args.resume, "runs": len(done), "elapsed_s": old.get("elapsed_s", 0) + earlier}

    def run(arm, lr, seed, phase):
        if (arm, lr, seed) in done:
            r = dict(done[(arm, lr, seed)])
        else:
            learning, ve = ARMS[arm]
            r = run_one(learning, lr, seed, args, ve)
        r.update(arm=arm, phase=phase)
        results["runs"].append(r)
        save()
        return r

    chosen = {}
    for arm in ("bp", "sf"):
        tune = [run(arm, lr, args.seeds[0], "tune") for lr in args.lrs]
        chosen[arm] = max(tune, key=lambda r: r["val_acc"])["lr"]
    chosen["sf_noedges"], chosen["ff"] = chosen["sf"], args.lrs[0]
    results["chosen_lr"] = chosen
    for arm in ("bp", "sf"):
        for seed in args.seeds[1:]:  # seed 0's tuning run at the chosen lr is reused
            run(arm, chosen[arm], seed, "seed")
    for arm in ("sf_noedges", "ff"):
        for seed in args.ablation_seeds:
            run(arm, chosen[arm], seed, "seed")
    save()
    write_report(results)


#: Positive control: backpropagation must reach this test accuracy (a GCN on Cora normally does about 0.8).
PREMISE_BP_ACC = 0.75


def final_runs(results, arm):
    lr = results["chosen_lr"][arm]
    return [r for r in results["runs"] if r["arm"] == arm and r["lr"] == lr
            and (r["phase"] == "seed" or (r["seed"] == results["args"]["seeds"][0] and arm in ("bp", "sf")))]


def write_report(results) -> None:
    from lightning_ext.core.io import atomic_write_text
    from lightning_ext.core.plotting import new_figure, save_figure

    a = results["args"]
    rows, summary = [], {}
    for arm in ("bp", "sf", "sf_noedges", "ff"):
        runs = final_runs(results, arm)
        if not runs:
            continue
        acc = [r["test_acc"] for r in runs]
        summary[arm] = {"acc": statistics.mean(acc), "runs": runs, "saved": max(r["saved_bytes"] for r in runs),
                        "state": runs[0]["state_bytes_largest_step"]}
        layers = ([mean_std([r["layer_test_acc"][i] for r in runs], 3) for i in range(a["layers"])]
                  if arm != "bp" else ["-"])
        rows.append(f"| {arm} | {results['chosen_lr'][arm]:g} | {mean_std(acc, 4)} | "
                    f"{mean_std([r['val_acc'] for r in runs], 4)} | {summary[arm]['saved'] / 2**20:.2f} | "
                    f"{summary[arm]['state'] / 2**20:.2f} | {statistics.mean(r['steps'] for r in runs):.0f} | "
                    f"{sum(r['converged'] for r in runs)}/{len(runs)} | {' / '.join(layers)} |")
    tune = "; ".join(f"{r['arm']} lr={r['lr']:g}: val {r['val_acc']:.3f}" for r in results["runs"]
                     if r["phase"] == "tune")
    claims, verdict, why = [], "inconclusive", ""
    if "bp" in summary and "sf" in summary:
        gap = summary["sf"]["acc"] - summary["bp"]["acc"]
        mem = summary["sf"]["saved"] / summary["bp"]["saved"]
        sf_layers = [statistics.mean(r["layer_test_acc"][i] for r in summary["sf"]["runs"]) for i in range(a["layers"])]
        rising = all(b >= x - 0.005 for x, b in zip(sf_layers, sf_layers[1:]))
        conv = all(r["converged"] for arm in ("bp", "sf") for r in summary[arm]["runs"])
        acc_ok, mem_ok = gap >= -0.02, mem < 1
        premise = summary["bp"]["acc"] >= PREMISE_BP_ACC
        why = (f"SF - BP test accuracy {gap * 100:+.2f} points (margin -2); SF's peak saved activations are "
               f"{mem:.2f}x BP's; per-layer SF test accuracy {', '.join(f'{x:.3f}' for x in sf_layers)} "
               f"({'rising' if rising else 'not rising'} with depth); "
               f"{'in every run (and every SF layer) the best validation epoch came before the last one' if conv else 'some runs were still improving at their budget'}.")
        steps = {arm: statistics.mean(r["steps"] for r in summary[arm]["runs"]) for arm in ("bp", "sf")}
        why = (f"Premise (positive control: the set-up trains a GCN at its usual {a['dataset']} level; it involves "
               f"the baseline only and was written down after the first run): BP test accuracy "
               f"{summary['bp']['acc'] * 100:.1f}% >= {PREMISE_BP_ACC * 100:.0f}% (the paper's BP GCN about 81%): "
               f"{'holds' if premise else 'fails'}. Budget: each step is one full-batch pass over the 140 training "
               f"nodes; BP {steps['bp']:.0f} steps ({140 * steps['bp']:,.0f} node-samples), SF {steps['sf']:.0f} steps "
               f"over all layers ({140 * steps['sf']:,.0f} node-samples), means over seeds. ") + why
        if not premise:
            verdict = "not testable here"
        elif not conv:
            verdict = "inconclusive"
        elif acc_ok and mem_ok and rising:
            verdict = "reproduced"
        elif acc_ok and mem_ok:
            verdict = "partly reproduced"
        else:
            verdict = "not reproduced"
        x_mib = 2708 * 1433 * 4 / 2**20 if a["dataset"] == "Cora" else None
        if x_mib:
            why += (f" Where the memory goes: Cora's input features (2,708 x 1,433 fp32 = {x_mib:.1f} MiB) are saved "
                    "by the first layer for its weight gradient in both arms, so SF's peak is its layer-0 step; BP "
                    "adds every upper layer's activations (hidden 128: about 1.3 MiB per saved tensor), which is "
                    "why the saving is modest at 4 layers (it should grow with depth; not measured here).")
        if "sf_noedges" in summary:
            why += (f" Ablation (seeds {a['ablation_seeds']} only): without virtual-node edges SF reaches "
                    f"{summary['sf_noedges']['acc']:.4f}, i.e. linking the class nodes did not help here.")
        if "ff" in summary:
            why += (f" FF (label appending; seeds {a['ablation_seeds']}) reaches {summary['ff']['acc']:.4f}, below "
                    "chance: its inference appends the candidate class to every non-training node at once, while "
                    "training only ever saw the 140 training nodes labelled and all others uniform (95% of Cora's "
                    "nodes change distribution at test time); the same code separates classes on a 90-node toy "
                    "graph (tests/test_forward_gnn.py). Not part of the verdict.")
        budget_hit = [f"seed {r['seed']} layer {l['layer']} (best epoch {l['best_epoch']})"
                      for r in summary["sf"]["runs"] for l in r["layers"] if l["epochs"] >= a["epochs_per_layer"]]
        if budget_hit:
            why += (f" Some SF layers ran their full {a['epochs_per_layer']}-epoch budget, with the best epoch "
                    f"before the last: {', '.join(budget_hit)}.")
        results["verdict"], results["verdict_why"] = verdict, why
    if "resumed_from" in results:
        why += (f" The run resumed from {results['resumed_from']['file']} ({results['resumed_from']['runs']} finished "
                "runs kept, same arguments for them).")
    fig, axes = new_figure(1, 2, figsize=(9, 3.4))
    names = list(summary)
    axes[0].bar(names, [summary[n]["acc"] for n in names],
                yerr=[statistics.stdev([r["test_acc"] for r in summary[n]["runs"]]) if len(summary[n]["runs"]) > 1
                      else 0 for n in names], color="tab:blue")
    axes[0].set_ylabel("test accuracy")
    axes[0].set_title(f"{a['dataset']}: 4-layer GCN")
    axes[1].bar(names, [summary[n]["saved"] / 2**20 for n in names], color="tab:orange")
    axes[1].set_ylabel("saved activations per step (MiB)")
    axes[1].set_title("peak autograd-saved bytes")
    save_figure(fig, OUT / "forward_gnn.png")
    runtime = f"{results.get('elapsed_s', 0) / 60:.1f} min wall clock"
    if "resumed_from" in results:
        runtime += (f" for this invocation plus {(results['resumed_from'].get('elapsed_s') or 0) / 60:.1f} min for the "
                    "earlier partial run(s) whose finished runs it reused (`--resume`)")
    missing = [arm for arm in ARMS if arm not in summary]
    if missing:
        runtime += (f". Not run: {', '.join(missing)} (stopped for the session's time; "
                    "`--resume docs/results/forward_gnn.json` runs only what is missing)")
    runtime += "."
    cmd = ("nice -n 10 python benchmarks/forward_gnn.py " + " ".join(
        f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in a.items() if k != "render"))
    page = f"""# ForwardGNN: forward learning of a GCN stack vs backpropagation ({a['dataset']})

Claim (Park et al., "Forward Learning of Graph Neural Networks", ICLR 2024, arXiv 2403.11004; code
github.com/facebookresearch/forwardgnn): single-forward (SF) learning, each layer trained alone on its own loss
(cross-entropy of the nodes' similarity to one virtual node per class), reaches accuracy comparable to
backpropagation (BP) and uses less memory per step. Pass rule (the spec's): SF within about 2 points of BP test
accuracy (or better), per-layer accuracy rising with depth, and less memory per step.

Set-up: {a['dataset']} (PyG Planetoid, public split 140/500/1000, row-normalised features), the same
{a['layers']}-layer GCN stack (hidden {a['hidden']}, ReLU, no dropout) for every arm, full batch, Adam.
`bp`: end to end, cross-entropy, at most {a['bp_epochs']} epochs, early stopping after {a['patience']} epochs
without a better validation accuracy, best weights restored. `sf`: `ForwardGNN(learning="single_forward")`,
layers trained one after another, each at most {a['epochs_per_layer']} epochs with the same patience on its own
validation accuracy (best weights kept); prediction = sum over layers of the softmax similarity to the class
nodes. `sf_noedges`: the ablation with the virtual nodes not linked. `ff`: forward-forward with label appending
(goodness = sum of squares, θ = 2), at most {a['ff_epochs']} epochs per layer, patience {a['ff_patience']}, lr
{a['lrs'][0]:g} only (its inference needs one pass per class, so it is the most expensive arm here).
Tuning, alike for bp and sf: lr in {a['lrs']} (official 1e-3) on validation accuracy with seed
{a['seeds'][0]}: {tune}. Then seeds {a['seeds']} at each arm's chosen lr (the tuning run reused).
The ablation `sf_noedges` runs at sf's chosen lr and `ff` at {a['lrs'][0]:g}, seeds {a['ablation_seeds']} only
(time: they are the slowest runs on this shared machine), so they carry no std and do not enter the verdict.

Memory per step is measured, not modelled: the bytes of every tensor autograd saves for backward during one
training step (distinct storages, counted with `torch.autograd.graph.saved_tensors_hooks`; this is the activation
memory alive at the step's peak, just before `backward`), the maximum over all steps of the run. Beside it, the
parameter + gradient + Adam-state bytes of the layers that step updates (fp32). Peak RSS is not used: on a shared
CPU machine the allocator's caching makes it mostly noise at these sizes.

What was scaled down (2 shared cores, 1 thread): Cora only (the paper also uses CiteSeer, PubMed, Amazon, GitHub);
at most {a['epochs_per_layer']} epochs per layer and patience {a['patience']} (official 1000 and 100); a 2-point lr
grid; GCN layers only (the paper also runs SAGE and GAT).

Command (CPU, `torch.set_num_threads({a['threads']})`, {results.get('machine')}, torch {results.get('torch')}):

```bash
{cmd}
```

Runtime: {runtime}

## Results (test accuracy mean ± std over {len(a['seeds'])} seeds)

| arm | lr | test acc | val acc | saved activations / step (MiB) | params+grads+Adam of the updated layers (MiB) | steps | stopped early | per-layer test acc (layer 0..{a['layers'] - 1}) |
|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

![accuracy and memory](forward_gnn.png)

## Verdict: **{verdict}**

{why}
"""
    atomic_write_text(page, OUT / "forward_gnn.md")
    from lightning_ext.core.io import atomic_write_json
    atomic_write_json(results, OUT / "forward_gnn.json", indent=1)


if __name__ == "__main__":
    main()
