"""ImageClassifier: timm backbones on small images, local weights, and clear errors for misfits."""

import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from lightning_ext.datamodules import DigitsDataModule, TabularDataModule
from lightning_ext.modules import ImageClassifier, MLPClassifier


@pytest.mark.parametrize("size", [8, 28])
def test_resnet_adapted_to_small_grayscale_images(size):
    model = ImageClassifier("resnet18", num_classes=10, in_chans=1, image_size=size)
    assert model.net.conv1.stride == (1, 1) and isinstance(model.net.maxpool, nn.Identity)
    assert model(torch.randn(3, 1, size, size)).shape == (3, 10)


def test_large_images_keep_the_imagenet_stem():
    model = ImageClassifier("resnet18", num_classes=5, in_chans=3, image_size=96)
    assert model.net.conv1.stride == (2, 2) and isinstance(model.net.maxpool, nn.MaxPool2d)


def test_stem_downsample_2_keeps_the_pool():
    model = ImageClassifier("resnet10t", num_classes=10, image_size=28, stem_downsample=2)
    assert model.net.conv1[0].stride == (1, 1) and isinstance(model.net.maxpool, nn.MaxPool2d)
    with pytest.raises(ValueError, match="stem_downsample"):
        ImageClassifier("resnet10t", image_size=28, stem_downsample=3)


def test_any_module_can_be_the_backbone():
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    model = ImageClassifier(net, num_classes=10, image_size=8)
    assert model.net is net and "backbone" not in model.hparams


def test_unknown_backbone_name_suggests_close_names():
    with pytest.raises(ValueError, match=r"Unknown timm backbone 'resnet19'.*resnet18"):
        ImageClassifier("resnet19")


def test_wrong_image_size_for_the_backbone_is_explained():
    with pytest.raises(ValueError, match=r"cannot process images of shape \(1, 28, 28\).*img_size"):
        ImageClassifier("vit_tiny_patch16_224", num_classes=10, in_chans=1, image_size=28)
    # and the advice works
    model = ImageClassifier("vit_tiny_patch16_224", num_classes=10, image_size=28,
                            backbone_kwargs={"img_size": 28, "patch_size": 4})
    assert model(torch.zeros(1, 1, 28, 28)).shape == (1, 10)


def test_backbone_with_wrong_output_width_is_refused():
    with pytest.raises(ValueError, match=r"expected \(10,\) logits"):
        ImageClassifier(nn.Sequential(nn.Flatten(), nn.Linear(64, 7)), num_classes=10, image_size=8)


def _trainer():
    return Trainer(accelerator="cpu", fast_dev_run=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False)


def test_num_classes_that_disagrees_with_the_data_fails_before_training():
    model = ImageClassifier("resnet18", num_classes=7, image_size=8)
    with pytest.raises(ValueError, match=r"num_classes=7 but DigitsDataModule has 10.*num_classes: 10"):
        _trainer().fit(model, datamodule=DigitsDataModule())


def test_image_size_that_disagrees_with_the_data_fails_before_training():
    model = ImageClassifier("resnet18", num_classes=10, image_size=28)
    with pytest.raises(ValueError, match=r"expects inputs of shape \(1, 28, 28\).*image_size: \[8, 8\]"):
        _trainer().fit(model, datamodule=DigitsDataModule())


def test_mlp_on_tabular_trains_one_step():
    model = MLPClassifier(num_features=13, num_classes=3)
    _trainer().fit(model, datamodule=TabularDataModule("wine"))


def test_local_rgb_weights_load_into_a_grayscale_model(tmp_path):
    rgb = ImageClassifier("resnet18", num_classes=1000, in_chans=3, image_size=224)
    torch.save(rgb.net.state_dict(), tmp_path / "rgb.pt")
    gray = ImageClassifier("resnet18", num_classes=10, in_chans=1, image_size=28,
                           pretrained_weights=str(tmp_path / "rgb.pt"))
    torch.testing.assert_close(gray.net.conv1.weight, rgb.net.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(gray.net.layer1[0].conv1.weight, rgb.net.layer1[0].conv1.weight)
    assert gray.net.fc.weight.shape == (10, 512)  # head for another class count is skipped, not loaded


def test_lightning_checkpoint_loads_as_pretrained_weights(tmp_path):
    src = ImageClassifier("resnet18", num_classes=10, image_size=8)
    torch.save({"state_dict": src.state_dict()}, tmp_path / "model.ckpt")
    dst = ImageClassifier("resnet18", num_classes=10, image_size=8, pretrained_weights=str(tmp_path / "model.ckpt"))
    torch.testing.assert_close(dst.net.fc.weight, src.net.fc.weight)


def test_weights_load_without_unpickling_arbitrary_objects(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"state_dict": {"x": Evil()}}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        ImageClassifier("resnet18", num_classes=10, image_size=8, pretrained_weights=str(tmp_path / "evil.pt"))


def test_missing_or_foreign_weights_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageClassifier("resnet18", image_size=8, pretrained_weights=str(tmp_path / "nope.pt"))
    torch.save({"unrelated.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="No tensor"):
        ImageClassifier("resnet18", image_size=8, pretrained_weights=str(tmp_path / "other.pt"))


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="in_chans"):
        ImageClassifier("resnet18", in_chans=0)
    with pytest.raises(ValueError, match="num_classes"):
        ImageClassifier("resnet18", num_classes=1, image_size=8)
    with pytest.raises(ValueError, match="scheduler_interval"):
        ImageClassifier("resnet18", image_size=8, scheduler_interval="batch")


def test_checkpoint_round_trip_with_weights_only(tmp_path):
    from lightning_ext.testing import assert_same_parameters

    model = ImageClassifier("resnet18", num_classes=10, image_size=8, lr=0.01)
    trainer = Trainer(accelerator="cpu", max_steps=2, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(model, datamodule=DigitsDataModule())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    restored = ImageClassifier.load_from_checkpoint(tmp_path / "m.ckpt", weights_only=True)
    assert restored.hparams.lr == 0.01 and restored.hparams.stem_downsample == 1
    assert_same_parameters(model, restored)


def test_non_finite_pretrained_weights_are_refused(tmp_path):
    src = ImageClassifier("resnet18", num_classes=10, image_size=8)
    state = src.net.state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(ValueError, match=r"'layer1\.0\.conv1\.weight' holds 1 non-finite"):
        ImageClassifier("resnet18", num_classes=10, image_size=8, pretrained_weights=str(tmp_path / "nan.pt"))
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("inf")
    torch.save({"state_dict": {f"net.{k}": v for k, v in state.items()}}, tmp_path / "inf.ckpt")
    with pytest.raises(ValueError, match="non-finite"):
        ImageClassifier("resnet18", num_classes=10, image_size=8, pretrained_weights=str(tmp_path / "inf.ckpt"))


NAN, INF = float("nan"), float("inf")
_NET = lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 10))  # noqa: E731


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": -3}, "num_classes"), ({"num_classes": 1}, "num_classes"), ({"num_classes": 2.5}, "num_classes"),
    ({"in_chans": 0}, "in_chans"), ({"image_size": 0}, "image_size"), ({"image_size": (8, -8)}, "image_size"),
    ({"image_size": (8, 8, 8)}, "image_size"), ({"stem_downsample": 3}, "stem_downsample"),
    ({"lr": NAN}, "lr"), ({"lr": -1.0}, "lr"), ({"weight_decay": INF}, "weight_decay"),
    ({"weight_decay": -0.1}, "weight_decay"), ({"scheduler_interval": "batch"}, "scheduler_interval"),
], ids=str)
def test_image_classifier_refuses_bad_values(kwargs, match):
    kwargs = {"image_size": 8, **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        ImageClassifier("resnet18", **kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": -3}, "num_classes"), ({"lr": NAN}, "lr"), ({"lr": 0}, "lr"),
    ({"weight_decay": NAN}, "weight_decay"), ({"scheduler_interval": "never"}, "scheduler_interval"),
    ({"input_shape": (1, 0, 8)}, "input_shape"),
], ids=str)
def test_classifier_refuses_bad_values(kwargs, match):
    from lightning_ext.modules import Classifier

    kwargs = {"num_classes": 10, **kwargs}
    with pytest.raises(ValueError, match=match):
        Classifier(_NET(), **kwargs)


@pytest.mark.parametrize("kwargs, match", [
    ({"num_classes": -3}, "num_classes"), ({"num_features": 0}, "num_features"), ({"hidden": [32, 0]}, "hidden"),
    ({"dropout": NAN}, "dropout"), ({"dropout": 1.0}, "dropout"), ({"lr": INF}, "lr"),
], ids=str)
def test_mlp_classifier_refuses_bad_values(kwargs, match):
    kwargs = {"num_features": 13, "num_classes": 3, **kwargs}
    with pytest.raises(ValueError, match=match):
        MLPClassifier(**kwargs)


def test_bad_yaml_values_are_refused_by_the_cli_with_their_key():
    """The constructor types (Literal, constrained numbers) let the CLI parser refuse a value before building."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ImageClassifier, "model")
    assert parser.parse_args(["--model.stem_downsample=2", "--model.num_classes=3"]).model.stem_downsample == 2
    for bad in ("--model.stem_downsample=3", "--model.num_classes=1", "--model.lr=-0.1",
                "--model.scheduler_interval=batch"):
        with pytest.raises(Exception, match=bad.split("=")[0].lstrip("-")):
            parser.parse_args([bad])


def test_vision_hooks_are_marked_override_with_a_docstring():
    from lightning.pytorch import LightningModule

    from lightning_ext.modules import Classifier

    for cls in (Classifier, ImageClassifier, MLPClassifier):
        for name, fn in vars(cls).items():
            if callable(fn) and not name.startswith("_") and hasattr(LightningModule, name):
                assert getattr(fn, "__override__", False), f"{cls.__name__}.{name} lacks @override"
                assert fn.__doc__ and fn.__doc__.strip(), f"{cls.__name__}.{name} lacks a docstring"
