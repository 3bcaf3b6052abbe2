"""``SubnetSampling``: a callback that trains a weight-sharing supernet one sampled sub-network (or a sandwich of
them) per step, seeded by ``(seed, global_step)``."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from typing_extensions import override

from lightning_ext.core.step_wrapper import FitStepWrapping, loss_of, with_loss
from lightning_ext.core.validation import PositiveInt, check_choice, check_number, check_positive_int

__all__ = ["ELASTIC", "SubnetSampling", "check_subnet", "find_supernet", "sample_subnets"]

ELASTIC = ("depth", "width", "kernel")
_KEYS = ("depth", "channels", "widths", "kernels", "catconv")


def find_supernet(pl_module: Any, supernet: Optional[str], who: str) -> Any:
    """The supernet inside ``pl_module``: the attribute path ``supernet`` (``"net"``, ``"model.encoder"``), or the
    only submodule with an ``active`` sub-network and ``sample_config`` (e.g.
    :class:`~lightning_ext.audio.efficient_tdnn.EfficientTDNN`)."""
    if supernet is not None:
        obj = pl_module
        for part in supernet.split("."):
            if not hasattr(obj, part):
                raise ValueError(f"{who}: {type(pl_module).__name__} has no attribute {supernet!r}; set `supernet` "
                                 "to the attribute path of the supernet (e.g. 'net'), or None to find it.")
            obj = getattr(obj, part)
        found = [obj]
    else:
        found = [m for m in pl_module.modules() if hasattr(m, "sample_config") and hasattr(m, "largest_config")]
    if len(found) != 1 or not (hasattr(found[0], "sample_config") and hasattr(found[0], "active")):
        raise ValueError(f"{who} needs exactly one supernet (a module with `active` and `sample_config`, such as "
                         f"EfficientTDNN) in {type(pl_module).__name__}, found {len(found)}; set `supernet` to its "
                         "attribute path.")
    return found[0]


def check_subnet(net: Any, config: Any, name: str = "config") -> dict:
    """``config`` if it is a sub-network of ``net``'s search space (keys, depth, widths, kernels within the
    supernet's sizes), else one line naming what is wrong.

    Example:
        >>> from lightning_ext.audio.efficient_tdnn import EfficientTDNN
        >>> net = EfficientTDNN(n_mels=8, channels=16, widths=16, num_blocks=2, catconv_channels=32, embed_dim=8)
        >>> check_subnet(net, net.smallest_config())["depth"]
        1
    """
    if not isinstance(config, dict) or set(config) != set(_KEYS):
        raise ValueError(f"`{name}` must be a dict with keys {list(_KEYS)}, got {config!r}.")
    full = net.largest_config()
    d = config["depth"]
    ok = isinstance(d, int) and net.min_depth <= d <= full["depth"]
    ok = ok and all(isinstance(config[k], int) and 0 < config[k] <= full[k] for k in ("channels", "catconv"))
    ok = ok and len(config["widths"]) == len(full["widths"]) and len(config["kernels"]) == len(full["kernels"])
    ok = ok and all(isinstance(w, int) and 0 < w <= f and w % net.res2_scale == 0
                    for w, f in zip(config["widths"], full["widths"]))
    ok = ok and all(isinstance(k, int) and 0 < k <= f and k % 2 == 1 for k, f in zip(config["kernels"], full["kernels"]))
    if not ok:
        raise ValueError(f"`{name}` {config} is not a sub-network of the supernet (largest {full}, depth >= "
                         f"{net.min_depth}, widths multiples of {net.res2_scale}, odd kernels); pick one from "
                         "its largest_config()/sample_config().")
    return config


def sample_subnets(net: Any, rule: str, seed: int, step: int, num_random: int = 1,
                   elastic: Sequence[str] = ELASTIC) -> list[dict]:
    """The sub-networks trained at ``step``: ``"random"`` one drawn uniformly per choice, ``"sandwich"`` the largest,
    the smallest and ``num_random`` random ones (Yu & Huang's sandwich rule, as in BigNAS/OFA). Draws come from
    ``numpy.random.default_rng([seed, step])``, so every rank and a resumed run draw the same; a dimension not in
    ``elastic`` stays at the largest (progressive shrinking opens them phase by phase).

    Example:
        >>> from lightning_ext.audio.efficient_tdnn import EfficientTDNN
        >>> net = EfficientTDNN(n_mels=8, channels=16, widths=16, num_blocks=2, catconv_channels=32, embed_dim=8)
        >>> [c["depth"] for c in sample_subnets(net, "sandwich", 0, 5)][:2]
        [2, 1]
        >>> sample_subnets(net, "random", 0, 5) == sample_subnets(net, "random", 0, 5)
        True
    """
    g = np.random.default_rng([int(seed), int(step)])
    largest = net.largest_config()

    def restrict(c: dict) -> dict:
        c = dict(c)
        if "depth" not in elastic:
            c["depth"] = largest["depth"]
        if "width" not in elastic:
            c.update(channels=largest["channels"], widths=list(largest["widths"]), catconv=largest["catconv"])
        if "kernel" not in elastic:
            c["kernels"] = list(largest["kernels"])
        return c

    drawn = [restrict(net.sample_config(g)) for _ in range(1 if rule == "random" else num_random)]
    return drawn if rule == "random" else [largest, restrict(net.smallest_config())] + drawn


class SubnetSampling(FitStepWrapping, Callback):
    r"""Weight-sharing supernet training as a callback: each training step trains the sub-network(s) drawn for it,
    the losses summed before one backward pass.

    Paper: "EfficientTDNN: Efficient Architecture Search for Speaker Recognition" (Wang et al., IEEE/ACM TASLP 2022,
    arXiv 2103.13581; reference code https://github.com/mechanicalsea/sugar, ``scripts/train_vox2_veri.py``, which
    samples a sub-network of ``DynamicTDNN`` per step); the sandwich rule is from "Universally Slimmable Networks"
    (Yu & Huang, ICCV 2019, arXiv 1903.05134). The step loss is :math:`\sum_{a \in A_t} L(W_a; x_t)` over the
    sub-networks :math:`A_t` of step :math:`t` (:func:`sample_subnets`).

    The callback wraps the module's ``training_step`` (``core.step_wrapper``): for each sub-network it sets the
    supernet's ``active`` config, calls the module's own step, and sums the losses; the active config is restored
    afterwards, so validation sees what the module chose. Draws depend only on ``(seed, global_step)``: a resumed fit
    (mid-epoch too) trains the same sub-networks as an uninterrupted one. ``state_dict`` holds ``seed``, ``rule``
    and the count of sub-networks trained; loading a checkpoint made with another seed or rule is refused.

    Use it with a module that does not sample by itself (``SpeakerVerificationModule(subnet_sampling="none")``;
    that argument keeps the older in-module sampling reachable). One process only: refused in ``setup`` under
    several ranks (the supernet leaves different parameters unused per step, which DDP's reducer needs to be told
    about; not tested here).

    Args:
        rule: ``"random"`` (one sub-network per step, uniform per choice) or ``"sandwich"`` (largest, smallest and
            ``num_random`` random ones).
        num_random: random sub-networks per step under ``"sandwich"``.
        elastic: the dimensions sampled (``"depth"``, ``"width"``, ``"kernel"``); the others stay at the largest.
        seed: the sampling seed.
        supernet: attribute path of the supernet in the module (``None``: the only one found).

    Example:
        >>> from lightning_ext.audio.speaker_verification import SpeakerVerificationModule
        >>> m = SpeakerVerificationModule(num_classes=3, n_mels=8, channels=16, widths=16, num_blocks=2,
        ...                               catconv_channels=32, embed_dim=8, attention_dim=8)
        >>> cb = SubnetSampling(rule="sandwich", seed=1)
        >>> [c["depth"] for c in cb.subnets(m.net, step=0)]
        [2, 1, 1]
    """

    def __init__(self, rule: Literal["random", "sandwich"] = "sandwich", num_random: PositiveInt = 1,
                 elastic: list[Literal["depth", "width", "kernel"]] = list(ELASTIC),  # noqa: B006 - read only
                 seed: int = 0, supernet: Optional[str] = None) -> None:
        super().__init__()
        check_choice("rule", rule, ("random", "sandwich"))
        check_positive_int("num_random", num_random)
        if isinstance(elastic, str) or not elastic or any(e not in ELASTIC for e in elastic):
            raise ValueError(f"`elastic` must be a non-empty list of {list(ELASTIC)}, got {elastic!r}.")
        check_number("seed", seed, integer=True)
        self.rule, self.num_random, self.elastic, self.seed = rule, int(num_random), list(elastic), int(seed)
        self.supernet = supernet
        self.trained = 0  # sub-network passes so far
        self._net: Any = None

    def subnets(self, net: Any, step: int) -> list[dict]:
        """The sub-networks of ``step`` (:func:`sample_subnets`)."""
        return sample_subnets(net, self.rule, self.seed, step, self.num_random, self.elastic)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Find the supernet, refuse several ranks and in-module sampling, wrap ``training_step``."""
        if trainer.world_size > 1:
            raise ValueError("SubnetSampling runs in one process (DDP would need find_unused_parameters for the "
                             "sub-networks, untested here); set trainer.devices=1.")
        if getattr(pl_module, "subnet_sampling", "none") != "none":
            raise ValueError(f"{type(pl_module).__name__} samples sub-networks itself (subnet_sampling="
                             f"{pl_module.subnet_sampling!r}); set subnet_sampling='none' when using SubnetSampling.")
        self._net = find_supernet(pl_module, self.supernet, "SubnetSampling")
        if stage == "fit":
            self._wrap_step(trainer, pl_module, self._around, SubnetSampling)

    def _around(self, step: Any, args: tuple, kwargs: dict) -> Any:
        net, module = self._net, self._module
        kept, total, output = net.active, None, None
        try:
            for config in self.subnets(net, module.trainer.global_step):
                net.active = config
                output = step(*args, **kwargs)
                loss = loss_of(output, module, "SubnetSampling")
                if loss is None:  # the module skipped the step (non-finite loss): skip it whole
                    return None
                total = loss if total is None else total + loss
                self.trained += 1
        finally:
            net.active = kept
        return with_loss(output, total)

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Remove the wrapper."""
        self._unwrap()

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Remove the wrapper after a crash."""
        self._unwrap()

    @override
    def state_dict(self) -> dict:
        """The rule, seed and sub-network passes so far."""
        return {"rule": self.rule, "seed": self.seed, "num_random": self.num_random, "elastic": list(self.elastic),
                "trained": self.trained}

    @override
    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the count; refuse a checkpoint drawn with another rule or seed."""
        theirs = {k: state_dict.get(k) for k in ("rule", "seed", "num_random", "elastic")}
        ours = {k: v for k, v in self.state_dict().items() if k in theirs}
        if theirs != ours:
            raise ValueError(f"SubnetSampling: the checkpoint was trained with {theirs}, this callback has {ours}; "
                             "resume with the same settings (or start a new fit).")
        self.trained = int(state_dict["trained"])
