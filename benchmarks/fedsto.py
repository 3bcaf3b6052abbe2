"""FedSTO (Kim et al., NeurIPS 2023) on digit-canvas detection: server-only, naive SSFL, FedSTO, centralised.

Spec ``federated.md`` §2.10, the smallest CPU experiment: labelled MNIST-5k canvases at the server, unlabelled
scikit-learn-digit canvases (brighter background) at 2 clients; AP50 on client-domain test canvases at each arm's
best client-domain *validation* round; 3 seeds; premise check: the supervised detector reaches a clearly non-zero
AP50 on the server domain.

    .venv/bin/python benchmarks/fedsto.py            # runs what the JSON lacks, then renders the page
    .venv/bin/python benchmarks/fedsto.py --render-only
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import mean_std, page_main, pop_option, verdict_of  # noqa: E402

from lightning_ext.core.io import atomic_write_json  # noqa: E402

OUT = Path((pop_option("--json") or [str(Path(__file__).resolve().parents[1] / "docs" / "results" / "fedsto.json")])[0])
SEEDS = [int(s) for s in (pop_option("--seeds", many=True) or ["0", "1", "2"])]
ROUNDS = int((pop_option("--rounds") or ["12"])[0])
STAGE1 = int((pop_option("--stage1") or ["4"])[0])
WARMUP = int((pop_option("--warmup") or ["300"])[0])
SERVER_STEPS, CLIENT_STEPS, NUM_CLIENTS, BATCH = 10, 10, 2, 16
LR = float((pop_option("--lr") or ["5e-3"])[0])
THRESHOLD = float((pop_option("--threshold") or ["0.5"])[0])  # the spec's 0.5; a rerun of the SSFL arms at 0.3
SIZE_WEIGHT = float((pop_option("--size-weight") or ["1.0"])[0])
ORTHO = 1e-2
CANVASES = (300, 100, 200)  # per domain: train / val / test
ARMS = ["server-only", "naive SSFL", "FedSTO", "centralised (upper bound)"]
PROTOCOL = dict(rounds=ROUNDS, stage1_rounds=STAGE1, warmup_steps=WARMUP, server_steps=SERVER_STEPS,
                client_steps=CLIENT_STEPS, clients=NUM_CLIENTS, batch_size=BATCH, orthogonal_weight=ORTHO,
                canvases_per_domain=list(CANVASES), seeds=SEEDS, lr=LR, size_weight=SIZE_WEIGHT, ema_decay=0.95, pseudo_label_threshold=0.5,
                torch_threads=1)
COMMAND = "nice -n 10 .venv/bin/python benchmarks/fedsto.py" + (f" --threshold {THRESHOLD:g}" if THRESHOLD != 0.5 else "")


def _dm(domain: str, labelled: bool = True, **kw):
    from lightning_ext.detection.domain_canvas import DomainCanvasDetectionDataModule

    return DomainCanvasDetectionDataModule(domain, labelled=labelled, num_canvases=CANVASES, batch_size=BATCH, **kw)


def _model():
    from lightning_ext.federated.fedsto_module import FedSTODetector

    return FedSTODetector(lr=LR, size_weight=SIZE_WEIGHT, ema_decay=0.95, pseudo_label_threshold=THRESHOLD)


_EVAL: dict = {}


@torch.no_grad()
def ap50(arrays: dict, domain: str, split: str) -> float:
    """AP@0.5 (torchmetrics) of the global weights on a domain's validation or test canvases."""
    from torchmetrics.detection import MeanAveragePrecision

    if (domain, split) not in _EVAL:
        dm = _dm(domain)
        dm.setup()
        _EVAL[(domain, split)] = list(dm.val_dataloader() if split == "val" else dm.test_dataloader())
    model = _model()
    model.load_state_dict({**model.state_dict(), **arrays})
    model.eval()
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5], backend="pycocotools")
    for x, targets in _EVAL[(domain, split)]:
        metric.update(model.detect(x), [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    return max(0.0, float(metric.compute()["map"]))


_WARM: dict = {}
_PSEUDO: dict = {}  # pseudo-boxes per client image in each round (the clients' mean), by (seed, stage1, ortho)


def warm_start(seed: int) -> dict:
    """The server's supervised warm-up (``WARMUP`` steps on its labelled canvases), shared by every arm of a seed."""
    from lightning_ext.federated.fedsto import FedSTOClient

    if seed not in _WARM:
        warm = FedSTOClient(model=_model, datamodule=lambda i, n: _dm("mnist5k"), local_steps=WARMUP, seed=seed)
        _WARM[seed] = warm.train(warm.initial_arrays(), {"server-round": 0, "stage": 2}, None, 0, 1)[0]
    return copy.deepcopy(_WARM[seed])


def _supervised(domain: str, seed: int) -> tuple[list[float], dict, int]:
    """Server-only (``mnist5k``) or centralised (``both``): from the warm-up, ``ROUNDS`` chunks of the federated
    arms' per-round step count (a fresh optimizer, as the federated server's); client-domain val AP50 after each."""
    from lightning_ext.federated.fedsto import FedSTOClient

    per_round = SERVER_STEPS + NUM_CLIENTS * CLIENT_STEPS
    step = FedSTOClient(model=_model, datamodule=lambda i, n: _dm(domain), local_steps=per_round, seed=seed)
    arrays, state = warm_start(seed), None
    curve, snapshots = [ap50(arrays, "sklearn", "val")], {0: copy.deepcopy(arrays)}
    for r in range(1, ROUNDS + 1):
        arrays, _, state = step.train(arrays, {"server-round": r, "stage": 2}, state, 0, 1)
        curve.append(ap50(arrays, "sklearn", "val"))
        snapshots[r] = copy.deepcopy(arrays)
    return curve, snapshots, WARMUP + ROUNDS * per_round


def _federated(seed: int, stage1: int, ortho: float) -> tuple[list[float], dict, int]:
    """A FedSTO federation (``stage1=0, ortho=0``: naive SSFL); client-domain val AP50 after warm-up and each round."""
    from lightning_ext.federated.fedsto import FedSTOClient, fedsto_fedavg
    from lightning_ext.federated.simulation import FederatedSimulation

    client = FedSTOClient(model=_model, datamodule=lambda i, n: _dm("sklearn", False, partition_id=i, num_clients=n),
                          local_steps=CLIENT_STEPS, seed=seed)
    strategy = fedsto_fedavg(_model, lambda: _dm("mnist5k"), stage1_rounds=stage1, server_steps=SERVER_STEPS,
                             warmup_steps=0, orthogonal_weight=ortho, seed=seed, fraction_evaluate=0.0,
                             min_train_nodes=NUM_CLIENTS, min_available_nodes=NUM_CLIENTS)
    snapshots: dict = {}

    def evaluate(r: int, arrays: dict) -> dict:
        snapshots[r] = copy.deepcopy(arrays)
        return {"val_ap50": ap50(arrays, "sklearn", "val")}

    sim = FederatedSimulation(client, NUM_CLIENTS, ROUNDS, strategy, evaluate_fn=evaluate, seed=seed, progress=False)
    sim.fit(warm_start(seed))
    curve = [h["server/val_ap50"] for h in sim.history if "server/val_ap50" in h]
    _PSEUDO[(seed, stage1, ortho)] = [h.get("train/train_pseudo_boxes") for h in sim.history if h["round"] > 0]
    return curve, snapshots, WARMUP + ROUNDS * (SERVER_STEPS + NUM_CLIENTS * CLIENT_STEPS)


def main_runs(data: dict) -> None:
    runs = data.setdefault("runs", {})
    for seed in SEEDS:
        for arm in ARMS:
            key = f"{arm}|{seed}"
            if THRESHOLD != 0.5:  # the supervised arms do not use the threshold: rerun only the SSFL arms
                if arm not in ("naive SSFL", "FedSTO"):
                    continue
                key = f"{arm} (threshold {THRESHOLD:g})|{seed}"
            if key in runs:
                continue
            if arm == "naive SSFL":
                data.setdefault("warm_max_scores", {})[str(seed)] = max_scores(warm_start(seed))
            t0 = time.time()
            if arm == "server-only":
                curve, snaps, steps = _supervised("mnist5k", seed)
            elif arm == "centralised (upper bound)":
                curve, snaps, steps = _supervised("both", seed)
            elif arm == "naive SSFL":
                curve, snaps, steps = _federated(seed, 0, 0.0)
            else:
                curve, snaps, steps = _federated(seed, STAGE1, ORTHO)
            valid = [(v, r) for r, v in enumerate(curve) if v is not None]
            best_val, best = max(valid, key=lambda t: (t[0], -t[1]))
            run = {"val_curve": curve, "best_round": best, "last_round": len(curve) - 1, "best_val_ap50": best_val,
                   "test_ap50": ap50(snaps[best], "sklearn", "test"), "steps": steps, "samples": steps * BATCH,
                   "seconds": round(time.time() - t0, 1)}
            if arm == "server-only":  # the premise: a clearly non-zero AP50 on the server's own domain
                run["server_domain_test_ap50"] = ap50(snaps[best], "mnist5k", "test")
            if arm in ("naive SSFL", "FedSTO"):
                run["pseudo_boxes"] = _PSEUDO[(seed, STAGE1 if arm == "FedSTO" else 0, ORTHO if arm == "FedSTO" else 0.0)]
            runs[key] = run
            atomic_write_json(data, OUT, indent=1)
            print(f"{key}: best round {best}, val {best_val:.3f}, test {run['test_ap50']:.3f}, {run['seconds']} s",
                  flush=True)
    if THRESHOLD == 0.5:
        diagnostic_runs(data)


@torch.no_grad()
def max_scores(arrays: dict) -> list[float]:
    """Quartiles and maximum of the per-canvas highest score of a model on the client-domain validation canvases."""
    model = _model()
    model.load_state_dict({**model.state_dict(), **arrays})
    model.eval()
    ap50(arrays, "sklearn", "val")  # loads the canvases
    best = torch.cat([torch.sigmoid(model(x)[:, :10]).flatten(1).max(1).values for x, _ in _EVAL[("sklearn", "val")]])
    return [round(float(q), 3) for q in torch.quantile(best, torch.tensor([0.25, 0.5, 0.75, 1.0]))]


def diagnostic_runs(data: dict) -> None:
    """Pseudo-boxes per client image per round for seed 0's naive SSFL and FedSTO (the first run did not record
    them; a rerun of the same seeded federations)."""
    diag = data.setdefault("pseudo_box_diagnostic", {})
    for arm, stage1, ortho in (("naive SSFL", 0, 0.0), ("FedSTO", STAGE1, ORTHO)):
        if arm in diag or "pseudo_boxes" in data["runs"].get(f"{arm}|0", {}):
            continue
        curve, _, _ = _federated(0, stage1, ortho)
        diag[arm] = {"pseudo_boxes": _PSEUDO[(0, stage1, ortho)], "val_curve": curve}
        atomic_write_json(data, OUT, indent=1)


def _arm_runs(data: dict, arm: str) -> list[dict]:
    return [data["runs"][k] for k in sorted(data.get("runs", {})) if k.split("|")[0] == arm]


RERUN = ("naive SSFL (threshold 0.3)", "FedSTO (threshold 0.3)")


def render(data: dict):
    arms = ARMS + [a for a in RERUN if _arm_runs(data, a)]
    res = {arm: _arm_runs(data, arm) for arm in arms}
    test = {a: [r["test_ap50"] for r in res[a]] for a in arms}

    def mean(a: str) -> float:
        return statistics.mean(test[a]) if test[a] else float("nan")

    def last_is_best(a: str) -> bool:  # the mean validation curve peaks at the last round
        curves = [r["val_curve"] for r in res[a]]
        if not curves:
            return True
        avg = [statistics.mean(c[i] for c in curves) for i in range(len(curves[0])) if curves[0][i] is not None]
        return avg.index(max(avg)) == len(avg) - 1

    def pseudo_max(*names: str) -> float:
        values = [v for a in names for r in res.get(a, []) for v in r.get("pseudo_boxes", []) if v is not None]
        values += [v for a in names for v in data.get("pseudo_box_diagnostic", {}).get(a, {}).get("pseudo_boxes", [])]
        return max(values) if values else 0.0

    premise = [r.get("server_domain_test_ap50", 0.0) for r in res["server-only"]]
    premise_ok = bool(premise) and statistics.mean(premise) >= 0.2

    warm_tops = {k: v[-1] for k, v in sorted(data.get("warm_max_scores", {}).items())}  # per seed
    warm_top = min(warm_tops.values(), default=None)

    def claims_of(fed: str, naive: str, label: str, threshold: float) -> list:
        out = []
        for name, other, margin in ((f"FedSTO >= naive SSFL + 2 AP50 ({label})", naive, 0.02),
                                    (f"FedSTO >= server-only ({label})", "server-only", 0.0)):
            if not premise_ok:
                out.append((name, None, "premise failed"))
                continue
            if len(res.get(fed, [])) < len(SEEDS) or len(res[other]) < len(SEEDS):
                out.append((name, None, "inconclusive: not every seed ran"))
                continue
            if (warm_top < threshold) if warm_top is not None else (pseudo_max(fed, naive) < 0.05):
                low = ", ".join(k for k, v in warm_tops.items() if v < threshold)
                out.append((name, None, f"not testable: in seed(s) {low} the first teacher's highest score on every "
                                        f"client validation canvas stays below the threshold {threshold:g} (per-seed "
                                        f"maxima {warm_tops}): those clients get no pseudo-labels and both SSFL arms "
                                        "train on empty targets"))
                continue
            if last_is_best(fed) or last_is_best(other):
                out.append((name, None, "inconclusive: a mean validation curve peaks at its last round"))
                continue
            gaps = [a - b for a, b in zip(test[fed], test[other])]  # paired by seed (sorted keys: same order)
            mean_gap = statistics.mean(gaps)
            seeds = ", ".join(f"{100 * g:+.1f}" for g in gaps)
            why = f"mean paired gap {100 * mean_gap:+.1f} AP50 points (seeds: {seeds}); needs >= {100 * margin:+.1f}"
            if mean_gap >= margin and all(g >= margin for g in gaps):
                out.append((name, True, why))
            elif mean_gap < margin and all(g < margin for g in gaps):
                out.append((name, False, why))
            else:
                out.append((name, None, "inconclusive: the per-seed gaps fall on both sides of the bar; " + why))
        return out

    spec_claims = claims_of("FedSTO", "naive SSFL", "threshold 0.5", 0.5)
    rerun_claims = claims_of(*RERUN, "threshold 0.3", 0.3) if all(res.get(a) for a in RERUN) else []
    claims = rerun_claims or spec_claims  # the verdict: the rerun where the spec's threshold gave no pseudo-labels
    all_claims = spec_claims + rerun_claims
    verdict = verdict_of(claims)
    rows = []
    for a in arms:
        if not res[a]:
            rows.append(f"| {a} | not run | | | | | |")
            continue
        rows.append(f"| {a} | {mean_std(test[a], 3)} | {mean_std([r['best_val_ap50'] for r in res[a]], 3)} | "
                    f"{', '.join(str(r['best_round']) for r in res[a])} of {res[a][0]['last_round']} | "
                    f"{mean_std([r['val_curve'][-1] for r in res[a]], 3)} | "
                    f"{res[a][0]['steps']} steps / {res[a][0]['samples']} samples | "
                    f"{statistics.mean(r['seconds'] for r in res[a]):.0f} |")
    diag = {**{a: v for a, v in data.get("pseudo_box_diagnostic", {}).items()},
            **{a: res[a][0] for a in ("naive SSFL", "FedSTO", *RERUN) if res.get(a) and "pseudo_boxes" in res[a][0]}}
    pseudo = "\n".join(f"- {a} (seed 0): " + ", ".join("-" if v is None else f"{v:.2f}" for v in d["pseudo_boxes"])
                       for a, d in diag.items()) or "- not recorded"
    claim_lines = "\n".join(f"- {n}: {'holds' if c else 'fails' if c is False else 'undecided'} ({why})"
                            for n, c, why in all_claims)
    warm = [r["val_curve"][0] for r in res["server-only"]]
    page = PAGE.format(command=COMMAND, protocol=PROTOCOL, rows="\n".join(rows), claims=claim_lines, verdict=verdict,
                       premise=mean_std(premise, 3) if premise else "not run", machine=data["meta"]["machine"],
                       warm=mean_std(warm, 3) if warm else "not run", pseudo=pseudo,
                       commands="; ".join(f"`{c}`" for c in data["meta"]["commands"]),
                       scores="; ".join(f"seed {k}: {v}" for k, v in sorted(data.get("warm_max_scores", {}).items()))
                       or "not recorded")
    return page, res, verdict


def plot(data: dict, res: dict, path: Path) -> None:
    from lightning_ext.core.plotting import new_figure, save_figure

    fig, ax = new_figure(figsize=(6, 4))
    for arm in res:
        curves = [r["val_curve"] for r in res[arm]]
        if not curves:
            continue
        xs = [i for i in range(len(curves[0])) if curves[0][i] is not None]
        ax.plot(xs, [statistics.mean(c[i] for c in curves) for i in xs], marker="o", ms=3, label=arm)
    ax.axvline(STAGE1 + 0.5, color="grey", ls=":", lw=1)
    ax.set_xlabel("round (0: after the server's warm-up)")
    ax.set_ylabel("client-domain val AP50 (mean over seeds)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


PAGE = """# FedSTO: semi-supervised federated detection on digit canvases

Spec `federated.md` §2.10; paper: Kim et al., "Navigating Data Heterogeneity in Federated Learning: A
Semi-Supervised Federated Object Detection", NeurIPS 2023. The official repository (github.com/Kthyeon/ssfod)
holds only data scripts, so the stage schedule, the regulariser's form and weight, the EMA decay and the
pseudo-label threshold here are **Proposed**, not checked against code or the PDF.

**Verdict: {verdict}**

Commands, in order: {commands} (one process, `torch.set_num_threads(1)`, niced, on a shared 2-core machine; {machine}).

## Set-up
- Task: 64x64 canvases with 1-3 real digits (boxes and classes; the scenes are synthetic compositions, the digits
  real). Server: 300 labelled MNIST-5k canvases (black background). Clients: 2 x 150 *unlabelled*
  scikit-learn-digit canvases (8x8 digits upsampled, background 0.3). Validation (100) and test (200) canvases of
  the client domain; selection on validation only.
- Detector: `FedSTODetector`, a tiny CenterNet (about 80 k parameters, stride 8), Adam, batch 16 (lr and size
  weight in the budget line; lr 5e-3 and size weight 1 were chosen on server-domain validation AP50 in two
  400-600-step probes of the supervised detector before this run, shared by every arm).
- Arms: **server-only** (supervised on the server's data); **naive SSFL** (FedAvg of all parameters with
  local-EMA pseudo-labels from round 1, server fine-tuning each round); **FedSTO** (stage 1: backbone-only client
  training and averaging for the first rounds, then stage 2: full training with the orthogonality regulariser,
  lambda = 1e-2); **centralised** (supervised on both domains' labels, the upper bound). Every arm of a seed
  starts from the same server warm-up (round 0, supervised on the server's labels) and gets the same gradient
  steps per round (server-only and centralised: all of them on their labelled data), with a fresh optimizer.
- Budget (reduced from the spec's 10 + 20 rounds to fit about 15 core-minutes on a loaded machine):
  `{protocol}`.
- The two semi-supervised arms also ran with pseudo-label threshold 0.3 (`--threshold 0.3`, rows marked so; the
  supervised arms do not use it), after the first run showed that no teacher score reaches the spec's 0.5.
- Tuning: none for any arm (alike: one shared optimiser setting; no official defaults exist for this detector);
  each seed's test AP50 is taken at its best validation round.

## Results (client-domain test AP50 at the best validation round; mean ± std over seeds)

| arm | test AP50 | best val AP50 | best round (per seed) | val AP50 at the last round | budget | seconds per run |
|---|---|---|---|---|---|---|
{rows}

Premise check (server-only detector, MNIST-5k test canvases, AP50): {premise} (clearly non-zero needs >= 0.2).
The warm start every arm shares (round 0) scores {warm} val AP50 on the *client* domain: this detector is the
first teacher of the clients' pseudo-labels. Its highest heatmap score per client validation canvas (quartiles
and maximum; recorded during the threshold-0.3 rerun): {scores}.

Claims (spec: FedSTO >= naive SSFL + 2 AP50 points and >= server-only), paired by seed: a claim *holds* when
the mean gap and every seed's gap clear the bar, *fails* when the mean and every seed fall short, and is
*inconclusive* when the seeds fall on both sides (the rule of the FroSSL page: seed noise larger than the gap):
{claims}

Pseudo-boxes per client image on the *last* training batch of each round (the clients' mean; the canvases hold
1-3 digits, about 1.9 on average; 0 means the local EMA teacher emits nothing by the end of the round):
{pseudo}

![validation AP50 per round](fedsto.png)

## What this shows
- The spec's premise holds: the supervised detector reaches a clearly non-zero AP50 on the server's domain. A
  second premise, which any pseudo-label method needs, fails: the server-trained first teacher hardly detects in
  the clients' domain. Its highest heatmap score on the client canvases (line above) stays below the spec's
  threshold 0.5 in every recorded seed, so the clients get no pseudo-labels; both semi-supervised arms then
  train on empty targets (background only) and fall towards zero validation AP50 (the last-round column). A gap
  between FedSTO and naive SSFL measures how fast each forgets, not what the paper claims.
- The threshold-0.3 rerun of the two semi-supervised arms (0.3 is CenterNet's own display threshold, picked
  after the first run showed no pseudo-labels and before any teacher score or AP of the rerun was seen; applied
  alike to both arms) gives the first teacher boxes in seeds 0 and 2; in seed 1 no canvas reaches 0.3 either, and
  that seed's rerun is identical to its threshold-0.5 run (which also shows that the runs are deterministic
  across processes). Even where the first teacher emits boxes, the local EMA teacher emits none by the end of
  each round (last-batch counts above). So the claims stay untested at both thresholds.
- The task itself is learnable at this size: with the clients' labels (centralised) the detector climbs every
  round and is still improving at the last one (its number is a lower bound on the upper bound), while
  supervision on the server's domain alone transfers poorly (server-only).
- A fair test needs a first teacher that already detects in the clients' domain: a smaller domain gap (for
  example the same background) or a stronger detector and a longer warm-up than about 15 core-minutes allow.
- Server-only's seconds include the warm-up every arm of the seed shares.

## What this does not show
- The paper's scale (YOLOv5, BDD100K / SODA10M / Cityscapes weather domains, 100k unlabelled images) and its
  numbers; the spec's 30 rounds (run here: the budget line above).
- Any tuning of FedSTO's own knobs (stage split, lambda, EMA decay, threshold): Proposed values, not searched.
"""


if __name__ == "__main__":
    page_main(OUT, "fedsto", PROTOCOL, COMMAND, main_runs, render, plot)
