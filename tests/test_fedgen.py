"""FedGen: generator, server loss, client regulariser (one-batch equivalence with the paper's equations), the Flower
strategy and client in a federation, bad inputs, and crash-and-resume of the server's generator state."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("flwr")

from lightning_ext.data.digits import DigitsDataModule  # noqa: E402
from lightning_ext.federated.client import LightningClient  # noqa: E402
from lightning_ext.federated.datamodule import FederatedDataModule  # noqa: E402
from lightning_ext.federated.fedgen import (  # noqa: E402
    CONFIG_ALPHA,
    CONFIG_GENERATOR,
    FedGenClient,
    FedGenCNN,
    FedGenGenerator,
    FedGenRegularizer,
    diversity_loss,
    fedgen_fedavg,
    fedgen_regularizer,
    generator_loss,
    label_weights,
)
from lightning_ext.federated.simulation import FederatedSimulation  # noqa: E402
from lightning_ext.vision.classifier import Classifier  # noqa: E402
from lightning_ext.testing import crash_in_aggregation


def model():
    return Classifier(FedGenCNN(image_size=8), 10, optimizer=lambda p: torch.optim.SGD(p, lr=0.05))


def data(i, n):
    return FederatedDataModule(DigitsDataModule(batch_size=16), n, i, partitioner="dirichlet", alpha=0.3)


def strategy(n=2, **kwargs):
    kwargs.setdefault("generator_steps", 5)
    return fedgen_fedavg(fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n, **kwargs)


# ------------------------------------------------------------------------- independent implementations (paper eqs.)


def ref_generator(gen: FedGenGenerator, eps: torch.Tensor, y: torch.Tensor, train: bool) -> torch.Tensor:
    """[eps || onehot(y)] -> Linear -> BatchNorm1d (batch or running statistics) -> ReLU -> Linear, by hand."""
    lin1, bn, lin2 = gen.fc[0], gen.fc[1], gen.out
    onehot = torch.zeros(len(y), gen.num_classes)
    onehot[torch.arange(len(y)), y] = 1.0
    h = torch.cat([eps, onehot], 1) @ lin1.weight.T + lin1.bias
    if train:
        mean, var = h.mean(0), h.var(0, unbiased=False)
    else:
        mean, var = bn.running_mean, bn.running_var
    h = torch.relu((h - mean) / torch.sqrt(var + bn.eps) * bn.weight + bn.bias)
    return h @ lin2.weight.T + lin2.bias


def ref_diversity(eps, z):
    n = len(z)
    total = 0.0
    for i in range(n):
        for j in range(n):
            total += float((z[i] - z[j]).abs().mean()) * float(((eps[i] - eps[j]) ** 2).mean())
    return math.exp(-total / n**2)


def ref_ce(logits, y):
    return -(logits[y] - torch.logsumexp(logits, 0))


def test_generator_matches_the_reference_architecture_and_uniform_noise():
    torch.manual_seed(0)
    gen = FedGenGenerator()
    assert sum(p.numel() for p in gen.parameters()) == 19744  # 11,008 + 512 + 8,224 (spec)
    y = torch.arange(10).repeat(3)
    z, eps = gen(y)
    assert eps.min() >= 0 and eps.max() < 1  # torch.rand, as the reference code
    assert torch.allclose(z, ref_generator(gen, eps, y, train=True), atol=1e-5)
    gen.eval()
    z_eval, _ = gen(y, eps=eps)
    assert torch.allclose(z_eval, ref_generator(gen, eps, y, train=False), atol=1e-5)


def test_diversity_loss_equals_the_pairwise_equation():
    torch.manual_seed(1)
    eps, z = torch.rand(7, 5), torch.randn(7, 4)
    assert math.isclose(float(diversity_loss(eps, z)), ref_diversity(eps, z), rel_tol=1e-5)
    # identical outputs for different noises give the maximal loss exp(0) = 1
    assert math.isclose(float(diversity_loss(eps, torch.zeros(7, 4))), 1.0)


def test_label_weights_normalise_over_clients_and_qualify_seen_labels():
    counts = torch.tensor([[1, 5, 1, 3], [1, 1, 1, 9]])  # clients x labels, counts start at 1
    w, qualified = label_weights(counts)
    assert w.shape == (4, 2) and torch.allclose(w.sum(1), torch.ones(4))
    assert torch.allclose(w[1], torch.tensor([5 / 6, 1 / 6])) and qualified == [1, 3]
    with pytest.raises(ValueError, match="positive numbers"):
        label_weights(torch.tensor([[0, 1], [1, 1]]))


def test_generator_loss_equals_the_weighted_teacher_ensemble_plus_diversity():
    torch.manual_seed(2)
    gen = FedGenGenerator(num_classes=4, noise_dim=3, hidden_dim=8, latent_dim=5)
    y = torch.tensor([0, 1, 3, 3, 2, 1])
    with torch.no_grad():
        z, eps = gen(y)
    heads = [(torch.randn(4, 5), torch.randn(4)), (torch.randn(4, 5), torch.randn(4)), (torch.randn(4, 5), None)]
    counts = torch.tensor([[3, 1, 1, 2], [1, 4, 2, 1], [2, 2, 1, 7]])
    weights, _ = label_weights(counts)
    loss, teacher, div = generator_loss(z, eps, y, heads, weights, teacher_weight=0.7, diversity_weight=1.3)
    expected_teacher = 0.0
    for k, (w, b) in enumerate(heads):
        per = [float(ref_ce(z[i] @ w.T + (b if b is not None else 0), y[i])) * float(counts[k, y[i]]) /
               float(counts[:, y[i]].sum()) for i in range(len(y))]
        expected_teacher += sum(per) / len(y)
    assert math.isclose(float(teacher), expected_teacher, rel_tol=1e-5)
    assert math.isclose(float(loss), 0.7 * expected_teacher + 1.3 * ref_diversity(eps, z), rel_tol=1e-5)


def test_client_regularizer_equals_the_papers_two_terms_on_one_batch():
    torch.manual_seed(3)
    gen = FedGenGenerator(num_classes=5, noise_dim=4, hidden_dim=16, latent_dim=6)
    gen.train()
    gen(torch.randint(5, (20,)))  # give BatchNorm1d running statistics that differ from the init
    head = nn.Linear(6, 5)
    logits, y = torch.randn(8, 5, requires_grad=True), torch.randint(5, (8,))
    sampled = torch.randint(5, (12,))
    teacher, latent = fedgen_regularizer(logits, y, head, gen, sampled, alpha=2.0, beta=3.0,
                                         generator_rng=torch.Generator().manual_seed(7))
    assert gen.training  # restored
    rng = torch.Generator().manual_seed(7)
    eps_real, eps_hat = torch.rand(8, 4, generator=rng), torch.rand(12, 4, generator=rng)
    with torch.no_grad():
        z_real, z_hat = ref_generator(gen, eps_real, y, train=False), ref_generator(gen, eps_hat, sampled, train=False)
    # beta * KLDivLoss(batchmean)(log f(x), p_G) = beta / B * sum_i sum_c p_G,ic (log p_G,ic - log f_ic)
    p = torch.softmax(z_real @ head.weight.T + head.bias, 1).detach()
    log_q = logits - torch.logsumexp(logits, 1, keepdim=True)
    expected_latent = 3.0 * float((p * (p.log() - log_q)).sum().detach()) / 8
    # (B_g / B) * alpha * mean_j CE(h(G(eps_j, y_hat_j)), y_hat_j)
    hat_logits = z_hat @ head.weight.T + head.bias
    expected_teacher = (12 / 8) * 2.0 * float(sum(ref_ce(hat_logits[j], sampled[j]) for j in range(12)).detach() / 12)
    assert math.isclose(float(latent), expected_latent, rel_tol=1e-4)
    assert math.isclose(float(teacher), expected_teacher, rel_tol=1e-4)
    (teacher + latent).backward()
    assert logits.grad is not None and head.weight.grad is not None
    assert all(p.grad is None for p in gen.parameters())  # the generator is frozen on the client


def test_regularizer_callback_adds_the_terms_to_the_users_loss_and_counts_labels():
    torch.manual_seed(4)
    module = Classifier(FedGenCNN(image_size=8), 10)
    gen = FedGenGenerator(num_classes=10)
    gen.eval()
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 0, 3, 3, 3, 9])
    cb = FedGenRegularizer("net.decode_fc2", gen, labels=[0, 3, 9], alpha=1.5, beta=0.5, generated_batch_size=4)
    cb.setup(None, module, "fit")
    module.log = lambda *a, **k: None  # no Trainer attached
    torch.manual_seed(11)
    loss = module.training_step((x, y), 0)
    cb.teardown(None, module, "fit")
    assert "training_step" not in vars(module)  # unwrapped exactly
    assert cb.counts.tolist() == [3, 1, 1, 4, 1, 1, 1, 1, 1, 2]
    torch.manual_seed(11)
    logits = module(x)
    sampled = torch.tensor([0, 3, 9])[torch.randint(3, (4,))]
    teacher, latent = fedgen_regularizer(logits, y, module.net.decode_fc2, gen, sampled, 1.5, 0.5)
    assert torch.allclose(loss, F.cross_entropy(logits, y) + teacher + latent, atol=1e-6)
    off = FedGenRegularizer("net.decode_fc2", None, labels=[], alpha=0.0, beta=0.0)
    off.setup(None, module, "fit")
    assert torch.allclose(module.training_step((x, y), 0), F.cross_entropy(logits, y), atol=1e-6)
    off.teardown(None, module, "fit")


# ------------------------------------------------------------------------------------------------ the federation


@pytest.mark.slow  # a few in-process federation rounds (Lightning Trainers); ~10-40 s on the shared 2 cores
def test_fedgen_round_sends_the_generator_trains_it_and_averages_like_fedavg():
    client = FedGenClient(head="net.decode_fc2", model=model, datamodule=data, local_steps=3)
    strat = strategy()
    sim = FederatedSimulation(client, num_clients=2, num_rounds=2, strategy=strat, progress=False)
    before = {k: v.clone() for k, v in strat.generator.state_dict().items()}
    sim.arrays = client.initial_arrays()
    sim.history.append(sim.run_round(1))
    replies = sim.grid.last_replies
    counts = [list(r.content["metrics"]["fedgen-label-counts"]) for r in replies]
    assert all(len(c) == 10 and min(c) >= 1 for c in counts) and counts[0] != counts[1]
    changed = [k for k in before if not torch.equal(before[k], strat.generator.state_dict()[k])]
    assert "out.weight" in changed  # the server trained the generator from the two heads
    n = [r.content["metrics"]["num-examples"] for r in replies]
    arrays = [r.content["arrays"].to_torch_state_dict() for r in replies]
    expected = (arrays[0]["net.decode_fc2.weight"] * n[0] + arrays[1]["net.decode_fc2.weight"] * n[1]) / sum(n)
    assert torch.allclose(sim.arrays["net.decode_fc2.weight"], expected, atol=1e-6)
    assert sim.history[0]["train/fedgen-teacher"] == 0.0  # no regulariser in round 1 (reference: glob_iter > 0)
    messages = list(strat.configure_train(2, __import__("flwr").app.ArrayRecord(sim.arrays),
                                          __import__("flwr").app.ConfigRecord(), sim.grid))
    config = messages[0].content["config"]
    assert math.isclose(config[CONFIG_ALPHA], 10 * 0.98)
    sent = torch.load(io.BytesIO(config[CONFIG_GENERATOR]), weights_only=True)
    assert torch.equal(sent["out.weight"], strat.generator.state_dict()["out.weight"])
    record = sim.run_round(2)
    assert record["train/fedgen-teacher"] > 0 and record["train/fedgen-latent"] > 0


@pytest.mark.slow  # a few in-process federation rounds (Lightning Trainers); ~10-40 s on the shared 2 cores
def test_alpha_beta_zero_is_exactly_fedavg():
    from flwr.serverapp.strategy import FedAvg

    plain = LightningClient(model, data, local_steps=3, seed=1)
    ref = FederatedSimulation(plain, 2, 2, FedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2),
                              progress=False, seed=1).fit()
    client = FedGenClient(model=model, datamodule=data, local_steps=3, seed=1)
    out = FederatedSimulation(client, 2, 2, strategy(alpha=0.0, beta=0.0), progress=False, seed=1).fit()
    for k in ref:
        assert torch.equal(ref[k], out[k]), k


@pytest.mark.slow  # a few in-process federation rounds (Lightning Trainers); ~10-40 s on the shared 2 cores
def test_crash_and_resume_restores_the_generator_and_ends_identically(tmp_path):
    def make(path=None, crash=False):
        client = FedGenClient(model=model, datamodule=data, local_steps=2, seed=3)
        strat = strategy(seed=3)
        if crash:
            crash_in_aggregation(strat, 2, after=True)  # the generator has been trained (mutated) by then
        return FederatedSimulation(client, 2, 3, strat, progress=False, checkpoint_path=path, seed=3)

    reference = make()
    final_ref = reference.fit()
    path = tmp_path / "fed.pt"
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(path, crash=True).fit()
    resumed = make(path)
    resumed.load(path)
    assert resumed.round == 1
    final = resumed.fit()
    for k in final_ref:
        assert torch.equal(final[k], final_ref[k]), k
    for k, v in reference.strategy.generator.state_dict().items():
        assert torch.equal(v, resumed.strategy.generator.state_dict()[k]), k
    assert resumed.strategy.scheduler.state_dict()["last_epoch"] == 3


# ------------------------------------------------------------------------------------------------ bad inputs


@pytest.mark.parametrize("kwargs, words", [
    (dict(alpha=-1.0), "alpha"), (dict(decay=1.5), "decay"), (dict(generator_lr=0.0), "generator_lr"),
    (dict(generator_steps=0), "generator_steps"), (dict(head=""), "head"), (dict(beta=float("nan")), "beta"),
])
def test_strategy_bad_inputs_fail_with_one_line(kwargs, words):
    with pytest.raises(ValueError, match=words):
        strategy(**kwargs)


def test_client_bad_inputs_fail_with_one_line():
    with pytest.raises(ValueError, match="is personal"):
        FedGenClient(head="net.decode_fc2", model=model, datamodule=data, personal=[r"decode_fc2"])
    with pytest.raises(ValueError, match="generated_batch_size"):
        FedGenClient(model=model, datamodule=data, generated_batch_size=0)
    client = FedGenClient(model=model, datamodule=data, local_steps=1)
    with pytest.raises(ValueError, match="fedgen_fedavg strategy"):
        client.train(client.initial_arrays(), {"server-round": 1}, None, 0, 2)
    with pytest.raises(ValueError, match="not a submodule"):
        FedGenRegularizer("net.head", None, []).setup(None, model(), "fit")
    with pytest.raises(ValueError, match="last nn.Linear"):
        FedGenRegularizer("net.features", None, []).setup(None, model(), "fit")
    with pytest.raises(ValueError, match="needs a generator"):
        FedGenRegularizer("net.decode_fc2", None, [], alpha=1.0)


@pytest.mark.slow  # a few in-process federation rounds (Lightning Trainers); ~10-40 s on the shared 2 cores
def test_a_head_of_the_wrong_size_is_refused_by_the_server():
    client = FedGenClient(model=model, datamodule=data, local_steps=1)
    sim = FederatedSimulation(client, 2, 1, strategy(latent_dim=16), progress=False)
    with pytest.raises(ValueError, match="generator needs"):
        sim.fit()
