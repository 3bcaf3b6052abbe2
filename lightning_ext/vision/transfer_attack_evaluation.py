"""``TransferAttackEvaluation``: after testing a dynamic (early-exit) network, attack it and its static twin and
measure how adversarial examples transfer each way."""

from __future__ import annotations

import os
from typing import Any, Literal, Optional

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_ext.core.io import atomic_write_json
from lightning_ext.core.paths import check_path_argument, output_path
from lightning_ext.core.validation import PositiveFloat, PositiveInt, check_choice, check_number, check_positive_int
from lightning_ext.vision.adversarial import SourceLoss, transfer_attack


class TransferAttackEvaluation(Callback):
    """Attack transfer between a dynamic network and its static twin (Haque and Yang, 2023), measured after testing.

    "Dynamic Neural Network is All You Need: Understanding the Robustness of Dynamic Mechanisms in Neural
    Networks" (ICCV 2023 Workshop RCV, arXiv 2308.08709) finds that adversarial examples transfer better from a
    dynamic network (DyNN) to its static counterpart (SDNN) than the other way. On ``on_test_epoch_end`` this
    callback takes up to ``num_samples`` test inputs that both models classify correctly, crafts L∞ PGD (or FGSM)
    examples on each model and logs ``attack/white_box_{dynamic,static}``,
    ``attack/transfer_dynamic_to_static``, ``attack/transfer_static_to_dynamic`` (share of the source's successful
    examples that also fool the target), their difference ``attack/transfer_asymmetry``, the PGD steps each source
    needed (``attack/steps_{source}``) and the dynamic network's mean exit and FLOPs fraction on clean and on
    static-crafted inputs; the full report goes to ``report_path`` as JSON. For a dynamic source the loss is taken
    at the exit each input leaves at (``"taken"``), the final exit or the sum of exits (``source_loss``: one report
    per choice).

    The module must be an :class:`~lightning_ext.vision.early_exit_classifier.EarlyExitClassifier` (it provides
    ``static_twin()``). The twin's weights come from ``twin_checkpoint`` (a separately trained static network,
    relative to ``trainer.default_root_dir``); ``None`` uses the dynamic network's own backbone and final exit
    without the early exits (the same weights, the dynamic mechanism removed). Runs on one process (refused
    under multi-process strategies).

    Args:
        twin_checkpoint: checkpoint of the static twin (an ``EarlyExitClassifier`` with only the final exit, or its
            bare ``net``), read with ``weights_only=True``; ``None``: the shared-weight twin.
        attack: ``"pgd"`` or ``"fgsm"``.
        epsilon: L∞ radius in the model's input units.
        steps: PGD steps.
        step_size: PGD step (``None``: ε/4).
        random_start: PGD's uniform random start in the ε-ball.
        source_loss: for a dynamic source, the loss(es) to attack.
        num_samples: test inputs considered (the first ones the test loop yields).
        clamp_min: lower bound of valid inputs (``None``: unbounded).
        clamp_max: upper bound of valid inputs (``None``: unbounded).
        seed: seed of PGD's random start.
        report_path: JSON report, relative to ``trainer.log_dir`` (``None`` disables it).

    Example:
        >>> cb = TransferAttackEvaluation(twin_checkpoint=None, epsilon=0.1, num_samples=256)
        >>> cb.attack, cb.source_loss
        ('pgd', ['taken'])
    """

    def __init__(
        self,
        twin_checkpoint: Optional[str] = None,
        attack: Literal["pgd", "fgsm"] = "pgd",
        epsilon: PositiveFloat = 0.1,
        steps: PositiveInt = 10,
        step_size: Optional[PositiveFloat] = None,
        random_start: bool = True,
        source_loss: list[SourceLoss] = ["taken"],  # noqa: B006 - jsonargparse needs a literal default to show
        num_samples: PositiveInt = 1000,
        clamp_min: Optional[float] = 0.0,
        clamp_max: Optional[float] = 1.0,
        seed: int = 0,
        report_path: Optional[str] = "transfer_attack.json",
    ) -> None:
        check_choice("attack", attack, ("pgd", "fgsm"))
        check_number("epsilon", epsilon, low=0, low_open=True)
        check_positive_int("steps", steps)
        if step_size is not None:
            check_number("step_size", step_size, low=0, low_open=True)
        if not source_loss:
            raise ValueError("`source_loss` needs at least one of 'taken', 'final', 'sum'")
        for mode in source_loss:
            check_choice("source_loss", mode, ("taken", "final", "sum"))
        check_positive_int("num_samples", num_samples)
        for name, value in (("clamp_min", clamp_min), ("clamp_max", clamp_max)):
            if value is not None:
                check_number(name, value)
        if clamp_min is not None and clamp_max is not None and not clamp_min < clamp_max:
            raise ValueError(f"`clamp_min` ({clamp_min}) must be below `clamp_max` ({clamp_max})")
        check_number("seed", seed, integer=True)
        check_path_argument("report_path", report_path)
        self.twin_checkpoint, self.attack, self.epsilon, self.steps = twin_checkpoint, attack, epsilon, steps
        self.step_size, self.random_start, self.source_loss = step_size, random_start, list(source_loss)
        self.num_samples, self.clamp_min, self.clamp_max = num_samples, clamp_min, clamp_max
        self.seed, self.report_path = seed, report_path
        self._x: list[torch.Tensor] = []
        self._y: list[torch.Tensor] = []
        self.report: Optional[dict] = None

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Refuse modules without a static twin and multi-process runs."""
        if not hasattr(pl_module, "static_twin") or not hasattr(pl_module, "forward_exits"):
            raise ValueError(f"TransferAttackEvaluation needs an EarlyExitClassifier (a module with static_twin() "
                             f"and forward_exits()); got {type(pl_module).__name__}")
        if trainer.world_size > 1:
            raise ValueError("TransferAttackEvaluation runs the attacks on one process; test with devices=1")

    @override
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Start collecting test inputs."""
        self._x, self._y = [], []

    @override
    def on_test_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                          batch_idx: int, dataloader_idx: int = 0) -> None:
        """Keep the batch's inputs and labels until ``num_samples`` are held."""
        have = sum(len(y) for y in self._y)
        if have < self.num_samples:
            x, y = batch[0], batch[1]
            self._x.append(x[: self.num_samples - have].detach().clone())
            self._y.append(y[: self.num_samples - have].detach().clone())

    def _twin(self, trainer: Trainer, pl_module: LightningModule):
        if self.twin_checkpoint is None:
            return pl_module.static_twin(share_weights=True)
        from lightning_ext.core.checkpoints import read_state_dict

        twin = pl_module.static_twin()
        path = self.twin_checkpoint
        if not os.path.isabs(path):
            path = os.path.join(trainer.default_root_dir, path)
        state = read_state_dict(path, reference_keys=twin.state_dict().keys(), name="twin_checkpoint")
        missing = set(twin.state_dict()) - set(state)
        if missing:
            raise ValueError(f"twin_checkpoint {self.twin_checkpoint} does not fit the static twin (missing e.g. "
                             f"{sorted(missing)[:3]}); give the checkpoint of an EarlyExitClassifier with only the "
                             "final exit on the same backbone")
        twin.load_state_dict(state, strict=False)
        return twin

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attack both ways and log the transfer rates."""
        if not self._y:
            return
        with torch.inference_mode(False), torch.enable_grad():
            x = torch.cat(self._x).clone().to(pl_module.device)
            y = torch.cat(self._y).clone().to(pl_module.device)
            twin = self._twin(trainer, pl_module).to(pl_module.device)
            self.report = self.evaluate(pl_module, twin, x, y)
        for key, value in self.report["summary"].items():
            pl_module.log(f"attack/{key}", float(value))
        path = output_path(trainer, self.report_path)
        if path is not None and trainer.is_global_zero:
            atomic_write_json(self.report, path, indent=1)
            rank_zero_info(f"TransferAttackEvaluation: report written to {path}")

    def evaluate(self, dynamic, static, x: torch.Tensor, y: torch.Tensor) -> dict:
        """The report for a dynamic and a static model on ``(x, y)`` (usable without a Trainer)."""
        kw = dict(attack=self.attack, epsilon=self.epsilon, steps=self.steps, step_size=self.step_size,
                  random_start=self.random_start, clamp_min=self.clamp_min, clamp_max=self.clamp_max)
        flops = getattr(dynamic, "flops_fraction", None)
        runs = {}
        for mode in self.source_loss:
            gen = torch.Generator().manual_seed(self.seed)
            runs[f"dynamic_to_static[{mode}]"] = transfer_attack(dynamic, static, x, y, source_loss=mode,
                                                                 generator=gen, **kw)
        gen = torch.Generator().manual_seed(self.seed)
        runs["static_to_dynamic"] = transfer_attack(static, dynamic, x, y, generator=gen, flops_fraction=flops, **kw)
        first = runs[f"dynamic_to_static[{self.source_loss[0]}]"]
        back = runs["static_to_dynamic"]
        summary = {
            "white_box_dynamic": first["white_box_success"], "white_box_static": back["white_box_success"],
            "transfer_dynamic_to_static": first["transfer_success"],
            "transfer_static_to_dynamic": back["transfer_success"],
            "transfer_asymmetry": first["transfer_success"] - back["transfer_success"],
        }
        if "steps_to_success" in first:
            summary["steps_dynamic"], summary["steps_static"] = first["steps_to_success"], back["steps_to_success"]
        for key in ("target_exit_clean", "target_exit_adv", "target_flops_clean", "target_flops_adv"):
            if key in back:
                summary[key.replace("target", "dynamic")] = back[key]
        config = {k: getattr(self, k) for k in ("attack", "epsilon", "steps", "step_size", "random_start",
                                                 "source_loss", "num_samples", "clamp_min", "clamp_max", "seed")}
        return {"summary": summary, "runs": runs, "config": config, "n_inputs": len(y)}
