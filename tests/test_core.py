"""core/: the shared mechanics every family uses."""

import math

import pytest
import torch

from lightning_ext.core import checkpoints, inputs, io, layers, paths, sampling, strategy, validation


def test_read_state_dict_refuses_non_finite_weights(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"state_dict": {"net.fc.weight": torch.tensor([1.0, float("nan")])}}, path)
    with pytest.raises(ValueError, match=r"net.fc.weight.*1 non-finite"):
        checkpoints.read_state_dict(path)
    assert checkpoints.read_state_dict(path, check_finite=False)["net.fc.weight"].shape == (2,)


def test_output_path_is_under_the_run_dir_and_none_disables():
    class T:
        log_dir = "/runs/v0"
    assert str(paths.output_path(T(), "a/b.png")) == "/runs/v0/a/b.png"
    assert str(paths.output_path(T(), "/abs/c.png")) == "/abs/c.png"
    assert paths.output_path(T(), None) is None
    with pytest.raises(ValueError, match="use None"):
        paths.output_path(T(), "")


def test_atomic_write_leaves_the_old_file_on_error(tmp_path):
    target = tmp_path / "x.txt"
    io.atomic_write_text("old", target)
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0, "3", True])
def test_check_positive_rejects_nan_inf_negative_and_non_numbers(value):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        validation.check_positive("temperature", value)


def test_check_helpers_accept_good_values():
    assert validation.check_fraction("keep", 1.0) == 1.0
    assert validation.check_positive_int("k", 3) == 3
    with pytest.raises(ValueError, match="an integer"):
        validation.check_positive_int("k", 2.5)
    assert validation.check_choice("which", "hard", ["hard", "easy"]) == "hard"
    with pytest.raises(ValueError, match="one of 'hard', 'easy'"):
        validation.check_choice("which", "medium", ["hard", "easy"])
    assert math.isfinite(validation.check_non_negative("w", 0))


def test_layer_globs_resolve_and_unknown_names_suggest_close_ones():
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert layers.resolve_layer_names(net, ["1.*"]) == ["1.0"]
    with pytest.raises(ValueError, match="Close names"):
        layers.resolve_layer_names(net, ["1.00"])


def test_refuse_sharded_strategy_catches_subclasses():
    FSDP = type("FSDPStrategy", (), {})
    Mine = type("MyFSDP", (FSDP,), {})

    class T:
        strategy = Mine()
    with pytest.raises(RuntimeError, match="MyFSDP shards them"):
        strategy.refuse_sharded_strategy(T(), "X", "edits weights", error=RuntimeError)

    class D:
        strategy = type("DDPStrategy", (), {})()
    strategy.refuse_sharded_strategy(D(), "X", "edits weights")


def test_batch_inputs_and_example_inputs():
    assert inputs.batch_inputs({"image": torch.zeros(2, 3)}).shape == (2, 3)
    with pytest.raises(ValueError, match="Cannot find the model inputs"):
        inputs.batch_inputs([1, 2])
    m = torch.nn.Linear(3, 1)
    m.example_input_array = torch.ones(4, 3)
    assert inputs.example_inputs(m).shape == (1, 3)


def test_epoch_sampler_two_ranks_interleave_to_one_process_and_resume_mid_epoch():
    one = sampling.EpochSampler(10, seed=3)
    one.set_epoch(2)
    full = list(one)
    r0, r1 = (sampling.EpochSampler(10, seed=3, rank=r, world_size=2) for r in (0, 1))
    for s in (r0, r1):
        s.set_epoch(2)
    assert [i for pair in zip(r0, r1) for i in pair] == full
    s = sampling.EpochSampler(10, seed=3)
    s.set_epoch(2)
    it = iter(s)
    head = [next(it) for _ in range(4)]
    state = s.state_dict()
    resumed = sampling.EpochSampler(10, seed=3)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full


def test_macs_count_a_module_holding_attributes_that_refuse_deepcopy():
    from lightning_ext.core.measure import count_macs_params, layer_macs

    def gen():
        yield 1

    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    net.scheduler_factory = gen()  # e.g. what LightningCLI or a live data-loader iterator leaves on a module
    assert count_macs_params(net, torch.zeros(2, 4))[0] == 26
    assert layer_macs(net, torch.zeros(2, 4)) == {"0": 15, "1": 3, "2": 8}
    assert next(net.scheduler_factory) == 1  # the user's attribute is untouched


def test_skipped_steps_travel_in_checkpoints_of_every_guarded_module():
    from lightning_ext.recsys.lightgcn import LightGCN
    from lightning_ext.ssl.self_supervised import ConvEncoder
    from lightning_ext.ssl.simclr import SimCLR
    from lightning_ext.vision.mlp_classifier import MLPClassifier

    for module in (MLPClassifier(num_features=4, num_classes=3), LightGCN(num_users=3, num_items=4),
                   SimCLR(ConvEncoder(1, (8, 16)), image_size=28, proj_hidden_dim=32, proj_output_dim=16)):
        module.skipped_steps = 3
        checkpoint = {}
        module.on_save_checkpoint(checkpoint)
        assert checkpoint["skipped_steps"] == 3
        module.skipped_steps = 0
        module.on_load_checkpoint(checkpoint)
        assert module.skipped_steps == 3


def test_checkpoints_with_the_clis_constrained_number_hparams_load_with_weights_only(tmp_path):
    """A module annotated with jsonargparse's constrained numbers saves them in its hyperparameters; such a
    checkpoint (what `lightning-ext fit` writes) must load with weights_only=True, while other globals stay refused."""
    from jsonargparse.typing import PositiveFloat

    from lightning_ext.core.checkpoints import load_checkpoint
    from lightning_ext.core.validation import AtLeastTwoInt, UnitIntervalRightOpen

    path = tmp_path / "fit.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {
        "lr": PositiveFloat(0.003), "ratio": UnitIntervalRightOpen(0.5), "views": AtLeastTwoInt(2)}}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["hyper_parameters"] == {"lr": 0.003, "ratio": 0.5, "views": 2}
    torch.save({"state_dict": {}, "hyper_parameters": {"bad": _NotAllowed()}}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_checkpoint(path)


class _NotAllowed:
    pass
