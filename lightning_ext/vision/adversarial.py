"""L∞ FGSM and PGD attacks and the transfer of adversarial examples between two classifiers (e.g. a dynamic
network and its static twin).

- FGSM (Goodfellow, Shlens and Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015):
  ``x' = clip(x + ε · sign(∇_x L(x, y)))``.
- PGD (Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks", ICLR 2018; reference
  implementation torchattacks ``PGD``, https://github.com/Harry24k/adversarial-attacks-pytorch):
  ``x_0 = clip(x + U(−ε, ε))`` (random start), ``x_{i+1} = clip(Π_ε(x_i + α · sign(∇ L(x_i, y))))`` with the
  projection ``Π_ε`` onto the ε-ball around ``x`` and ``clip`` to the valid input range.
- Transfer (Haque and Yang, arXiv 2308.08709, research question 1): craft on a source model, count how many of the
  examples that fool the source also fool the target. For a multi-exit source the loss is taken at the exit each
  example leaves at (routing held fixed: ``"taken"``), at the final exit (``"final"``) or summed over all exits
  (``"sum"``); the paper's choice is not stated in what we could read, so all three are offered.
"""

from __future__ import annotations

import time
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_ext.core.validation import check_choice, check_number, check_positive_int

__all__ = ["SourceLoss", "attack_loss_fn", "fgsm", "pgd", "transfer_attack"]

SourceLoss = Literal["taken", "final", "sum"]
LossFn = Callable[[Tensor, Tensor], Tensor]


def attack_loss_fn(model: nn.Module, source_loss: str = "taken") -> LossFn:
    """``(x, y) -> summed cross-entropy`` of ``model``; for a multi-exit model (``forward_exits``) at the exit taken,
    the final exit or summed over exits."""
    check_choice("source_loss", source_loss, ("taken", "final", "sum"))
    exits = getattr(model, "forward_exits", None)
    if exits is None or source_loss == "taken":
        return lambda x, y: F.cross_entropy(model(x), y, reduction="sum")
    if source_loss == "final":
        return lambda x, y: F.cross_entropy(exits(x)[-1], y, reduction="sum")
    return lambda x, y: sum(F.cross_entropy(z, y, reduction="sum") for z in exits(x))


def _clip(x: Tensor, low: Optional[float], high: Optional[float]) -> Tensor:
    return x if low is None and high is None else x.clamp(low, high)


def _check(eps: float, low: Optional[float], high: Optional[float]) -> None:
    check_number("epsilon", eps, low=0, low_open=True)
    if low is not None and high is not None and not low < high:
        raise ValueError(f"the input range needs clamp_min < clamp_max; got {low} and {high}")


def fgsm(loss_fn: LossFn, x: Tensor, y: Tensor, epsilon: float, clamp_min: Optional[float] = 0.0,
         clamp_max: Optional[float] = 1.0) -> Tensor:
    """One signed-gradient step of size ε, clipped to ``[clamp_min, clamp_max]``.

    Example:
        >>> model = nn.Linear(4, 2)
        >>> x = torch.full((3, 4), 0.5)
        >>> adv = fgsm(attack_loss_fn(model), x, torch.tensor([0, 1, 0]), epsilon=0.1)
        >>> bool(((adv - x).abs() <= 0.1 + 1e-6).all())
        True
    """
    _check(epsilon, clamp_min, clamp_max)
    x_adv = x.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_fn(x_adv, y), x_adv)
    return _clip(x.detach() + epsilon * grad.sign(), clamp_min, clamp_max).detach()


def pgd(loss_fn: LossFn, x: Tensor, y: Tensor, epsilon: float, steps: int = 10, step_size: Optional[float] = None,
        random_start: bool = True, clamp_min: Optional[float] = 0.0, clamp_max: Optional[float] = 1.0,
        predict: Optional[Callable[[Tensor], Tensor]] = None,
        generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """L∞ PGD; returns the adversarial examples and, per example, the first step count at which ``predict``
    (logits) misclassified it (``steps + 1`` if never; ``-1`` for all when ``predict`` is None). A successful
    example keeps being updated (plain PGD: the returned ``x'`` is the last iterate).

    Example:
        >>> model = nn.Linear(4, 2)
        >>> x, y = torch.rand(8, 4), torch.randint(0, 2, (8,))
        >>> adv, first = pgd(attack_loss_fn(model), x, y, epsilon=0.05, steps=3, predict=model)
        >>> bool(((adv - x).abs() <= 0.05 + 1e-6).all()), first.shape
        (True, torch.Size([8]))
    """
    _check(epsilon, clamp_min, clamp_max)
    check_positive_int("steps", steps)
    alpha = epsilon / 4 if step_size is None else step_size
    check_number("step_size", alpha, low=0, low_open=True)
    x = x.detach()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device) * 2 - 1
        x_adv = _clip(x + epsilon * noise, clamp_min, clamp_max)
    else:
        x_adv = x.clone()
    first = torch.full((len(x),), steps + 1 if predict is not None else -1, dtype=torch.long, device=x.device)
    for i in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(x_adv, y), x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = _clip(torch.min(torch.max(x_adv, x - epsilon), x + epsilon), clamp_min, clamp_max).detach()
        if predict is not None:
            with torch.no_grad():
                fooled = predict(x_adv).argmax(-1) != y
            first = torch.where(fooled & (first > steps), torch.full_like(first, i + 1), first)
    return x_adv, first


@torch.no_grad()
def _exits_taken(model: nn.Module, x: Tensor) -> Optional[Tensor]:
    fn = getattr(model, "exit_and_logits", None)
    return fn(x)[0] if fn is not None else None


def transfer_attack(source: nn.Module, target: nn.Module, x: Tensor, y: Tensor, attack: str = "pgd",
                    epsilon: float = 0.1, steps: int = 10, step_size: Optional[float] = None,
                    random_start: bool = True, source_loss: str = "taken", clamp_min: Optional[float] = 0.0,
                    clamp_max: Optional[float] = 1.0, batch_size: int = 256,
                    generator: Optional[torch.Generator] = None,
                    flops_fraction: Optional[list[float]] = None) -> dict:
    """Craft adversarial examples on ``source`` for the examples both models classify correctly; report
    ``white_box_success`` (share that fool the source), ``transfer_success`` (share of those that also fool the
    target), ``n`` (examples attacked), ``attack_seconds``, ``steps_to_success`` (PGD: mean first step that fooled
    the source, over the successful ones) and, for a multi-exit target, its mean exit and FLOPs fraction on clean
    and adversarial inputs. Both models are put in eval mode (and restored).

    Example:
        >>> a, b = nn.Linear(4, 2), nn.Linear(4, 2)
        >>> r = transfer_attack(a, b, torch.rand(16, 4), torch.randint(0, 2, (16,)), epsilon=0.3, steps=2)
        >>> {"n", "white_box_success", "transfer_success"} <= set(r)
        True
    """
    check_choice("attack", attack, ("pgd", "fgsm"))
    check_positive_int("batch_size", batch_size)
    if len(x) != len(y) or not len(x):
        raise ValueError(f"transfer_attack needs as many labels as inputs, at least one; got {len(x)} and {len(y)}")
    modes = [(m, m.training) for m in (source, target)]
    source.eval()
    target.eval()
    try:
        with torch.no_grad():
            keep = torch.cat([(source(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size])
                              & (target(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size])
                              for i in range(0, len(x), batch_size)])
        x, y = x[keep], y[keep]
        loss_fn = attack_loss_fn(source, source_loss)
        advs, firsts, start = [], [], time.perf_counter()
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            if attack == "fgsm":
                advs.append(fgsm(loss_fn, xb, yb, epsilon, clamp_min, clamp_max))
            else:
                adv, first = pgd(loss_fn, xb, yb, epsilon, steps, step_size, random_start, clamp_min, clamp_max,
                                 predict=source, generator=generator)
                advs.append(adv)
                firsts.append(first)
        seconds = time.perf_counter() - start
        if not len(x):
            return {"n": 0, "white_box_success": float("nan"), "transfer_success": float("nan"),
                    "attack_seconds": seconds}
        adv = torch.cat(advs)
        with torch.no_grad():
            fooled_source = torch.cat([source(adv[i:i + batch_size]).argmax(-1) != y[i:i + batch_size]
                                       for i in range(0, len(x), batch_size)])
            fooled_target = torch.cat([target(adv[i:i + batch_size]).argmax(-1) != y[i:i + batch_size]
                                       for i in range(0, len(x), batch_size)])
        n_src = int(fooled_source.sum())
        report = {
            "n": len(x), "white_box_success": n_src / len(x),
            "transfer_success": float((fooled_source & fooled_target).sum()) / n_src if n_src else float("nan"),
            "target_fooled_any": float(fooled_target.float().mean()), "attack_seconds": seconds,
        }
        if firsts:
            first = torch.cat(firsts)
            ok = first <= steps
            report["steps_to_success"] = float(first[ok].float().mean()) if bool(ok.any()) else float("nan")
        clean_exit = _exits_taken(target, x)
        if clean_exit is not None:
            adv_exit = _exits_taken(target, adv)
            report["target_exit_clean"], report["target_exit_adv"] = float(clean_exit.float().mean()), \
                float(adv_exit.float().mean())
            if flops_fraction is not None:
                ff = torch.tensor(flops_fraction)
                report["target_flops_clean"] = float(ff[clean_exit.cpu()].mean())
                report["target_flops_adv"] = float(ff[adv_exit.cpu()].mean())
        return report
    finally:
        for m, flag in modes:
            m.train(flag)
