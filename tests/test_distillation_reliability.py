"""Issue 15, distillation: the YAML form of a teacher given by class path + checkpoint, projector param groups
under every LR scheduler type, and the teacher seeing what the student saw (augmentation inside training_step)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from torch import nn

from lightning_ext.data.digits import DigitsDataModule
from lightning_ext.data.tabular import TabularDataModule
from lightning_ext.distillation.callback import KnowledgeDistillation
from lightning_ext.vision.image_classifier import ImageClassifier
from lightning_ext.vision.mlp_classifier import MLPClassifier

QUIET = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
             accelerator="cpu", devices=1)


def _teacher(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))


# -- item: teacher by class path + checkpoint, from YAML ----------------------------------------------------------------


def test_teacher_class_path_and_lightning_checkpoint_work_from_yaml(tmp_path):
    """``teacher: pkg.Model`` + ``teacher_checkpoint``: rebuilt from the checkpoint's hyper-parameters (a hidden
    width the class's defaults do not have), not instantiated by the parser with default arguments."""
    from lightning_ext.cli import run_cli

    teacher = MLPClassifier(num_features=4, num_classes=3, hidden=[24])
    trainer = Trainer(max_steps=2, **QUIET)
    trainer.fit(teacher, datamodule=TabularDataModule("iris"))
    trainer.save_checkpoint(tmp_path / "teacher.ckpt")
    config = tmp_path / "kd.yaml"
    config.write_text(f"""
trainer:
  max_steps: 2
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  enable_model_summary: false
  accelerator: cpu
  callbacks:
    - class_path: KnowledgeDistillation
      init_args:
        teacher: lightning_ext.vision.mlp_classifier.MLPClassifier
        teacher_checkpoint: {tmp_path / "teacher.ckpt"}
        weight: 0.5
model:
  class_path: MLPClassifier
  init_args: {{num_features: 4, num_classes: 3, hidden: [8]}}
data:
  class_path: TabularDataModule
  init_args: {{name: iris}}
""")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    assert cli.trainer.global_step == 2
    kd = next(c for c in cli.trainer.callbacks if isinstance(c, KnowledgeDistillation))
    assert isinstance(kd.teacher, MLPClassifier) and list(kd.teacher.hparams["hidden"]) == [24]
    for k, v in teacher.state_dict().items():
        torch.testing.assert_close(kd.teacher.state_dict()[k], v, msg=k)


def test_teacher_given_in_yaml_as_class_path_with_init_args_still_builds_that_module(tmp_path):
    from lightning_ext.cli import run_cli

    config = tmp_path / "kd.yaml"
    config.write_text("""
trainer:
  max_steps: 1
  logger: false
  enable_checkpointing: false
  enable_progress_bar: false
  accelerator: cpu
  callbacks:
    - class_path: KnowledgeDistillation
      init_args:
        teacher:
          class_path: MLPClassifier
          init_args: {num_features: 4, num_classes: 3, hidden: [5]}
model:
  class_path: MLPClassifier
  init_args: {num_features: 4, num_classes: 3}
data: TabularDataModule
""")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = run_cli(["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}"])
    kd = next(c for c in cli.trainer.callbacks if isinstance(c, KnowledgeDistillation))
    # (its hparams are the student's: LightningCLI gives every LightningModule it builds the model's config)
    assert isinstance(kd.teacher, MLPClassifier) and kd.teacher.net[0].out_features == 5


# -- item: projectors' param group under every scheduler ------------------------------------------------------------


SCHEDULERS = {
    "LambdaLR": lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 ** k),
    "MultiplicativeLR": lambda opt: torch.optim.lr_scheduler.MultiplicativeLR(opt, lambda k: 0.9),
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=10),
    "CosineAnnealingLR": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=5),
    "SequentialLR": lambda opt: torch.optim.lr_scheduler.SequentialLR(
        opt, [torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5), torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)],
        milestones=[2]),
    "ReduceLROnPlateau": lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.5, patience=0),
}


class Scheduled(ImageClassifier):
    def __init__(self, make_scheduler):
        torch.manual_seed(0)
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), num_classes=10,
                         image_size=8)
        self.make_scheduler = make_scheduler

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)
        # ReduceLROnPlateau (mode max) on a rising step counter: its `min_lrs` list is per param group
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self.make_scheduler(opt), "interval": "step",
                                                   "monitor": "step_count"}}

    def training_step(self, batch, batch_idx):
        self.log("step_count", float(-self.global_step), on_step=True, on_epoch=False)
        return super().training_step(batch, batch_idx)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_projectors_follow_every_scheduler_type(name):
    kd = KnowledgeDistillation(_teacher(), feature_pairs={"net.2": "2"}, weight=0.5)
    lrs = []

    class LRs(Callback):
        def on_train_batch_end(self, trainer, *args):
            lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    trainer = Trainer(max_steps=4, callbacks=[kd, LRs()], **QUIET)
    trainer.fit(Scheduled(SCHEDULERS[name]), datamodule=DigitsDataModule(batch_size=64))
    assert trainer.global_step == 4 and len(lrs) == 4
    assert all(len(row) == 2 for row in lrs), "the projectors' param group is in the optimizer"
    for row in lrs:  # the projectors are scheduled like the module's own parameters
        assert row[1] == pytest.approx(row[0]), (name, lrs)
    assert len({round(row[0], 10) for row in lrs}) > 1 or name == "OneCycleLR", (name, lrs)


# -- item: the teacher sees what the student saw ---------------------------------------------------------------------


class Augmenting(ImageClassifier):
    """Augments inside training_step (a flip and a shift), as much user code does."""

    def __init__(self):
        torch.manual_seed(0)
        super().__init__(nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10)), num_classes=10,
                         image_size=8)
        self.seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        x = x.flip(-1) + 0.25
        self.seen.append(x.detach().clone())
        return F.cross_entropy(self(x), y)


def _teacher_inputs(kd: KnowledgeDistillation) -> list[torch.Tensor]:
    inputs: list[torch.Tensor] = []
    kd.teacher.register_forward_pre_hook(lambda m, args: inputs.append(args[0].detach().clone()))
    return inputs


def test_the_teacher_gets_the_augmented_input_the_student_saw_by_default():
    kd = KnowledgeDistillation(_teacher(), weight=0.5, input_shape=[1, 8, 8])
    inputs = _teacher_inputs(kd)
    module = Augmenting()
    Trainer(max_steps=3, callbacks=[kd], **QUIET).fit(module, datamodule=DigitsDataModule(batch_size=32))
    during_training = inputs[-3:]  # after the probe
    assert len(module.seen) == 3
    for seen, given in zip(module.seen, during_training):
        torch.testing.assert_close(given, seen)


def test_input_key_stays_an_explicit_override():
    kd = KnowledgeDistillation(_teacher(), weight=0.5, input_key=0, input_shape=[1, 8, 8])
    inputs = _teacher_inputs(kd)
    module = Augmenting()
    Trainer(max_steps=2, callbacks=[kd], **QUIET).fit(module, datamodule=DigitsDataModule(batch_size=32))
    for seen, given in zip(module.seen, inputs[-2:]):
        torch.testing.assert_close(given, (seen - 0.25).flip(-1))  # the raw batch[0]
