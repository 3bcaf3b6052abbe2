"""Controls and diagnostics of the FTWT benchmark (``benchmarks/fire_together_wire_together.py``): evaluation with
gate overrides, the static uniform gate matched to FTWT's MACs, gate statistics, and the predictability of the
heat-map targets from the predictors' own input (why a predictor learns static gates)."""

from __future__ import annotations

import torch
from lightning.pytorch import Callback
from torch import nn
from torch.nn import functional as F

from lightning_ext.compression.ftwt import FTWTGating, mass_targets


class BestFrom(Callback):
    """Keeps the weights of the best validation epoch among epochs >= ``first`` and restores them at the end;
    stops after ``patience`` epochs (counted from ``first``) without a better validation accuracy."""

    def __init__(self, first: int, patience: int) -> None:
        self.first, self.patience = first, patience
        self.best, self.best_epoch, self.state, self.history = -1.0, -1, None, []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        acc = float(trainer.callback_metrics["val_acc"])
        self.history.append(acc)
        epoch = trainer.current_epoch
        if epoch >= self.first and acc > self.best:
            self.best, self.best_epoch = acc, epoch
            self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        elif epoch >= self.first and epoch - max(self.best_epoch, self.first - 1) >= self.patience:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module):
        if self.state is not None:
            pl_module.load_state_dict(self.state)


@torch.no_grad()
def evaluate(model, gating: FTWTGating, loader, override=None) -> dict:
    """Accuracy and mean dynamic MACs of the gated convs over ``loader`` (eval mode), with an optional gate override."""
    model.eval()
    gating.recording, gating.measuring, gating.override = False, True, override
    gating.reset_stats()
    correct = total = 0
    for x, y in loader:
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    summary = gating.summary()
    gating.override, gating.measuring = None, False
    return {"acc": correct / total, "macs": summary["macs"], "dense_macs": summary["dense_macs"],
            "reduction": summary["macs_reduction"], "keep": summary["keep"]}


@torch.no_grad()
def gate_statistics(model, gating: FTWTGating, loader) -> tuple[dict, dict]:
    """Per layer: the share of channels whose predicted gate is input-dependent (on for 5-95% of the samples)
    and the mean per-sample Hamming distance to the layer's majority gate, as shares of the channels; and the
    :func:`evaluate` result of the same pass."""
    seen: dict[str, list[torch.Tensor]] = {}

    def capture(key, logits, act):
        gate = (logits > 0).float()
        seen.setdefault(key, []).append(gate)
        return gate

    result = evaluate(model, gating, loader, capture)
    out = {}
    for key, gates in seen.items():
        g = torch.cat(gates)
        rate = g.mean(0)
        majority = (rate > 0.5).float()
        out[key] = {"input_dependent": float(((rate > 0.05) & (rate < 0.95)).float().mean()),
                    "hamming_to_majority": float((g != majority).float().mean())}
    return out, result


@torch.no_grad()
def channel_scores(model, loader, batches: int) -> dict[str, torch.Tensor]:
    """Mean heat-map score (spatial max of the ReLU'd BN output) per channel of every BN, dense model, eval mode."""
    sums: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            def hook(mod, a, out, name=name):
                s = out.relu().amax(dim=(2, 3)).sum(0)
                sums[name] = sums.get(name, 0) + s
            handles.append(m.register_forward_hook(hook))
    model.eval()
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        model(x)
    for h in handles:
        h.remove()
    return sums


def static_masks(gating: FTWTGating, scores: dict, keep: float) -> dict[str, torch.Tensor]:
    masks = {}
    for conv, bn in gating.pairs:
        s = scores[bn.removeprefix("net.")] if bn.removeprefix("net.") in scores else scores[bn]
        k = max(1, round(keep * s.numel()))
        m = torch.zeros(s.numel())
        m[torch.topk(s, k).indices] = 1.0
        masks[gating.keys[conv]] = m
    return masks


def match_static(model, gating, scores, loader, target_macs: float) -> tuple[float, dict]:
    """Bisection on the keep share so the static gate's mean MACs on ``loader`` meet ``target_macs``."""
    lo, hi = 0.0, 1.0
    best = (1.0, None, float("inf"))
    for _ in range(10):
        mid = (lo + hi) / 2
        masks = static_masks(gating, scores, mid)
        res = evaluate(model, gating, loader, lambda key, logits, act, masks=masks: masks[key].expand_as(logits))
        if abs(res["macs"] - target_macs) < abs(best[2] - target_macs):
            best = (mid, masks, res["macs"])
        if res["macs"] > target_macs:
            hi = mid
        else:
            lo = mid
    return best[0], best[1]


@torch.no_grad()
def _collect(model, gating: FTWTGating, loader, r: float) -> dict[str, dict[str, torch.Tensor]]:
    """Per gated layer over ``loader`` (the learned gates applied): the predictor's own input features
    (softmax over the channels of the pooled layer input), the heat-map mass targets at ``r`` and the gates."""
    feats: dict[str, list] = {}
    rows: dict[str, dict[str, list]] = {}
    handles = []
    for conv, _ in gating.pairs:
        key = gating.keys[conv]

        def pre(mod, args, key=key):
            feats.setdefault(key, []).append(torch.softmax(args[0].mean(dim=(2, 3)), dim=1))
        handles.append(gating.model.get_submodule(conv).register_forward_pre_hook(pre))

    def capture(key, logits, act):
        gate = (logits > 0).float()
        row = rows.setdefault(key, {"target": [], "gate": []})
        row["target"].append(mass_targets(act, r).float())
        row["gate"].append(gate)
        return gate

    try:
        evaluate(model, gating, loader, capture)
    finally:
        for h in handles:
            h.remove()
    return {k: {"x": torch.cat(feats[k]), "target": torch.cat(v["target"]), "gate": torch.cat(v["gate"])}
            for k, v in rows.items()}


def _fit_logistic(x: torch.Tensor, y: torch.Tensor, steps: int = 400, seed: int = 0) -> nn.Linear:
    """The predictor's function class (a linear map with bias of its input features) fitted to the targets by
    full-batch Adam on standardised features (an affine change of the input: the same class, better conditioned)."""
    torch.manual_seed(seed)
    lin = nn.Linear(x.shape[1], y.shape[1])
    opt = torch.optim.Adam(lin.parameters(), lr=0.05)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.binary_cross_entropy_with_logits(lin(x), y).backward()
            opt.step()
    return lin


def predictability(model, gating: FTWTGating, train_loader, val_loader, r: float) -> dict:
    """How much of the heat-map targets a predictor *could* predict from its input, against what it did.

    Per layer on validation (targets and features measured with the learned gates applied upstream):
    ``target_input_dependent`` (share of channels whose target is 1 for 5-95% of the images), and the agreement
    with the targets (share of channel x image entries) of the learned gates, of the best static gate (each
    channel's majority target on the training images) and of the best predictor of the same form fitted to the
    training images' targets (:func:`_fit_logistic`). ``pooled`` weighs the layers by channels."""
    tr, va = _collect(model, gating, train_loader, r), _collect(model, gating, val_loader, r)
    out, tot = {}, {"n": 0.0, "learned": 0.0, "static": 0.0, "fitted": 0.0, "dep": 0.0, "ch": 0.0}
    for key in va:
        xt, yt, xv, yv = tr[key]["x"], tr[key]["target"], va[key]["x"], va[key]["target"]
        mu, sd = xt.mean(0), xt.std(0) + 1e-8
        lin = _fit_logistic((xt - mu) / sd, yt)
        with torch.no_grad():
            fitted = (lin((xv - mu) / sd) > 0).float()
        majority = (yt.mean(0) > 0.5).float().expand_as(yv)
        rate = yv.mean(0)
        row = {"channels": yv.shape[1], "in_features": xv.shape[1],
               "target_input_dependent": float(((rate > 0.05) & (rate < 0.95)).float().mean()),
               "target_keep": float(yv.mean()),
               "learned": float((va[key]["gate"] == yv).float().mean()),
               "static": float((majority == yv).float().mean()),
               "fitted": float((fitted == yv).float().mean()),
               "fitted_input_dependent": float((((r_ := fitted.mean(0)) > 0.05) & (r_ < 0.95)).float().mean())}
        out[key] = row
        n = yv.numel()
        for name in ("learned", "static", "fitted"):
            tot[name] += row[name] * n
        tot["n"] += n
        tot["dep"] += row["target_input_dependent"] * yv.shape[1]
        tot["ch"] += yv.shape[1]
    out["pooled"] = {"learned": tot["learned"] / tot["n"], "static": tot["static"] / tot["n"],
                     "fitted": tot["fitted"] / tot["n"], "target_input_dependent": tot["dep"] / tot["ch"]}
    return out
