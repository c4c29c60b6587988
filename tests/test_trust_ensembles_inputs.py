"""Bad inputs to daml.ensembles and daml.causal are refused up front with a daml error naming the argument
(issue 26, fuzz wave 2): impossible sizes before any allocation or training, wrong types before torch or
numpy see them."""

import math
import time

import numpy as np
import pytest
import torch

import daml.causal as causal
import daml.ensembles as E
from daml.errors import InputError, ShapeError

HUGE = 10**12


@pytest.fixture(scope="module")
def data():
    r = np.random.default_rng(0)
    x = r.normal(size=(24, 2))
    y = np.sin(x[:, 0]) + 0.1 * r.normal(size=24)
    return x, y


@pytest.fixture(scope="module")
def ens(data):
    return E.fit(E.mlp(2, 4, activation="tanh"), *data, members=2, noise_sd=0.1, epochs=3, seed=0)


def _refused(call, name, kind=InputError, seconds=5.0):
    t0 = time.perf_counter()
    with pytest.raises(kind) as info:
        call()
    assert time.perf_counter() - t0 < seconds, "refused only after the work"
    assert str(info.value).startswith(f"{name}:"), str(info.value)
    return info.value


# ---- daml.ensembles.mlp / forward -------------------------------------------------------------------------

@pytest.mark.parametrize("hidden", [2.5, math.nan, None, "16", {"a": 1}, True, (4, 2.5), (4, -1)])
def test_mlp_refuses_bad_hidden(hidden):
    _refused(lambda: E.mlp(2, hidden), "hidden")


@pytest.mark.parametrize("arg", ["inputs", "hidden", "outputs"])
def test_mlp_refuses_widths_that_cannot_fit(arg):
    kw = dict(inputs=2, hidden=4, outputs=1)
    kw[arg] = HUGE
    _refused(lambda: E.mlp(**kw), arg)


def test_mlp_accepts_numpy_ints_and_sequences():
    net = E.mlp(np.int64(3), np.array([5, 4]), outputs=2)
    assert net(torch.ones(7, 3)).shape == (7, 2)
    assert net[0].weight.shape == (5, 3) and net[2].weight.shape == (4, 5)
    assert E.mlp(3, ())(torch.ones(2, 3)).shape == (2, 1)


@pytest.mark.parametrize("dropout", ["yes", None, 1, 0.0])
def test_forward_refuses_non_bool_dropout(ens, data, dropout):
    _refused(lambda: E.forward(ens, data[0][:3], dropout=dropout), "dropout")


# ---- fit, deep_ensemble, estimate_noise: members allocate --------------------------------------------------

def test_fit_refuses_members_that_cannot_fit(data):
    err = _refused(lambda: E.fit(E.mlp(2, 4), *data, members=HUGE, noise_sd=0.1, epochs=1), "members")
    assert "memory" in str(err)


@pytest.mark.parametrize("epochs", [2.5, -1, 0, True, None, math.nan])
def test_fit_refuses_bad_epochs(data, epochs):
    _refused(lambda: E.fit(E.mlp(2, 4), *data, members=2, noise_sd=0.1, epochs=epochs), "epochs")


def test_fit_trains_under_no_grad(data):
    """fit needs autograd: under torch.no_grad() it used to fail with torch's own 'does not require grad'."""
    ref = E.fit(E.mlp(2, 4, activation="tanh"), *data, members=2, noise_sd=0.1, epochs=3, seed=1)
    with torch.no_grad():
        got = E.fit(E.mlp(2, 4, activation="tanh"), *data, members=2, noise_sd=0.1, epochs=3, seed=1)
    assert torch.equal(E.flat_params(ref), E.flat_params(got))


def test_deep_ensemble_refuses_bad_sizes(data):
    _refused(lambda: E.deep_ensemble(*data, members=HUGE, hidden=4, epochs=1), "members")
    for hidden in (2.5, None, math.nan, HUGE):
        _refused(lambda: E.deep_ensemble(*data, members=2, hidden=hidden, epochs=1), "hidden")


def test_estimate_noise_refuses_members_that_cannot_fit(data):
    _refused(lambda: E.estimate_noise(E.mlp(2, 4), *data, members=HUGE, epochs=1), "members")


# ---- predict, uncertainty_sources ------------------------------------------------------------------------

def test_predict_refuses_dropout_passes_that_cannot_fit(ens, data):
    _refused(lambda: E.predict(ens, data[0][:4], dropout_passes=HUGE), "dropout_passes")
    _refused(lambda: E.predict(ens, data[0][:4], input_sd=0.1, input_samples=HUGE), "input_samples")


BAD_X_NEW = {
    "empty": (lambda x: x[:0], ShapeError),
    "wrong_shape": (lambda x: x[:, :1], ShapeError),
    "extra_dim": (lambda x: x[None, None], ShapeError),
    "nan": (lambda x: np.where(np.arange(x.size).reshape(x.shape) == 0, np.nan, x), InputError),
    "complex": (lambda x: x.astype(complex), InputError),
    "str": (lambda x: np.full(x.shape, "a"), InputError),
    "None": (lambda x: None, InputError),
    "dict": (lambda x: {"a": 1}, InputError),
}


@pytest.mark.parametrize("label", sorted(BAD_X_NEW))
def test_uncertainty_sources_checks_x_new_before_training(data, label):
    make, kind = BAD_X_NEW[label]
    _refused(lambda: E.uncertainty_sources(E.mlp(2, 4), *data, make(data[0][:3]), noise_sd=0.1, members=2,
                                           samples=20, correction_steps=2, epochs=50, seed=0), "x_new", kind,
             seconds=2.0)


@pytest.mark.parametrize("arg,value", [("members", HUGE), ("members", 1), ("samples", HUGE), ("samples", 0),
                                       ("noise_sd", -1.0), ("correction_steps", 2.5), ("model_sd", math.nan)])
def test_uncertainty_sources_checks_sizes_before_training(data, arg, value):
    kw = dict(noise_sd=0.1, members=2, samples=20, correction_steps=2, epochs=50, seed=0)
    kw[arg] = value
    _refused(lambda: E.uncertainty_sources(E.mlp(2, 4), *data, data[0][:3], **kw), arg, seconds=2.0)


# ---- fisher ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [None, "ens", {"a": 1}, 3])
def test_fisher_refuses_non_ensembles(data, bad):
    _refused(lambda: E.fisher(bad, *data), "ens")


# ---- daml.causal -------------------------------------------------------------------------------------------

def test_sample_splits_accepts_half_precision_groups():
    labels = np.arange(10) % 5
    ref = causal.sample_splits(10, 2, seed=0, groups=labels)
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.int64):
        got = causal.sample_splits(10, 2, seed=0, groups=torch.as_tensor(labels).to(dtype))
        for (tr_a, te_a), (tr_b, te_b) in zip(ref[0], got[0]):
            assert np.array_equal(tr_a, tr_b) and np.array_equal(te_a, te_b)
    # a group never straddles two folds
    for _, test in ref[0]:
        assert set(labels[test]).isdisjoint(set(np.delete(labels, test)))


def test_sample_splits_names_the_size_that_cannot_fit():
    _refused(lambda: causal.sample_splits(10, 2, repetitions=HUGE, seed=0), "repetitions")
    _refused(lambda: causal.sample_splits(HUGE, 2, seed=0), "n")


@pytest.mark.parametrize("cut", [0, 59])
def test_cross_fit_blames_a_short_target(cut):
    from sklearn.linear_model import LinearRegression

    r = np.random.default_rng(1)
    x, y = r.normal(size=(60, 2)), r.normal(size=60)
    splits = causal.sample_splits(60, 2, seed=0)
    _refused(lambda: causal.cross_fit(LinearRegression(), x, y[:cut], splits), "target", ShapeError)
    _refused(lambda: causal.cross_fit(LinearRegression(), x[:cut], y, splits), "x", ShapeError)


def test_partition_refuses_members_that_cannot_fit():
    from sklearn.linear_model import LinearRegression

    site = causal.synthetic_site(years=1, seed=0).to_dataframe().iloc[:400]
    _refused(lambda: causal.partition(site, folds=2, members=HUGE, seed=0, ml_l=LinearRegression(),
                                      ml_m=LinearRegression(), final=LinearRegression()), "members")


@pytest.mark.parametrize("iterations", [2.5, 0, -1, True, None, math.nan])
def test_iteration_counts_refuse_non_ints(iterations):
    with pytest.raises(InputError, match="^iterations:"):
        causal.MLPRegressor(hidden=(4,), iterations=iterations).fit(np.zeros((6, 2)), np.arange(6.0))


def test_causal_errors_name_the_argument_at_fault(tmp_path):
    site = causal.synthetic_site(years=1, seed=0)
    _refused(lambda: causal.default_learner("no-such-kind"), "kind")
    _refused(lambda: causal.to_fluxnet_csv(site, tmp_path / "x.csv", nee="no-such-variable"), "nee")
    with pytest.raises(InputError, match="steps_per_day=10000"):
        causal.smoothed_potential_radiation(np.ones(960), steps_per_day=10**4)
    frame = site.to_dataframe()
    _refused(lambda: causal.q10(frame.iloc[:0], folds=2, seed=0), "data", ShapeError)
    with pytest.raises(InputError, match="^learner:"):       # q10's own argument, not default_learner's
        causal.q10(frame.iloc[:200], learner="no-such-kind", folds=2, seed=0)
