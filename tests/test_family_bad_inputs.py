"""Bad values and broken files in vision, ssl, recsys and graph: one line naming the argument or the file.

Each row was tried as a user would (numbers as strings, negative weights, NaN, a truncated file); the error
must name what to change, never surface from inside torch or numpy.
"""

from __future__ import annotations

import pytest
from torch import nn

from lightning_ext.recsys.dccf import DCCF
from lightning_ext.recsys.interactions import InteractionFileDataModule, read_user_items_file
from lightning_ext.recsys.lastfm import LastFMDataModule
from lightning_ext.recsys.lightgcl import LightGCL
from lightning_ext.recsys.lightgcn import LightGCN
from lightning_ext.recsys.mf_bpr import MFBPR
from lightning_ext.recsys.movielens100k import MovieLens100KDataModule
from lightning_ext.recsys.ultragcn import UltraGCN
from lightning_ext.ssl.knn_evaluation import KNNEvaluation
from lightning_ext.ssl.simclr import SimCLR
from lightning_ext.vision.classifier import Classifier
from lightning_ext.vision.image_classifier import ImageClassifier
from lightning_ext.vision.mlp_classifier import MLPClassifier

NAN = float("nan")

BAD = [
    (lambda: MLPClassifier(num_features=4, num_classes=-3), "num_classes"),
    (lambda: MLPClassifier(num_features="4", num_classes=3), "num_features"),
    (lambda: MLPClassifier(num_features=4, num_classes=3, lr="0.1"), "lr"),
    (lambda: MLPClassifier(num_features=4, num_classes=3, dropout="0.1"), "dropout"),
    (lambda: MLPClassifier(num_features=4, num_classes=3, hidden="8"), "hidden"),
    (lambda: ImageClassifier("resnet18", num_classes="10"), "num_classes"),
    (lambda: ImageClassifier("resnet18", image_size="8"), r"image_size.*'8'"),
    (lambda: Classifier(nn.Linear(2, 2), num_classes=2, input_shape=("2",)), "input_shape"),
    (lambda: UltraGCN(w1=-1.0), "w1"),
    (lambda: LightGCN(reg_weight=NAN), "reg_weight"),
    (lambda: MFBPR(reg_weight="1e-4"), "reg_weight"),
    (lambda: LightGCN(num_users=3), "num_items"),
    (lambda: LightGCN(num_users="3", num_items="4"), "num_users"),
    (lambda: DCCF(embedding_dim="8"), "embedding_dim"),
    (lambda: LightGCL(eval_ks="10"), r"eval_ks must be a list.*'10'"),
    (lambda: LightGCL(eval_ks=["10"]), "eval_ks"),
    (lambda: SimCLR(temperature="0.1"), "temperature"),
    (lambda: KNNEvaluation(k="5"), "k must"),
]


@pytest.mark.parametrize("make, match", BAD)
def test_bad_values_are_refused_with_one_line_naming_the_argument(make, match):
    with pytest.raises(ValueError, match=match) as err:
        make()
    assert "\n" not in str(err.value)


def test_bad_planetoid_split_and_gcn_values_name_the_argument():
    pytest.importorskip("torch_geometric")
    from lightning_ext.graph.gcn_node_classifier import GCNNodeClassifier
    from lightning_ext.graph.planetoid import PlanetoidDataModule

    for make, match in ((lambda: PlanetoidDataModule(split="bogus"), "split must be one of"),
                        (lambda: PlanetoidDataModule(name="bogus"), "name must be one of"),
                        (lambda: GCNNodeClassifier(hidden="16"), "hidden"),
                        (lambda: GCNNodeClassifier(dropout=NAN), "dropout")):
        with pytest.raises(ValueError, match=match):
            make()


# -- interaction files -------------------------------------------------------------------------------------------


def test_user_items_file_errors_name_the_file_and_line(tmp_path):
    bad_token = tmp_path / "train.txt"
    bad_token.write_text("0 1 2\n1 2\n2 3 4x")  # cut off mid-token
    with pytest.raises(ValueError, match=r"train.txt:3: expected integers"):
        read_user_items_file(bad_token)
    negative = tmp_path / "neg.txt"
    negative.write_text("0 1 2\n1 -2\n")
    with pytest.raises(ValueError, match=r"neg.txt:2: ids must be >= 0 \(0-indexed\), got -2"):
        read_user_items_file(negative)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match=r"empty.txt: no `user item item ...` lines"):
        read_user_items_file(empty)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_user_items_file(tmp_path / "missing.txt")
    # through the DataModule the negative id is caught at the file, not as "ids fall outside"
    with pytest.raises(ValueError, match="neg.txt:2"):
        InteractionFileDataModule(str(negative), val_fraction=0).setup()


def _ml(tmp_path, body: str):
    path = tmp_path / "ml-100k.inter"
    path.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + body)
    return MovieLens100KDataModule(path=str(path))


def test_movielens_file_errors_name_the_file_and_what_is_wrong(tmp_path):
    with pytest.raises(ValueError, match=r"ml-100k.inter.*row 3.*4 columns"):
        _ml(tmp_path, "1\t2\t5\t100\n2\t3\n").load_splits()  # truncated in the last row
    with pytest.raises(ValueError, match=r"ml-100k.inter.*user and item ids must be >= 1"):
        _ml(tmp_path, "0\t2\t5\t100\n").load_splits()
    with pytest.raises(ValueError, match=r"ml-100k.inter.*ids must be at most 943 users and 1682 items"):
        _ml(tmp_path, "1\t2000\t5\t100\n").load_splits()
    with pytest.raises(ValueError, match=r"ml-100k.inter.*no ratings"):
        _ml(tmp_path, "").load_splits()
    with pytest.raises(FileNotFoundError, match="none.inter"):
        MovieLens100KDataModule(path=str(tmp_path / "none.inter"))


def test_lastfm_truncated_file_names_the_file(tmp_path):
    (tmp_path / "data1.txt").write_text("1\t2\t30\n2\t3\n")
    (tmp_path / "test1.txt").write_text("1\t3\t1\n")
    with pytest.raises(ValueError, match=r"data1.txt.*row 2"):
        LastFMDataModule(root=str(tmp_path)).load_splits()
