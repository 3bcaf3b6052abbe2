"""Issue 15 for the data family: an explicit data_dir is used or refused, bad files and fractions get one line."""

import gzip

import numpy as np
import pytest

from lightning_ext.data import fashion_mnist as fm_module
from lightning_ext.data.digits import DigitsDataModule
from lightning_ext.data.fashion_mnist import FashionMNISTDataModule


def _write_idx(folder, name, arr, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    data = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    data += arr.astype(np.uint8).tobytes()
    if gz:
        (folder / (name + ".gz")).write_bytes(gzip.compress(data))
    else:
        (folder / name).write_bytes(data)


def _tiny_copy(folder, n_train=120, n_test=30):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder, f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(folder, f"{split}-labels-idx1-ubyte", np.arange(n) % 10)


@pytest.fixture()
def other_copy(tmp_path, monkeypatch):
    """A complete copy in the default search path: it must never stand in for an explicit data_dir."""
    _tiny_copy(tmp_path / "default")
    monkeypatch.setattr(fm_module, "DEFAULT_SEARCH_PATHS", (str(tmp_path / "default"),))
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    return tmp_path / "default"


def _one_line(err) -> str:
    text = str(err.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize("kind", ["missing", "empty", "partial"])
def test_an_explicit_data_dir_is_used_or_refused_never_replaced(tmp_path, other_copy, kind):
    given = tmp_path / "mine"
    if kind != "missing":
        given.mkdir()
    if kind == "partial":
        _write_idx(given, "train-images-idx3-ubyte", np.zeros((4, 28, 28)))
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTDataModule(data_dir=str(given))
    text = _one_line(err)
    assert str(given) in text and str(other_copy) not in text
    if kind == "missing":
        assert "does not exist" in text
    else:
        assert "t10k-labels-idx1-ubyte" in text  # names what is missing


def test_without_data_dir_the_default_places_are_searched(other_copy):
    dm = FashionMNISTDataModule(val_fraction=0.25)
    dm.setup()
    assert dm.split_sizes == {"train": 90, "val": 30, "test": 30}


def test_staged_pipeline_refuses_a_missing_explicit_data_dir(tmp_path, other_copy):
    pytest.importorskip("torchdata")
    from lightning_ext.pipeline.datamodule import StagedPipelineDataModule

    given = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        StagedPipelineDataModule("fashion_mnist_png", data_dir=str(given), cache_dir=str(tmp_path / "cache"))
    assert str(given) in _one_line(err)


def test_staged_pipeline_does_not_reuse_pngs_written_from_another_copy(tmp_path, other_copy):
    pytest.importorskip("torchdata")
    from lightning_ext.pipeline.datamodule import StagedPipelineDataModule

    cache = tmp_path / "cache"
    first = StagedPipelineDataModule("fashion_mnist_png", train_samples=8, test_samples=4, cache_dir=str(cache))
    first.prepare_data()
    mine = tmp_path / "mine"
    rng = np.random.default_rng(1)
    for split, n in (("train", 20), ("t10k", 10)):
        _write_idx(mine, f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(mine, f"{split}-labels-idx1-ubyte", (np.arange(n) + 3) % 10)
    second = StagedPipelineDataModule("fashion_mnist_png", train_samples=8, test_samples=4, cache_dir=str(cache),
                                      data_dir=str(mine))
    second.prepare_data()
    labels = np.load(second._folders["train"] / "labels.npy")
    assert labels.tolist() == ((np.arange(8) + 3) % 10).tolist()


def test_truncated_gzip_idx_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(fm_module, "DEFAULT_SEARCH_PATHS", ())
    _tiny_copy(tmp_path)
    (tmp_path / "train-images-idx3-ubyte").unlink()
    _write_idx(tmp_path, "train-images-idx3-ubyte", np.zeros((120, 28, 28)), gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])  # cut inside the compressed stream
    dm = FashionMNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(ValueError) as err:
        dm.setup()
    text = _one_line(err)
    assert str(path) in text and "truncated" in text


def test_idx_header_shorter_than_its_dimensions_names_the_file(tmp_path):
    path = tmp_path / "short-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big"))
    with pytest.raises(ValueError) as err:
        fm_module.read_idx(path)
    assert str(path) in _one_line(err)


def test_images_and_labels_of_different_lengths_name_both_files(tmp_path, monkeypatch):
    monkeypatch.setattr(fm_module, "DEFAULT_SEARCH_PATHS", ())
    _tiny_copy(tmp_path)
    _write_idx(tmp_path, "train-labels-idx1-ubyte", np.arange(100) % 10)
    dm = FashionMNISTDataModule(data_dir=str(tmp_path))
    with pytest.raises(ValueError) as err:
        dm.setup()
    text = _one_line(err)
    assert "train-images-idx3-ubyte" in text and "train-labels-idx1-ubyte" in text and "120" in text


@pytest.mark.parametrize("fraction", [0.001, 0.005])
def test_a_train_fraction_that_empties_classes_is_refused_in_one_line(fraction):
    dm = DigitsDataModule(train_fraction=fraction)
    with pytest.raises(ValueError) as err:
        dm.setup()
    text = _one_line(err)
    assert "train_fraction" in text and "class" in text


def test_a_small_train_fraction_that_keeps_every_class_still_works():
    dm = DigitsDataModule(train_fraction=0.01)
    dm.setup()
    assert min(dm.class_counts()) >= 1
