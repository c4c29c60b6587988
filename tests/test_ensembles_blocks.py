"""Member blocks of daml.ensembles.fit (issue 31): the blocks of fit_block, gathered, are the ensemble of
the single-process fit bit for bit (torch.equal on every tensor); the oracle is fit itself."""

import inspect
import math
import warnings

import numpy as np
import pytest
import torch

import daml.ensembles as E
from daml.ensembles import training as T
from daml.errors import ConvergenceWarning, InputError, ModuleError, SeedError


def data(n=40, d=2, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


KW = dict(noise_sd=0.1, seed=5, epochs=20, batch_size=16, lr=0.01)


def assert_same(a, b):
    """Every tensor of two ensembles torch.equal (histories: NaN where NaN), and the same config."""
    for name in ("params", "buffers", "prior_sd", "prior_draw", "convergence"):
        da, db = getattr(a, name), getattr(b, name)
        assert list(da) == list(db), name
        for k in da:
            assert torch.equal(da[k], db[k]), f"{name}[{k}]"
    for name in ("log_weight", "x_mean", "x_sd", "y_mean", "y_sd"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.history.shape == b.history.shape
    assert torch.equal(a.history.isnan(), b.history.isnan())
    assert torch.equal(a.history.nan_to_num(), b.history.nan_to_num())
    assert a.config == b.config and a.likelihood == b.likelihood
    assert a.noise_sd == b.noise_sd or (math.isnan(a.noise_sd) and math.isnan(b.noise_sd))
    assert (a.prior is None) == (b.prior is None)
    if a.prior is not None:
        for name in ("mean", "cov", "chol", "precision"):
            assert torch.equal(getattr(a.prior, name), getattr(b.prior, name)), name


def blocks_of(module, x, y, spans, members, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)        # fit_block leaves the warning to gather
        return [T.fit_block(module, x, y, first=f, count=c, members=members, **kw) for f, c in spans]


def _mvn(p):
    a = torch.linspace(-1, 1, p * p, dtype=torch.float64).reshape(p, p)
    return torch.distributions.MultivariateNormal(torch.zeros(p, dtype=torch.float64),
                                                  0.3 * torch.eye(p, dtype=torch.float64) + 0.05 * a @ a.T / p)


CASES = {
    "diagonal prior, polish": dict(),
    "no polish": dict(polish=False),
    "common prior draw": dict(common_prior_draw=True),
    "full-covariance prior": dict(prior=_mvn(17)),           # mlp(2, 4) has 17 parameters
    "Student-t prior": dict(prior=torch.distributions.StudentT(5.0 * torch.ones(17, dtype=torch.float64))),
    "heteroscedastic": dict(likelihood="heteroscedastic", perturb_targets=False, noise_sd=None),
}


@pytest.mark.parametrize("case", list(CASES))
def test_gathered_blocks_equal_fit(case):
    x, y = data()
    kw = dict(KW, **CASES[case])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        net = E.mlp(2, 4, outputs=2 if case == "heteroscedastic" else 1)
        whole = E.fit(net, x, y, members=5, **kw)
        blocks = blocks_of(net, x, y, [(0, 2), (2, 3)], 5, **kw)
        gathered = T.gather(blocks)
        shuffled = T.gather(blocks[::-1])                       # any order: gather sorts by first member
    assert_same(whole, gathered)
    assert_same(whole, shuffled)
    assert "block" not in gathered.config and gathered.config["members"] == 5
    assert blocks[1].config["block"]["first"] == 2 and blocks[1].config["block"]["count"] == 3
    assert torch.allclose(torch.logsumexp(blocks[1].log_weight, 0), torch.zeros((), dtype=torch.float64))
    if case == "common prior draw":                             # member 0's draw in the block without member 0
        assert torch.equal(blocks[1].prior_draw["0.weight"][0], whole.prior_draw["0.weight"][0])


@pytest.mark.parametrize("prior", ["diagonal", "full covariance"])
def test_blocks_at_every_offset_and_alone(prior):
    # 97 parameters (odd) and the polish: without the padding of fit_block a member's numbers depended on
    # its memory alignment (MKL's triangular solves) and on being alone in its pass; blocks start at
    # offsets that are and are not multiples of 8, and one holds a single member
    x, y = data(n=48, d=4)
    kw = dict(KW, epochs=8, prior=None if prior == "diagonal" else _mvn(97))
    spans = [(0, 3), (3, 1), (4, 5), (9, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        whole = E.fit(E.mlp(4, 16), x, y, members=10, **kw)
        gathered = T.gather(blocks_of(E.mlp(4, 16), x, y, spans, 10, **kw))
        singles = T.gather(blocks_of(E.mlp(4, 16), x, y, [(i, 1) for i in range(10)], 10, **kw))
    assert_same(whole, gathered)
    assert_same(whole, singles)


def test_sequential_blocks_of_a_dropout_module_equal_sequential_fit():
    # vectorize=False gives member i the dropout stream rng_seed + i of its own, so blocks reproduce it
    x, y = data()
    kw = dict(KW, members=4, epochs=4, vectorize=False)
    net = E.mlp(2, 6, dropout=0.2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        whole = E.fit(net, x, y, **kw)
        gathered = T.gather([T.fit_block(net, x, y, first=f, count=c, **kw) for f, c in [(0, 1), (1, 3)]])
    assert_same(whole, gathered)
    # vectorize=True draws the masks of a pass from one stream: a partial block is refused, naming module
    with pytest.raises(ModuleError, match="module"):
        T.fit_block(net, x, y, first=0, count=2, **dict(kw, vectorize=True))


def test_weights_and_predictive_of_gathered_equal_fit():
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        whole = E.fit(E.mlp(2, 4), x, y, members=5, **KW)
        gathered = T.gather(blocks_of(E.mlp(2, 4), x, y, [(3, 2), (0, 3)], 5, **KW))
    wa, ia = E.weigh(whole, x, y)
    wb, ib = E.weigh(gathered, x, y)
    assert torch.equal(wa.log_weight, wb.log_weight) and torch.equal(ia.log_weight, ib.log_weight)
    assert ia.ess == ib.ess
    x_new = torch.linspace(-2, 2, 7, dtype=torch.float64).reshape(-1, 1).repeat(1, 2)
    pa, pb = E.predict(wa, x_new, seed=0), E.predict(wb, x_new, seed=0)
    for name in pa.data_vars:
        np.testing.assert_array_equal(pa[name].values, pb[name].values)


def test_gather_warns_once_about_unconverged_members():
    x, y = data()
    kw = dict(KW, epochs=1, polish=False)                       # one epoch: nobody converges
    blocks = blocks_of(E.mlp(2, 4), x, y, [(0, 2), (2, 3)], 5, **kw)
    with pytest.warns(ConvergenceWarning, match="5 of 5 members") as record:
        T.gather(blocks)
    assert sum(issubclass(r.category, ConvergenceWarning) for r in record) == 1


@pytest.fixture(scope="module")
def small_blocks():
    x, y = data(n=20)
    kw = dict(KW, epochs=2, polish=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        blocks = [T.fit_block(E.mlp(2, 3), x, y, first=f, count=c, members=6, **kw) for f, c in
                  [(0, 2), (2, 2), (4, 2)]]
        other_seed = T.fit_block(E.mlp(2, 3), x, y, first=2, count=2, members=6, **dict(kw, seed=6))
        other_lr = T.fit_block(E.mlp(2, 3), x, y, first=2, count=2, members=6, **dict(kw, lr=0.02))
        other_data = T.fit_block(E.mlp(2, 3), x, y + 1e-9, first=2, count=2, members=6, **kw)
        other_net = T.fit_block(E.mlp(2, 3, activation="silu"), x, y, first=2, count=2, members=6, **kw)
        whole = E.fit(E.mlp(2, 3), x, y, members=6, **kw)
    return blocks, dict(seed=other_seed, lr=other_lr, data=other_data, net=other_net), whole


def test_gather_refuses_gaps_overlaps_and_mixed_fits(small_blocks):
    blocks, other, whole = small_blocks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        assert_same(T.gather([blocks[2], blocks[0], blocks[1]]), whole)
    with pytest.raises(InputError, match=r"blocks: .*gap: members 2 \.\. 3"):
        T.gather([blocks[0], blocks[2]])
    with pytest.raises(InputError, match=r"blocks: .*gap: members 4 \.\. 5"):
        T.gather(blocks[:2])
    with pytest.raises(InputError, match=r"blocks: .*gap: members 0 \.\. 1"):
        T.gather(blocks[1:])
    with pytest.raises(InputError, match=r"blocks: .*overlap: members 2 \.\. 3"):
        T.gather([*blocks, blocks[1]])
    for what, block in other.items():
        with pytest.raises(InputError, match="blocks: .*differ in") as info:
            T.gather([blocks[0], block, blocks[2]])
        assert {"seed": "seed", "lr": "lr", "data": "data", "net": "module"}[what] in str(info.value)
    with pytest.raises(InputError, match="blocks: .*without a block record"):
        T.gather([whole])
    with pytest.raises(InputError, match="blocks: .*empty"):
        T.gather([])
    with pytest.raises(InputError, match="blocks"):
        T.gather(blocks[0])
    with pytest.raises(InputError, match=r"blocks: .*blocks\[1\] of type int"):
        T.gather([blocks[0], 3])


def test_fit_block_argument_checks_name_the_argument():
    x, y = data(n=10)
    kw = dict(KW, epochs=1)
    for bad, name in [(dict(first=-1, count=1), "first"), (dict(first=5, count=1), "first"),
                      (dict(first=1.5, count=1), "first"), (dict(first=0, count=0), "count"),
                      (dict(first=3, count=3), "count"), (dict(first=0, count=True), "count")]:
        with pytest.raises(InputError, match=f"^{name}: "):
            T.fit_block(E.mlp(2, 3), x, y, members=5, **bad, **kw)
    with pytest.raises(InputError, match="^members: "):
        T.fit_block(E.mlp(2, 3), x, y, first=0, count=1, members=0, **kw)
    with pytest.raises(InputError, match="^threads: "):
        T.fit_block(E.mlp(2, 3), x, y, first=0, count=1, members=5, threads=0, **kw)
    for seed in (None, torch.Generator().manual_seed(0)):
        with pytest.raises(SeedError, match="^seed: "):
            T.fit_block(E.mlp(2, 3), x, y, first=0, count=1, members=5, **dict(kw, seed=seed))
    with pytest.raises(InputError, match="^fit_kwargs: .*momentum"):
        T.fit_block(E.mlp(2, 3), x, y, first=0, count=1, members=5, momentum=0.9, **kw)


def test_a_seed_sequence_is_not_advanced_and_gives_fits_stream():
    x, y = data(n=20)
    kw = dict(KW, epochs=2, polish=False)
    ss = np.random.SeedSequence(1234)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        blocks = [T.fit_block(E.mlp(2, 3), x, y, first=f, count=2, members=4, **dict(kw, seed=ss)) for f in (0, 2)]
        assert ss.n_children_spawned == 0
        whole = E.fit(E.mlp(2, 3), x, y, members=4, **dict(kw, seed=np.random.SeedSequence(1234)))
        gathered = T.gather(blocks)
    assert_same(whole, gathered)


def test_fit_threads_and_fit_defaults():
    x, _ = data(n=50)
    assert T.fit_threads(E.mlp(2, 4), x, members=5) == 1                     # a small network: one thread
    big = E.mlp(2, 256)
    work = T._device.network_work(big, 500, 32)
    expected = T._device.choose_threads(work)
    assert T.fit_threads(big, x, members=500) == (expected or torch.get_num_threads())
    with pytest.raises(InputError, match="^members: "):
        T.fit_threads(big, x, members=0)
    # fit_block forwards every keyword of fit with fit's defaults
    params = inspect.signature(E.fit).parameters
    defaults = {k: p.default for k, p in params.items()
                if p.kind is p.KEYWORD_ONLY and k not in ("members", "client", "block")}   # the Dask route's own
    assert defaults == T._FIT_DEFAULTS
    assert math.isclose(T._FIT_DEFAULTS["tol"], T.DEFAULT_TOL)


def test_blocks_survive_pickling(small_blocks):
    # the blocks travel from workers to the client pickled (Dask); the unpickled blocks gather to fit's
    import pickle

    blocks, _, whole = small_blocks
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        gathered = T.gather([pickle.loads(pickle.dumps(b)) for b in blocks])
    assert_same(gathered, whole)


def test_large_network_on_one_thread():
    # 67 329 parameters (above torch's reduction grain and MKL's small-matrix paths); on one intra-op
    # thread the blocks equal the fit (on 4 threads they did not: see the module docstring)
    x, y = data(n=32, d=4)
    kw = dict(KW, epochs=2, batch_size=32)
    net = E.mlp(4, [256, 256])
    with warnings.catch_warnings(), T._device.threads(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        whole = E.fit(net, x, y, members=4, **kw)
        gathered = T.gather(blocks_of(net, x, y, [(0, 1), (1, 3)], 4, threads=1, **kw))
    assert_same(whole, gathered)
