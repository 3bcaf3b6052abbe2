"""Federated family: partitioners, the stateful Lightning client on Flower, the in-process simulation driver."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from torch import nn

pytest.importorskip("flwr")

from lightning_ext.data.digits import DigitsDataModule  # noqa: E402
from lightning_ext.federated.client import LightningClient  # noqa: E402
from lightning_ext.federated.datamodule import FederatedDataModule  # noqa: E402
from lightning_ext.federated.partition import dirichlet_partition, iid_partition, partition  # noqa: E402
from lightning_ext.federated.simulation import FederatedSimulation  # noqa: E402
from lightning_ext.vision.classifier import Classifier  # noqa: E402


def linear(optimizer=None):
    return Classifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), 10, optimizer=optimizer)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def data(partitioner="iid", alpha=0.5):
    return lambda i, n: FederatedDataModule(DigitsDataModule(batch_size=16), n, i, partitioner=partitioner, alpha=alpha)


# ------------------------------------------------------------------------------------------------ partitioners


def test_partitions_are_disjoint_complete_and_seeded():
    labels = np.repeat(np.arange(10), 40)
    for parts in (iid_partition(labels, 4, seed=1), dirichlet_partition(labels, 4, alpha=0.2, seed=1)):
        joined = np.concatenate(parts)
        assert sorted(joined.tolist()) == list(range(len(labels)))
    assert all(np.array_equal(a, b) for a, b in zip(dirichlet_partition(labels, 4, 0.2, seed=3),
                                                    dirichlet_partition(labels, 4, 0.2, seed=3)))
    assert not all(np.array_equal(a, b) for a, b in zip(dirichlet_partition(labels, 4, 0.2, seed=3),
                                                        dirichlet_partition(labels, 4, 0.2, seed=4)))


def test_small_alpha_skews_labels_and_large_alpha_does_not():
    labels = np.repeat(np.arange(10), 100)

    def mean_classes_holding_80pct(alpha):
        out = []
        for part in dirichlet_partition(labels, 5, alpha, seed=0):
            counts = np.sort(np.bincount(labels[part], minlength=10))[::-1]
            out.append(int(np.searchsorted(np.cumsum(counts) / counts.sum(), 0.8) + 1))
        return np.mean(out)

    assert mean_classes_holding_80pct(0.05) <= 3 < 7 <= mean_classes_holding_80pct(100.0)


@pytest.mark.parametrize("call, words", [
    (lambda: dirichlet_partition(np.zeros(10, int), 2, alpha=0.0), "alpha"),
    (lambda: iid_partition(np.zeros(3, int), 5), "more than the 3 samples"),
    (lambda: partition(np.zeros(10, int), 2, "shards"), "partitioner"),
    (lambda: dirichlet_partition(np.arange(4) % 2, 4, alpha=0.01, seed=0, min_partition_size=2), "min_partition_size"),
    (lambda: FederatedDataModule(DigitsDataModule(), num_clients=2, partition_id=2), "partition_id"),
])
def test_bad_partition_arguments_fail_with_one_line(call, words):
    with pytest.raises(ValueError, match=words):
        call()


def test_each_client_sees_only_its_partition():
    dms = [FederatedDataModule(DigitsDataModule(), 3, i, partitioner="dirichlet", alpha=0.3) for i in range(3)]
    for dm in dms:
        dm.setup()
    seen = [set(dm.train_set.indices) for dm in dms]
    assert sum(len(s) for s in seen) == len(dms[0].datamodule.train_set)
    assert not (seen[0] & seen[1]) and not (seen[1] & seen[2])
    assert sum(len(x) for x, _ in dms[0].train_dataloader()) == len(seen[0])


# ------------------------------------------------------------------------------------------------ client state


class Recorder(Callback):
    """Records, at each round's start and end, the step counter and the Adam moments (class-level log: the
    client deep-copies its callbacks every round)."""

    log: list = []

    def on_train_start(self, trainer, pl_module):
        state = trainer.optimizers[0].state
        first = next(iter(state.values()), {})
        Recorder.log.append(("start", trainer.global_step, trainer.current_epoch,
                             {k: v.clone() for k, v in first.items() if torch.is_tensor(v)}))

    def on_train_end(self, trainer, pl_module):
        first = next(iter(trainer.optimizers[0].state.values()))
        Recorder.log.append(("end", trainer.global_step, trainer.current_epoch,
                             {k: v.clone() for k, v in first.items() if torch.is_tensor(v)}))


@pytest.mark.parametrize("keep_state", [True, False])
def test_optimizer_moments_and_step_counter_continue_across_rounds(keep_state):
    Recorder.log = []
    client = LightningClient(linear, data(), trainer={"callbacks": [Recorder()]}, local_steps=3,
                             keep_state=keep_state)
    sim = FederatedSimulation(client, num_clients=1, num_rounds=2, progress=False,
                              strategy=_fedavg(1))
    sim.fit()
    (s1, g1, _, m1), (e1, g1e, _, m1e), (s2, g2, _, m2), (e2, g2e, _, _) = Recorder.log
    assert (s1, e1, s2, e2) == ("start", "end", "start", "end")
    assert g1 == 0 and g1e == 3
    if keep_state:
        assert g2 == 3 and g2e == 6  # the step counter continues
        assert torch.equal(m2["exp_avg"], m1e["exp_avg"]) and torch.equal(m2["exp_avg_sq"], m1e["exp_avg_sq"])
        assert int(m2["step"]) == 3
    else:  # Flower's example: a fresh optimizer and counters every round
        assert g2 == 0 and g2e == 3 and m2 == {}


def test_epochs_continue_and_the_checkpoint_lives_in_context_state():
    client = LightningClient(linear, data(), local_epochs=1)
    sim = FederatedSimulation(client, num_clients=2, num_rounds=2, progress=False)
    sim.fit()
    state = sim.state_dict()
    ckpt = torch.load(__import__("io").BytesIO(state["nodes"][0]), weights_only=False)
    assert ckpt["epoch"] == 2 and ckpt["optimizer_states"]
    assert sim.history[-1]["round"] == 2


def _fedavg(n, **kw):
    from flwr.serverapp.strategy import FedAvg

    return FedAvg(fraction_evaluate=kw.pop("fraction_evaluate", 0.0), min_train_nodes=n, min_available_nodes=n,
                  min_evaluate_nodes=n, **kw)


# ------------------------------------------------------------------------------------------------ FedAvg


def test_fedavg_of_two_clients_equals_the_hand_computed_weighted_average():
    """One SGD step (lr 0.1) per client from the same global weights, then sum_k n_k w_k / sum_k n_k, where each
    client's step is computed here from softmax cross-entropy's gradient of a linear model."""
    make_data = data("dirichlet", alpha=0.5)
    client = LightningClient(lambda: linear(sgd), make_data, local_steps=1)
    sim = FederatedSimulation(client, num_clients=2, num_rounds=1, progress=False, strategy=_fedavg(2))
    w0 = client.initial_arrays()
    got = sim.fit(w0)
    expected_w, expected_b, total = 0, 0, 0
    for i in range(2):
        dm = make_data(i, 2)
        dm.setup()
        x, y = next(iter(dm.train_dataloader()))
        x = x.reshape(len(x), -1).double()
        W, b = w0["net.1.weight"].double(), w0["net.1.bias"].double()
        p = torch.softmax(x @ W.T + b, dim=1)
        err = (p - torch.nn.functional.one_hot(y, 10).double()) / len(x)
        n = len(dm.train_set)
        expected_w = expected_w + n * (W - 0.1 * err.T @ x)
        expected_b = expected_b + n * (b - 0.1 * err.sum(0))
        total += n
    assert torch.allclose(got["net.1.weight"].double(), expected_w / total, atol=1e-6)
    assert torch.allclose(got["net.1.bias"].double(), expected_b / total, atol=1e-6)


# ------------------------------------------------------------------------------------------------ resume




def test_crash_and_resume_ends_with_the_same_parameters(tmp_path):
    from flwr.serverapp.strategy import FedAvg

    class Crashing(FedAvg):
        def aggregate_train(self, server_round, replies):
            if server_round == 3:
                raise RuntimeError("simulated crash")
            return super().aggregate_train(server_round, replies)

    def make(strategy, path=None):
        client = LightningClient(linear, data("dirichlet"), local_steps=2)  # AdamW: moments must be resumed
        return FederatedSimulation(client, num_clients=2, num_rounds=4, strategy=strategy, progress=False,
                                   checkpoint_path=path, seed=5)

    reference = make(_fedavg(2)).fit()
    path = tmp_path / "federation.pt"
    crashed = make(Crashing(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2), path)
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashed.fit()
    resumed = make(_fedavg(2), path)
    resumed.load(path)
    assert resumed.round == 2
    final = resumed.fit()
    assert resumed.round == 4 and [r["round"] for r in resumed.history] == [1, 2, 3, 4]
    for k in reference:
        assert torch.equal(final[k], reference[k]), k


# ------------------------------------------------------------------------------------------------ personal layers


def test_personal_layers_never_leave_the_client_and_stay_distinct():
    client = LightningClient(linear, data("dirichlet", 0.1), local_steps=3, personal=[r"^net\.1\.bias$"])
    sim = FederatedSimulation(client, num_clients=2, num_rounds=2, progress=False, strategy=_fedavg(2))
    final = sim.fit()
    assert "net.1.bias" not in final
    for reply in sim.grid.last_replies:
        assert "net.1.bias" not in reply.content["arrays"]
    biases = [torch.load(__import__("io").BytesIO(b), weights_only=False)["state_dict"]["net.1.bias"]
              for b in sim.state_dict()["nodes"].values()]
    assert not torch.equal(biases[0], biases[1])


def test_federated_evaluation_reports_client_test_metrics():
    client = LightningClient(linear, data(), local_steps=2)
    sim = FederatedSimulation(client, num_clients=2, num_rounds=1, progress=False,
                              strategy=_fedavg(2, fraction_evaluate=1.0))
    sim.fit()
    assert 0.0 <= sim.history[-1]["clients/test_acc"] <= 1.0


@pytest.mark.parametrize("kwargs, words", [
    ({"personal": ["^nothing$"]}, "matches no state_dict key"),
    ({"local_steps": 0}, "local_steps"),
    ({"trainer": {"max_epochs": 3}}, "local_epochs"),
])
def test_client_bad_inputs(kwargs, words):
    with pytest.raises(ValueError, match=words):
        LightningClient(linear, data(), **kwargs).initial_arrays()


def test_mismatched_architectures_are_refused():
    client = LightningClient(linear, data(), local_steps=1)
    other = {"net.1.weight": torch.zeros(5, 64), "net.1.bias": torch.zeros(5)}
    with pytest.raises(ValueError, match="architectures differ"):
        client.train(other, {"server-round": 1}, None, 0, 2)
    with pytest.raises(ValueError, match="architectures differ"):
        client.train({"net.9.weight": torch.zeros(1)}, {"server-round": 1}, None, 0, 2)


# ------------------------------------------------------------------------------------------------ RQM


def test_rqm_is_unbiased_by_monte_carlo():
    from lightning_ext.federated.rqm import levels, rqm_quantize

    gen = torch.Generator().manual_seed(0)
    lev = levels(1.0, 8)
    xs = torch.linspace(-0.9, 0.9, 20)
    n = 20_000
    draws = lev[rqm_quantize(xs.repeat(n, 1), 0.9, 1.0, 8, 0.4, gen)]
    mean, std = draws.mean(0), draws.std(0)
    assert ((mean - xs.double()).abs() < 4 * std / n ** 0.5 + 1e-12).all()


def test_rqm_exact_pmf_matches_an_independent_enumeration_and_monte_carlo():
    """The pmf against brute-force enumeration of every kept-level subset (written here from the mechanism's
    definition), and against sampling."""
    import itertools

    from lightning_ext.federated.rqm import levels, rqm_pmf, rqm_quantize

    delta, m, q, x = 1.0, 6, 0.3, 0.17
    lev = levels(delta, m).tolist()
    brute = [0.0] * (m + 1)
    for kept in itertools.product([0, 1], repeat=m - 1):
        keep = [1, *kept, 1]
        prob = np.prod([q if k else 1 - q for k in kept])
        a = max(j for j in range(m + 1) if keep[j] and lev[j] <= x)
        b = min(j for j in range(m + 1) if keep[j] and lev[j] > x)
        up = (x - lev[a]) / (lev[b] - lev[a])
        brute[b] += prob * up
        brute[a] += prob * (1 - up)
    pmf = rqm_pmf(x, delta, m, q)
    assert torch.allclose(pmf, torch.tensor(brute, dtype=torch.float64), atol=1e-12)
    assert abs(float((pmf * levels(delta, m)).sum()) - x) < 1e-12
    idx = rqm_quantize(torch.full((100_000,), x), 0.9, delta, m, q, torch.Generator().manual_seed(1))
    hist = torch.bincount(idx, minlength=m + 1).double() / 1e5
    assert (hist - pmf).abs().max() < 0.006


def test_rqm_renyi_is_finite_below_q_one_and_grows_with_q():
    from lightning_ext.federated.rqm import rdp_to_epsilon, rqm_renyi

    rdp = [rqm_renyi(a, 0.5, 1.0, 8, q, grid=9) for q, a in ((0.2, 4.0), (0.5, 4.0), (0.8, 4.0))]
    assert all(np.isfinite(rdp)) and rdp[0] < rdp[1] < rdp[2]
    assert rqm_renyi(4.0, 0.5, 1.0, 8, 1.0, grid=9) == float("inf")  # plain stochastic rounding: no privacy
    assert rdp_to_epsilon([1.0, 0.5], [2.0, 8.0], 1e-5) == pytest.approx(min(1 + np.log(1e5), 0.5 + np.log(1e5) / 7))


def test_rqm_federation_decodes_the_mean_update():
    """One round, 2 clients: the new global model is w0 + mean of the clients' RQM levels (recomputed here)."""
    from lightning_ext.federated.rqm import RQMUpdate, levels, rqm_fedavg

    rqm = RQMUpdate(clip=0.05, delta=0.1, m=16, q=0.5, seed=3)
    client = LightningClient(lambda: linear(sgd), data(), local_steps=1, reply_transform=rqm)
    strategy = rqm_fedavg(0.05, 0.1, 16, 0.5, fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    sim = FederatedSimulation(client, num_clients=2, num_rounds=1, progress=False, strategy=strategy)
    w0 = client.initial_arrays()
    got = sim.fit(w0)
    replies = sim.grid.last_replies
    idx = [r.content["arrays"].to_torch_state_dict() for r in replies]
    n = [r.content["metrics"]["num-examples"] for r in replies]
    assert idx[0]["net.1.weight"].dtype == torch.uint8
    lev = levels(0.1, 16)
    for k in w0:
        mean = sum(ni * lev[i[k].long()] for ni, i in zip(n, idx)) / sum(n)
        assert torch.allclose(got[k].double(), w0[k].double() + mean, atol=1e-6)


# ------------------------------------------------------------------------------------------------ verifiable aggregation


def _miller_rabin(n: int, rounds: int = 16) -> bool:
    import random as _random

    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    rng = _random.Random(0)
    for _ in range(rounds):
        x = pow(rng.randrange(2, n - 2), d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = pow(x, 2, n)
            if x == n - 1:
                break
        else:
            return False
    return True


def test_the_commitment_group_is_a_safe_prime_group():
    from lightning_ext.federated.verifiable_aggregation import P, R

    assert P.bit_length() == 2048 and P == 2 * R + 1
    assert _miller_rabin(P) and _miller_rabin(R)


def _verifiable_federation(tamper=None, rounds=2):
    from lightning_ext.federated.verifiable_aggregation import VerifiableUpdate, verifiable_fedavg

    update = VerifiableUpdate(frac_bits=16, key_seed=7, blinding_seed=1)
    client = LightningClient(lambda: linear(sgd), data(), local_steps=1, reply_transform=update)
    strategy = verifiable_fedavg(16, tamper=tamper, fraction_evaluate=0.0, min_train_nodes=3, min_available_nodes=3)
    sim = FederatedSimulation(client, num_clients=3, num_rounds=rounds, progress=False, strategy=strategy)
    checks = {}
    sim.arrays = client.initial_arrays()
    for r in range(1, rounds + 1):
        sim.history.append(sim.run_round(r))
        sim.round = r
        mine = {int(m.content["arrays"]["zkfl.client"].numpy()[0]):
                int.from_bytes(bytes(m.content["arrays"]["zkfl.commitment"].numpy().tolist()), "big")
                for m in sim.grid.last_replies}
        checks[r] = {cid: _verify(strategy.transcripts[r], cid, c, update) for cid, c in mine.items()}
    return sim, checks


def _verify(transcript, cid, commitment, update):
    from lightning_ext.federated.verifiable_aggregation import verify_round

    keys = {i: update.public_key(i) for i in range(3)}
    scheme = update.commitment_scheme(len(transcript["total"]))
    return verify_round(transcript, cid, commitment, keys, scheme)


def test_honest_verifiable_rounds_verify_and_match_float_fedavg():
    sim, checks = _verifiable_federation(rounds=1)
    assert all(ok for ok, _ in checks[1].values())
    plain = LightningClient(lambda: linear(sgd), data(), local_steps=1)
    ref = FederatedSimulation(plain, num_clients=3, num_rounds=1, progress=False, strategy=_fedavg(3))
    expected = ref.fit(plain.initial_arrays())
    for k in expected:
        assert torch.allclose(sim.arrays[k], expected[k], atol=2 ** -15)


def test_dropped_replaced_and_injected_updates_are_detected():
    def drop(rnd, entries, total, blinding):  # drop client 1 consistently: its update, weight and blinding
        from lightning_ext.federated.verifiable_aggregation import R

        gone = next(e for e in entries if e["client"] == 1)
        rest = [e for e in entries if e["client"] != 1]
        return rest, total - gone["weight"] * gone["values"], (blinding - gone["weight"] * gone["blinding"]) % R

    def replace(rnd, entries, total, blinding):
        total = total.clone()
        total[0] += 1
        return entries, total, blinding

    def inject(rnd, entries, total, blinding):
        fake = dict(entries[0], client=9)
        return entries + [fake], total + fake["weight"] * fake["values"], blinding

    _, dropped = _verifiable_federation(drop, rounds=1)
    assert dropped[1][1] == (False, "my update is missing or altered")
    assert dropped[1][0][0] and dropped[1][2][0]  # a consistent drop: only the dropped client can tell
    _, replaced = _verifiable_federation(replace, rounds=1)
    assert all(not ok and "does not open" in why for ok, why in replaced[1].values())
    _, injected = _verifiable_federation(inject, rounds=1)
    assert all(not ok and "unregistered client 9" in why for ok, why in injected[1].values())


# ------------------------------------------------------------------------------------------------ federation configs

FEDERATION_CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs" / "federated").glob("*.yaml"))


@pytest.mark.slow  # a ResNet-10t per client; about 30 s on a loaded 2-core machine
@pytest.mark.parametrize("config", FEDERATION_CONFIGS, ids=lambda p: p.stem)
def test_federation_configs_run(config, monkeypatch, tmp_path):
    """configs/federated/*.yaml are federations (not LightningCLI fits, which tests/test_configs.py runs): one
    round each through ``lightning-ext federate``."""
    import json

    import yaml

    from lightning_ext.cli import main

    monkeypatch.chdir(config.parents[2])  # configs use paths relative to the repository root (fedpub_cora's Cora)
    cfg = yaml.safe_load(config.read_text())
    cfg["federation"].update(local_steps=2, num_clients=2)
    strategy_args = cfg["federation"].get("strategy_args") or {}
    if "bn_batches" in strategy_args:  # FedTiny scores each candidate on 2 batches per client, not 20 (22 s -> 2 s)
        strategy_args["bn_batches"] = 2
    if "warmup_steps" in strategy_args:  # FedSTO's server: 2 warm-up and 2 fine-tuning steps, not 60 and 10
        strategy_args.update(warmup_steps=2, server_steps=2)
    small = tmp_path / config.name
    small.write_text(yaml.safe_dump(cfg))
    main(["federate", "--config", str(small), "--num_rounds", "1", "--output", str(tmp_path / "out.json")])
    out = json.loads((tmp_path / "out.json").read_text())
    score = out["test"].get("test_acc", out["test"].get("test_ap50"))  # detection (FedSTO) reports AP50
    assert out["rounds"] == 1 and 0.0 <= score <= 1.0 and len(out["history"]) >= 1


@pytest.mark.parametrize("text, expected", [
    (None, "does not exist"),
    ("federation: [1, 2", "is not valid YAML"),
    ("- a\n- b\n", "must hold a mapping"),
    ("federation: {rounds: 3}\nmodel: {class_path: x}\ndata: {class_path: y}\n", "unknown federation key"),
    ("federation: {strategy: fedsgd}\nmodel: {class_path: ImageClassifier}\ndata: {class_path: DigitsDataModule}\n",
     "federation.strategy='fedsgd' is unknown"),
])
def test_federate_command_refuses_bad_configs_with_one_line_and_exit_2(text, expected, tmp_path, capsys):
    from lightning_ext.cli import main

    path = tmp_path / "fed.yaml"
    if text is not None:
        path.write_text(text)
    with pytest.raises(SystemExit) as exit_info:
        main(["federate", "--config", str(path)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and expected in err and len(err.splitlines()) == 1, err
    assert err.startswith("error: federate:")


def test_federate_command_refuses_a_non_positive_round_count(tmp_path, capsys):
    from lightning_ext.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["federate", "--config", str(tmp_path / "x.yaml"), "--num_rounds", "0"])
    assert exit_info.value.code == 2 and "--num_rounds must be a positive integer" in capsys.readouterr().err


@pytest.mark.slow  # three short federations of a ResNet-10t
def test_federate_command_resumes_a_crashed_federation_from_its_checkpoint(tmp_path, monkeypatch, capsys):
    """The same `lightning-ext federate` command run again after round 1 (the crash) finishes like one run."""
    import json

    import yaml

    from lightning_ext.cli import main

    config = Path(__file__).resolve().parents[1] / "configs" / "federated" / "fedavg_digits.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["federation"].update(local_steps=1, num_clients=2, num_rounds=2)
    plain, crashed = tmp_path / "plain.yaml", tmp_path / "crashed.yaml"
    plain.write_text(yaml.safe_dump(cfg))
    cfg["federation"]["checkpoint_path"] = str(tmp_path / "federation.pt")
    crashed.write_text(yaml.safe_dump(cfg))
    main(["federate", "--config", str(plain), "--output", str(tmp_path / "plain.json")])
    main(["federate", "--config", str(crashed), "--num_rounds", "1"])  # stops after round 1, as a crash would
    capsys.readouterr()
    main(["federate", "--config", str(crashed), "--output", str(tmp_path / "resumed.json")])
    assert "resuming from" in capsys.readouterr().err
    once, resumed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "resumed"))
    assert resumed["rounds"] == 2 and len(resumed["history"]) == len(once["history"])
    assert resumed["test"] == pytest.approx(once["test"], abs=1e-6)
    cfg["federation"]["num_clients"] = 3  # a checkpoint of another federation is refused with one line
    crashed.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exit_info:
        main(["federate", "--config", str(crashed)])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and "cannot resume" in err and len(err.splitlines()) == 1


def test_federation_config_bad_keys_fail_with_one_line():
    from lightning_ext.federated.run import build

    with pytest.raises(ValueError, match="unknown federation key"):
        build({"federation": {"rounds": 3}, "model": {"class_path": "x"}, "data": {"class_path": "y"}})
    with pytest.raises(ValueError, match="federation.strategy='fedsgd' is unknown"):
        build({"federation": {"strategy": "fedsgd"}, "model": {"class_path": "ImageClassifier", "init_args": {
            "backbone": "resnet10t", "num_classes": 10, "in_chans": 1, "image_size": 8}},
            "data": {"class_path": "DigitsDataModule"}})


# ------------------------------------------------------------------------------------------------ FedWon


def test_wsconv2d_equals_the_scaled_weight_standardisation_equation_and_timm():
    from timm.layers import ScaledStdConv2d

    from lightning_ext.federated.fedwon import WSConv2d

    torch.manual_seed(0)
    conv = WSConv2d(3, 5, 3, padding=1)
    with torch.no_grad():
        conv.gain.uniform_(0.5, 1.5)
    w = conv.weight.reshape(5, -1).double()
    fan_in = w.shape[1]
    std = w.var(dim=1, unbiased=False, keepdim=True).add(1e-6).sqrt()
    w_hat = conv.gain.reshape(5, 1).double() * 1.7139588594436646 * (w - w.mean(1, keepdim=True)) / (std * fan_in ** 0.5)
    assert torch.allclose(conv.standardized_weight().reshape(5, -1).double(), w_hat, atol=1e-6)
    ref = ScaledStdConv2d(3, 5, 3, padding=1, gamma=1.7139588594436646)
    ref.load_state_dict(conv.state_dict())
    x = torch.randn(2, 3, 6, 6)
    assert torch.allclose(conv(x), ref(x), atol=1e-5)


def test_remove_normalization_strips_every_norm_and_trains_at_batch_size_one():
    from lightning_ext.federated.fedwon import WSConv2d, remove_normalization

    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Sequential(nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4)), nn.Flatten(), nn.LazyLinear(10))
    x = torch.randn(1, 1, 8, 8)
    before = net[0](x)
    remove_normalization(net)
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in net.modules())
    assert sum(isinstance(m, WSConv2d) for m in net.modules()) == 2
    assert not torch.allclose(net[0](x), before)  # the same weights, now standardised
    model = Classifier(net, 10, optimizer=sgd)
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([3]))
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="activation"):
        remove_normalization(net, activation="tanh")


def test_fedprox_proximal_term_adds_mu_times_the_drift_to_the_gradient():
    """Two SGD steps: w2(mu) = w2(0) - lr * mu * (w1 - w0), since the proximal gradient is zero at w0."""
    from flwr.serverapp.strategy import FedProx

    def final(steps, mu):
        client = LightningClient(lambda: linear(sgd), data(), local_steps=steps)
        strategy = FedProx(proximal_mu=mu, fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
        sim = FederatedSimulation(client, num_clients=1, num_rounds=1, progress=False, strategy=strategy)
        return sim.fit(client.initial_arrays()), client.initial_arrays()

    w1, w0 = final(1, 0.0)
    plain, _ = final(2, 0.0)
    prox, _ = final(2, 0.5)
    for k in w0:
        assert torch.allclose(prox[k], plain[k] - 0.1 * 0.5 * (w1[k] - w0[k]), atol=1e-6)
        assert not torch.allclose(prox[k], plain[k])
