"""Tests of daml.resampling: unbiasedness, variance ordering, exact zero-weight safety, batching and
random-stream rules, and errors on bad input.

The Monte Carlo tests run with fixed seeds, so they are deterministic; each states the false-alarm
rate it would have with a fresh seed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from daml import resampling as rs
from daml._device import generator
from daml.errors import DtypeError, InputError, NonFiniteError, ShapeError

SCHEMES = ["multinomial", "systematic", "stratified", "residual"]
LOW_VARIANCE = ["systematic", "stratified", "residual"]
N = 50
REPS = 4000
ALPHA = 1e-3  # family-wise false-alarm rate of each unbiasedness test


def fixed_weights(n_particles: int = N) -> np.ndarray:
    """Non-uniform normalised weights with a few exact zeros and a few dominant particles."""
    rng = np.random.default_rng(12345)
    w = rng.gamma(0.8, size=n_particles)
    w[[0, 9, 10, 11, 33, n_particles - 1]] = 0.0
    w[[4, 27]] = [8.0, 5.0]
    return w / w.sum()


def weights_with_zeros(n_particles: int, rows: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` random weight rows that share zeros at the first and last index and in two runs."""
    rng = np.random.default_rng(seed)
    w = rng.exponential(size=(rows, n_particles))
    zero = np.zeros(n_particles, dtype=bool)
    zero[[0, n_particles - 1]] = True
    zero[5:9] = True
    zero[20:31] = True
    w[:, zero] = 0.0
    return w, zero


def counts(ancestors: torch.Tensor, n_particles: int) -> np.ndarray:
    return rs.offspring_counts(ancestors, n_particles).numpy()


# --------------------------------------------------------------------------------------------------
# unbiasedness and variance


@pytest.mark.parametrize("n", [N, 2 * N, N // 2], ids=["n=N", "n=2N", "n=N/2"])
@pytest.mark.parametrize("method", SCHEMES)
def test_unbiased(method, n):
    """E[copies_i] = n w_i for every particle.

    With R replications, |mean_i - n w_i| <= z sd_i / sqrt(R) for all N particles at once, where
    z = Phi^{-1}(1 - alpha / (2N)) (two-sided, Bonferroni over the N particles): a family-wise
    false-alarm rate of at most alpha = 1e-3 per (method, n) case (asymptotically in R). The 1e-9
    slack covers particles whose count never varies (zero weights, integer n w_i).
    """
    w = fixed_weights()
    batch = torch.from_numpy(w).expand(REPS, N)
    c = counts(rs.resample(batch, method, n, seed=2024), N)
    mean, sd = c.mean(axis=0), c.std(axis=0, ddof=1)
    z = stats.norm.isf(ALPHA / (2 * N))
    err = np.abs(mean - n * w)
    bound = z * sd / np.sqrt(REPS) + 1e-9
    assert np.all(err <= bound), f"worst particle {np.argmax(err - bound)}: {err.max()} > bound"
    assert np.all(c.sum(axis=1) == n)


def test_lower_variance_than_multinomial():
    """Summed over particles, systematic, stratified and residual have a smaller offspring-count
    variance than multinomial, whose variance matches n sum_i w_i (1 - w_i) within 10%.

    With R = 4000 replications the relative standard error of the summed multinomial variance is
    about 2%, so 10% is a five-sigma band; the other schemes' margins are far larger.
    """
    w = fixed_weights()
    batch = torch.from_numpy(w).expand(REPS, N)
    total_var = {m: counts(rs.resample(batch, m, seed=7), N).var(axis=0, ddof=1).sum() for m in SCHEMES}
    theory = N * np.sum(w * (1 - w))
    assert abs(total_var["multinomial"] - theory) <= 0.1 * theory
    for m in LOW_VARIANCE:
        assert total_var[m] < total_var["multinomial"], (m, total_var)


@pytest.mark.parametrize("n", [N, 3 * N, 17])
def test_systematic_copies_are_floor_or_ceil(n):
    rng = np.random.default_rng(5)
    w = rng.gamma(0.5, size=(2000, N))
    w[:, ::7] = 0.0
    nw = n * w / w.sum(axis=1, keepdims=True)
    c = counts(rs.systematic(w, n, seed=3), N)
    assert np.all(c >= np.floor(nw - 1e-9))
    assert np.all(c <= np.ceil(nw + 1e-9))


def test_residual_gives_at_least_the_deterministic_copies():
    rng = np.random.default_rng(6)
    w = rng.gamma(0.5, size=(1000, N))
    nw = N * w / w.sum(axis=1, keepdims=True)
    c = counts(rs.residual(w, seed=4), N)
    assert np.all(c >= np.floor(nw - 1e-9))


# --------------------------------------------------------------------------------------------------
# zero weights are never selected, exactly


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", SCHEMES)
def test_zero_weights_never_selected(method, dtype):
    n_particles = 40
    for seed in range(4):
        w, zero = weights_with_zeros(n_particles, rows=500, seed=seed)
        w = torch.as_tensor(w, dtype=dtype)
        for n in (n_particles, 3 * n_particles, 7):
            c = counts(rs.resample(w, method, n, seed=seed), n_particles)
            assert c[:, zero].sum() == 0
            assert np.all(c.sum(axis=1) == n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", SCHEMES)
def test_zero_weights_never_selected_with_extreme_uniforms(method, dtype):
    """The uniforms at the very ends of [0, 1): 0 and the largest float below 1.

    These are the values at which rounding could push a point onto 1.0 or a boundary onto the
    wrong side; the zero-weight particles at both ends and inside must still get no copy.
    """
    n_particles, rows = 30, 6
    w, zero = weights_with_zeros(n_particles, rows=rows, seed=1)
    w = torch.as_tensor(w, dtype=dtype)
    top = torch.nextafter(torch.tensor(1.0, dtype=dtype), torch.tensor(0.0, dtype=dtype))
    for n in (n_particles, 1000, 3):
        width = 1 if method == "systematic" else n
        for value in (top, torch.tensor(0.0, dtype=dtype)):
            u = value.expand(rows, width)
            c = counts(rs._with_uniforms(method, w, u, n), n_particles)
            assert c[:, zero].sum() == 0
            assert np.all(c.sum(axis=1) == n)


@pytest.mark.parametrize("method", SCHEMES)
def test_tiny_and_huge_weights_next_to_zeros(method):
    # Subnormal positive weights, and weights whose sum overflows float64 (rescaled internally).
    tiny = torch.tensor([[0.0, 5e-324, 0.0, 1e-320, 0.0]], dtype=torch.float64)
    huge = torch.tensor([[0.0, 1e308, 1e308, 0.0, 1e308]], dtype=torch.float64)
    for w in (tiny, huge):
        zero = (w[0] == 0).numpy()
        c = counts(rs.resample(w.expand(300, 5), method, 9, seed=0), 5)
        assert c[:, zero].sum() == 0
        assert np.all(c.sum(axis=1) == 9)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("method", SCHEMES)
def test_all_mass_on_one_particle(method, dtype):
    n_particles = 12
    for k in (0, 5, n_particles - 1):
        w = torch.zeros(3, n_particles, dtype=dtype)
        w[:, k] = torch.tensor([1.0, 1e-30, 7.5], dtype=dtype)
        for n in (n_particles, 5):
            a = rs.resample(w, method, n, seed=k)
            assert torch.equal(a, torch.full((3, n), k, dtype=torch.int64))


# --------------------------------------------------------------------------------------------------
# shapes, batching and random streams


@pytest.mark.parametrize("batch_shape", [(), (4,), (2, 3)])
@pytest.mark.parametrize("method", SCHEMES)
def test_output_shape_range_and_counts(method, batch_shape):
    n_particles, n = 20, 33
    w = torch.rand(*batch_shape, n_particles, generator=generator(0), dtype=torch.float64)
    a = rs.resample(w, method, n, seed=1)
    assert a.dtype == torch.int64
    assert a.shape == (*batch_shape, n)
    assert int(a.min()) >= 0 and int(a.max()) < n_particles
    c = rs.offspring_counts(a, n_particles)
    assert c.shape == (*batch_shape, n_particles)
    assert torch.all(c.sum(-1) == n)
    assert rs.resample(w, method, seed=1).shape == (*batch_shape, n_particles)  # n defaults to N


@pytest.mark.parametrize("method", ["systematic", "stratified"])
def test_sorted_output(method):
    w = torch.rand(10, 25, generator=generator(3), dtype=torch.float64)
    a = rs.resample(w, method, 40, seed=2)
    assert torch.all(a[:, 1:] >= a[:, :-1])


@pytest.mark.parametrize("n", [None, 11])
@pytest.mark.parametrize("method", SCHEMES)
def test_batch_equals_rows_in_turn(method, n):
    """A batch with a fresh generator == the rows one by one passing the same generator along."""
    w, _ = weights_with_zeros(30, rows=6, seed=9)
    w = torch.from_numpy(w).reshape(2, 3, 30)
    batch = rs.resample(w, method, n, seed=42)
    g = generator(42)
    rows = [rs.resample(row, method, n, seed=g) for row in w.reshape(6, 30)]
    assert torch.equal(batch, torch.stack(rows).reshape(batch.shape))


@pytest.mark.parametrize("method", SCHEMES)
def test_same_seed_same_result_different_seed_different(method):
    w = torch.rand(8, 100, generator=generator(1), dtype=torch.float64)
    a = rs.resample(w, method, seed=123)
    assert torch.equal(a, rs.resample(w, method, seed=123))
    assert torch.equal(a, rs.resample(w, method, seed=np.random.SeedSequence(123)))
    assert not torch.equal(a, rs.resample(w, method, seed=124))
    g = generator(5)
    assert not torch.equal(rs.resample(w, method, seed=g), rs.resample(w, method, seed=g))


@pytest.mark.parametrize("method", SCHEMES)
def test_weights_need_not_be_normalised(method):
    # Scaling by a power of two is exact, so the normalised weights, hence the ancestors, are equal.
    w = torch.rand(5, 40, generator=generator(2), dtype=torch.float64)
    assert torch.equal(rs.resample(w, method, seed=8), rs.resample(w * 2.0**-20, method, seed=8))


def test_resample_dispatches_to_the_named_function():
    assert set(rs.METHODS) == set(SCHEMES)
    w = torch.rand(3, 16, generator=generator(4), dtype=torch.float64)
    for name, fn in rs.METHODS.items():
        assert torch.equal(rs.resample(w, name, 10, seed=6), fn(w, 10, seed=6))
    assert torch.equal(rs.resample(w, seed=6), rs.systematic(w, seed=6))


@pytest.mark.parametrize("method", SCHEMES)
def test_resample_normalised_equals_resample_on_the_same_stream(method):
    w = torch.softmax(3.0 * torch.randn(4, 2, 50, generator=generator(9), dtype=torch.float64), -1)
    w[0, 1, :7] = 0.0                                   # zero weights too (rows need not sum to 1 exactly)
    g1, g2 = generator(11), generator(11)
    for _ in range(2):                                  # and both advance their generator alike
        assert torch.equal(rs.resample_normalised(w, method, g1), rs.resample(w, method, seed=g2))


def test_numpy_input_returns_long_tensor():
    w = np.array([[0.1, 0.0, 0.6, 0.3], [1.0, 2.0, 0.0, 1.0]])
    for method in SCHEMES:
        a = rs.resample(w, method, seed=0)
        assert isinstance(a, torch.Tensor) and a.dtype == torch.int64 and a.shape == (2, 4)
        assert not bool((a == 1)[0].any()) and not bool((a == 2)[1].any())
    assert rs.systematic(np.array([0, 3, 1]), seed=0).dtype == torch.int64  # integer weights


def test_half_precision_and_empty_batch():
    w = torch.tensor([[0.0, 1.0, 3.0]], dtype=torch.float16)
    assert counts(rs.systematic(w, 8, seed=0), 3)[0, 0] == 0
    assert rs.multinomial(torch.ones(0, 5), 4, seed=0).shape == (0, 4)


def test_systematic_known_answer():
    # Uniform weights and U = 0: the points j/n fall one in each particle.
    w = torch.full((1, 4), 0.25, dtype=torch.float64)
    assert rs._with_uniforms("systematic", w, torch.zeros(1, 1), 4).tolist() == [[0, 1, 2, 3]]
    # w = (0.5, 0, 0.5), n = 2, U = 0.9: points 0.45 and 0.95.
    w = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64)
    assert rs._with_uniforms("systematic", w, torch.tensor([0.9]), 2).tolist() == [0, 2]


# --------------------------------------------------------------------------------------------------
# offspring counts


def test_offspring_counts():
    a = torch.tensor([[0, 0, 2, 3], [1, 1, 1, 1]])
    assert rs.offspring_counts(a, 4).tolist() == [[2, 0, 1, 1], [0, 4, 0, 0]]
    assert rs.offspring_counts(np.array([2, 2]), 3).tolist() == [0, 0, 2]


@pytest.mark.parametrize(
    "ancestors, n_particles, error, argument",
    [
        (torch.tensor([0, 4]), 4, InputError, "ancestors"),
        (torch.tensor([-1, 0]), 4, InputError, "ancestors"),
        (torch.tensor([0.0, 1.0]), 4, DtypeError, "ancestors"),
        (torch.tensor(1), 4, ShapeError, "ancestors"),
        (torch.tensor([0, 1]), 0, InputError, "n_particles"),
    ],
    ids=["too-large", "negative", "float", "0-d", "n_particles=0"],
)
def test_offspring_counts_bad_input(ancestors, n_particles, error, argument):
    with pytest.raises(error, match=argument) as info:
        rs.offspring_counts(ancestors, n_particles)
    assert info.value.argument == argument


# --------------------------------------------------------------------------------------------------
# bad input

_GOOD = torch.tensor([[0.2, 0.3, 0.5], [0.1, 0.1, 0.8]], dtype=torch.float64)
BAD_INPUT = {
    "nan": (dict(weights=torch.tensor([0.2, float("nan"), 0.3])), NonFiniteError, "weights"),
    "inf": (dict(weights=torch.tensor([0.2, float("inf"), 0.3])), NonFiniteError, "weights"),
    "-inf": (dict(weights=torch.tensor([0.2, float("-inf"), 0.3])), NonFiniteError, "weights"),
    "negative": (dict(weights=torch.tensor([0.2, -0.1, 0.3])), InputError, "weights"),
    "all-zero row": (dict(weights=torch.tensor([[0.2, 0.3], [0.0, 0.0]])), InputError, "weights"),
    "empty last axis": (dict(weights=torch.zeros(3, 0)), ShapeError, "weights"),
    "0-d": (dict(weights=torch.tensor(1.0)), ShapeError, "weights"),
    "n=0": (dict(weights=_GOOD, n=0), InputError, "n"),
    "n=1.5": (dict(weights=_GOOD, n=1.5), InputError, "n"),
    "n=True": (dict(weights=_GOOD, n=True), InputError, "n"),
    "n=-3": (dict(weights=_GOOD, n=-3), InputError, "n"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
@pytest.mark.parametrize("method", SCHEMES)
def test_bad_input(method, case):
    kwargs, error, argument = BAD_INPUT[case]
    with pytest.raises(error) as info:
        rs.METHODS[method](**kwargs, seed=0)
    assert type(info.value) is error  # e.g. a negative weight is an InputError, not a NonFiniteError
    assert info.value.argument == argument
    assert str(info.value).startswith(f"{argument}: expected")


def test_all_zero_row_message_counts_rows():
    w = torch.tensor([[0.2, 0.3], [0.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    for method in SCHEMES:
        with pytest.raises(InputError, match="2 all-zero row"):
            rs.resample(w, method, seed=0)


@pytest.mark.parametrize("method", ["Systematic", "systematic_resampling", "", 3, None])
def test_unknown_method(method):
    with pytest.raises(InputError) as info:
        rs.resample(_GOOD, method, seed=0)
    assert info.value.argument == "method"
    assert "multinomial" in str(info.value) and "residual" in str(info.value)


# --------------------------------------------------------------------------------------------------
# CUDA


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", SCHEMES)
def test_cuda_runs_and_never_selects_zero_weights(method):
    w, zero = weights_with_zeros(40, rows=1000, seed=3)
    for dtype in (torch.float32, torch.float64):
        wc = torch.as_tensor(w, dtype=dtype, device="cuda")
        for n in (40, 123):
            a = rs.resample(wc, method, n, seed=1)
            assert a.device.type == "cuda" and a.dtype == torch.int64 and a.shape == (1000, n)
            c = rs.offspring_counts(a, 40).cpu().numpy()
            assert c[:, zero].sum() == 0
            assert np.all(c.sum(axis=1) == n)
            assert torch.equal(a, rs.resample(wc, method, n, seed=1))


# --------------------------------------------------------------------------------------------------
# internals that the CPU tests above cannot reach otherwise


@pytest.mark.parametrize("method", SCHEMES)
def test_single_particle(method):
    assert torch.equal(rs.resample(torch.tensor([[2.0], [0.5]]), method, 6, seed=0),
                       torch.zeros(2, 6, dtype=torch.int64))


@pytest.mark.parametrize("chunk", [1, 64, 100])
def test_systematic_chunking_does_not_change_the_result(monkeypatch, chunk):
    # Default chunks hold the whole small batch; tiny chunks force one or a few rows per chunk,
    # including rows longer than a chunk.
    w, zero = weights_with_zeros(70, rows=9, seed=2)
    expected = rs.systematic(w, 150, seed=3)
    monkeypatch.setitem(rs._CHUNK_ELEMENTS, "cpu", chunk)
    got = rs.systematic(w, 150, seed=3)
    assert torch.equal(got, expected)
    assert counts(got, 70)[:, zero].sum() == 0
    w[7] = 0.0
    with pytest.raises(InputError, match="1 all-zero row"):
        rs.systematic(w, seed=3)


def test_tie_zero_weights_repairs_a_parallel_scan():
    """The GPU-only repair of prefix sums: ties over zero weights, non-decreasing, 0 before the first
    positive weight. Exercised here on a CPU cumsum perturbed the way a parallel scan may round."""
    w, zero = weights_with_zeros(40, rows=5, seed=4)
    w = torch.from_numpy(w)
    cdf = torch.cumsum(w, -1)
    cdf *= 1 + 1e-12 * torch.randn(cdf.shape, generator=generator(0), dtype=cdf.dtype)
    rs._tie_zero_weights(cdf, w)
    assert torch.all(cdf[:, 1:] >= cdf[:, :-1])
    assert torch.all(cdf[:, 0] == 0)  # the first particle has zero weight
    idx = np.flatnonzero(zero)[1:]
    assert torch.equal(cdf[:, idx], cdf[:, idx - 1])
    cdf /= cdf[:, -1:].clone()
    u = torch.rand(5, 2000, generator=generator(1), dtype=cdf.dtype)
    assert counts(rs._locate(cdf, u), 40)[:, zero].sum() == 0
