"""Non-finite training losses stop the fit with one line (or skip the step) in every vision, graph and recsys module.

Before ``core.guards``, a ``Classifier`` fit on NaN inputs reported success with NaN parameters.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer, seed_everything
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_ext.core.guards import check_loss, refuse_skip_under_ddp
from lightning_ext.recsys.dccf import DCCF
from lightning_ext.recsys.interactions import InteractionDataModule, per_user_split
from lightning_ext.recsys.lightgcl import LightGCL
from lightning_ext.recsys.lightgcn import LightGCN
from lightning_ext.recsys.mf_bpr import MFBPR
from lightning_ext.recsys.ultragcn import UltraGCN
from lightning_ext.vision.classifier import Classifier
from lightning_ext.vision.image_classifier import ImageClassifier
from lightning_ext.vision.mlp_classifier import MLPClassifier

QUIET = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
             enable_model_summary=False, num_sanity_val_steps=0)


def _nan_loader(shape, n=32, num_classes=3, poison_every=1):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, *shape, generator=gen)
    x[::poison_every, ..., 0] = float("nan")  # a NaN feature in some samples, as an un-imputed table would have
    y = torch.randint(0, num_classes, (n,), generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def _finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


CLASSIFIERS = {
    "Classifier": (lambda **kw: Classifier(nn.Sequential(nn.Flatten(), nn.Linear(6, 3)), num_classes=3, **kw), (6,)),
    "MLPClassifier": (lambda **kw: MLPClassifier(num_features=6, num_classes=3, hidden=[8], **kw), (6,)),
    "ImageClassifier": (lambda **kw: ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(16, 3)), num_classes=3,
                                                     image_size=4, **kw), (1, 4, 4)),
}


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifiers_refuse_a_nan_loss_naming_step_epoch_and_cause(name):
    make, shape = CLASSIFIERS[name]
    model = make()
    with pytest.raises(FloatingPointError, match=r"not finite .*step 0, epoch 0.*NaN/inf input") as err:
        Trainer(max_epochs=1, **QUIET).fit(model, train_dataloaders=_nan_loader(shape))
    assert "\n" not in str(err.value)
    assert _finite(model)  # the fit stopped before the bad step's update


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_classifiers_skip_nan_steps_and_keep_parameters_finite(name):
    make, shape = CLASSIFIERS[name]
    model = make(nonfinite_loss="skip")
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        Trainer(max_epochs=1, **QUIET).fit(model, train_dataloaders=_nan_loader(shape, poison_every=16))
    assert model.skipped_steps == 2  # samples 0 and 16 fall in batches 0 and 2 of 4
    assert _finite(model)


def test_classifier_warn_policy_trains_on_and_warns():
    model = CLASSIFIERS["Classifier"][0](nonfinite_loss="warn")
    with pytest.warns(UserWarning, match="nonfinite_loss='warn'"):
        Trainer(max_steps=1, **QUIET).fit(model, train_dataloaders=_nan_loader((6,)))
    assert not _finite(model)  # as documented: "warn" trains on the bad loss


def test_classifier_refuses_a_bad_policy_and_skip_under_ddp():
    from types import SimpleNamespace

    with pytest.raises(ValueError, match="nonfinite_loss"):
        CLASSIFIERS["Classifier"][0](nonfinite_loss="ignore")
    model = CLASSIFIERS["Classifier"][0](nonfinite_loss="skip")
    model._trainer = SimpleNamespace(world_size=2, datamodule=None)
    with pytest.raises(RuntimeError, match="cannot skip steps in distributed training"):
        model.setup("fit")


def test_guard_names_non_finite_parameters_as_the_cause():
    net = nn.Linear(2, 1)
    with torch.no_grad():
        net.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="parameter weight is already non-finite"):
        check_loss(net, torch.tensor(float("inf")), "error", batch=torch.zeros(1, 2))
    refuse_skip_under_ddp(net, "skip")  # no trainer: nothing to refuse


# -- graph -----------------------------------------------------------------------------------------------------


def test_gcn_refuses_nan_node_features():
    pytest.importorskip("torch_geometric")
    from torch_geometric.data import Data
    from torch_geometric.loader import DataLoader as GraphLoader

    from lightning_ext.graph.gcn_node_classifier import GCNNodeClassifier

    gen = torch.Generator().manual_seed(0)
    n = 12
    x = torch.randn(n, 5, generator=gen)
    x[3, 1] = float("nan")
    edge_index = torch.stack([torch.arange(n), (torch.arange(n) + 1) % n])
    mask = torch.ones(n, dtype=torch.bool)
    graph = Data(x=x, edge_index=torch.cat([edge_index, edge_index.flip(0)], 1),
                 y=torch.randint(0, 3, (n,), generator=gen), train_mask=mask, val_mask=mask, test_mask=mask)
    model = GCNNodeClassifier(num_features=5, num_classes=3, hidden=4)
    with pytest.raises(FloatingPointError, match=r"GCNNodeClassifier.*not finite.*step 0, epoch 0.*NaN/inf input"):
        Trainer(max_epochs=1, **QUIET).fit(model, train_dataloaders=GraphLoader([graph], batch_size=1))
    assert _finite(model)
    with pytest.raises(ValueError, match="nonfinite_loss"):
        GCNNodeClassifier(num_features=5, num_classes=3, nonfinite_loss="raise!")


# -- recommenders ----------------------------------------------------------------------------------------------


class _Tiny(InteractionDataModule):
    protocol = "tiny synthetic"

    def load_splits(self):
        rng = np.random.default_rng(0)
        pairs = np.stack([np.repeat(np.arange(12), 4), rng.integers(0, 15, 48)], 1)
        train, test = per_user_split(pairs, 0.25, seed=1)
        return train, test, 12, 15


RECOMMENDERS = {
    "MFBPR": lambda **kw: MFBPR(embedding_dim=4, **kw),
    "LightGCN": lambda **kw: LightGCN(num_layers=1, embedding_dim=4, **kw),
    "UltraGCN": lambda **kw: UltraGCN(negative_num=3, num_neighbors=2, embedding_dim=4, **kw),
    "LightGCL": lambda **kw: LightGCL(rank=2, embedding_dim=4, **kw),
    "DCCF": lambda **kw: DCCF(num_intents=2, embedding_dim=4, **kw),
}


def _poison(model):
    """NaN in one item's embedding, as a checkpoint that diverged (or loaded bad weights) would hold."""

    original = model.bind

    def bind(data):
        original(data)
        with torch.no_grad():
            model.item_embedding.weight[:] = float("nan")
        return model

    model.bind = bind
    return model


@pytest.mark.parametrize("name", sorted(RECOMMENDERS))
def test_recommenders_refuse_a_nan_loss_naming_the_parameter(name):
    seed_everything(0)
    model = _poison(RECOMMENDERS[name]())
    with pytest.raises(FloatingPointError, match=rf"{name}: the training loss is not finite.*step 0, epoch 0.*"
                                                 r"item_embedding.weight"):
        Trainer(max_epochs=1, limit_val_batches=0, **QUIET).fit(model, datamodule=_Tiny(batch_size=8))


@pytest.mark.parametrize("name", sorted(RECOMMENDERS))
def test_recommenders_skip_a_nan_step_and_leave_parameters_finite(name):
    seed_everything(0)
    model = RECOMMENDERS[name](nonfinite_loss="skip")
    real = model.training_loss
    calls = []

    def flaky(users, pos, neg):  # the second batch's loss overflows
        parts = real(users, pos, neg)
        calls.append(1)
        if len(calls) == 2:
            parts["loss"] = parts["loss"] * float("inf")
        return parts

    model.training_loss = flaky
    with pytest.warns(UserWarning, match="optimizer step skipped"):
        Trainer(max_epochs=1, limit_val_batches=0, **QUIET).fit(model, datamodule=_Tiny(batch_size=8))
    assert model.skipped_steps == 1 and len(calls) > 2
    assert _finite(model)


# -- self-supervised (the guard moved from the SSL base into core.guards) ----------------------------------------


@pytest.mark.parametrize("method", ["SimCLR", "VICReg", "BarlowTwins", "FroSSL"])
def test_self_supervised_modules_name_nan_images_as_the_cause(method):
    import lightning_ext.ssl as _  # noqa: F401
    from importlib import import_module

    module = {"SimCLR": "simclr", "VICReg": "vicreg", "BarlowTwins": "barlow_twins", "FroSSL": "frossl"}[method]
    cls = getattr(import_module(f"lightning_ext.ssl.{module}"), method)
    model = cls(nn.Sequential(nn.Flatten(), nn.Linear(16, 8)), image_size=4, proj_hidden_dim=8, proj_output_dim=4,
                augmentation=nn.Identity(), num_classes=3, validate_ssl_loss=False)
    with pytest.raises(FloatingPointError, match=rf"{method}: the .* loss is not finite .*step 0, epoch 0.*NaN/inf input"):
        Trainer(max_epochs=1, **QUIET).fit(model, train_dataloaders=_nan_loader((1, 4, 4)))
    assert _finite(model)
