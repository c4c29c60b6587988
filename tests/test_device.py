import math
import numpy as np
import pytest
import torch

from daml import _device
from daml.errors import DeviceError, DtypeError, SeedError


def test_default_dtype_is_float64_on_cpu():
    assert _device.resolve_dtype() is torch.float64
    assert _device.resolve_dtype(None, "cpu") is torch.float64


@pytest.mark.parametrize("given, expected", [("float32", torch.float32), (np.float64, torch.float64),
                                             (torch.float16, torch.float16), ("double", torch.float64)])
def test_dtype_spellings(given, expected):
    assert _device.resolve_dtype(given) is expected


@pytest.mark.parametrize("bad", ["int32", torch.int64, "bogus", object])
def test_bad_dtype_names_argument(bad):
    with pytest.raises(DtypeError, match="dtype"):
        _device.resolve_dtype(bad)


def test_device_from_inputs_and_bad_devices():
    assert _device.resolve_device(None, like=torch.zeros(2)).type == "cpu"
    with pytest.raises(DeviceError, match="device"):
        _device.resolve_device("tpu:7")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="device: expected a device that exists"):
            _device.resolve_device("cuda")


def test_int_seed_is_reproducible_and_matches_seed_sequence():
    a = torch.rand(5, generator=_device.generator(3), dtype=torch.float64)
    b = torch.rand(5, generator=_device.generator(3), dtype=torch.float64)
    c = torch.rand(5, generator=_device.generator(np.random.SeedSequence(3)), dtype=torch.float64)
    d = torch.rand(5, generator=_device.generator(4), dtype=torch.float64)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.equal(a, d)


def test_generator_is_passed_through_and_advances():
    g = torch.Generator().manual_seed(11)
    assert _device.generator(g) is g
    first = torch.rand(3, generator=_device.generator(g))
    second = torch.rand(3, generator=_device.generator(g))
    assert not torch.equal(first, second)


def test_spawned_streams_are_distinct_and_reproducible():
    gens = _device.spawn_generators(5, 4)
    draws = torch.stack([torch.rand(8, generator=g, dtype=torch.float64) for g in gens])
    again = torch.stack([torch.rand(8, generator=g, dtype=torch.float64) for g in _device.spawn_generators(5, 4)])
    assert torch.equal(draws, again)
    assert len({tuple(r.tolist()) for r in draws}) == 4
    # children of a seed differ from the parent stream
    parent = torch.rand(8, generator=_device.generator(5), dtype=torch.float64)
    assert not any(torch.equal(parent, r) for r in draws)


def test_seed_sequence_from_generator_depends_on_state():
    g = torch.Generator().manual_seed(1)
    s1 = _device.seed_sequence(g)
    s2 = _device.seed_sequence(g)
    assert s1.entropy != s2.entropy


@pytest.mark.parametrize("bad", ["abc", 1.5, True, -1, [1, 2]])
def test_bad_seed_names_argument(bad):
    with pytest.raises(SeedError, match="seed"):
        _device.generator(bad)


def test_as_tensor_refuses_complex_and_object():
    with pytest.raises(DtypeError, match="x: expected real values"):
        _device.as_tensor(np.array([1j]), "x")
    with pytest.raises(DtypeError, match="x: expected a numeric array"):
        _device.as_tensor(np.array([object()]), "x")
    t = _device.as_tensor(np.arange(3), "x")
    assert t.dtype is torch.float64


def test_seed_to_attr_forms():
    assert _device.seed_to_attr(3) == "3"
    assert _device.seed_to_attr(None) == "none"
    assert "SeedSequence(entropy=3" in _device.seed_to_attr(np.random.SeedSequence(3))
    assert "initial_seed=9" in _device.seed_to_attr(torch.Generator().manual_seed(9))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_defaults_and_mixed_devices():
    assert _device.resolve_dtype(None, "cuda") is torch.float32
    with pytest.raises(DeviceError, match="inputs"):
        _device.resolve_device(None, like=[torch.zeros(1), torch.zeros(1, device="cuda")])


def test_scoped_global_stream_is_seeded_and_restores_the_caller_state():
    from daml import _device
    torch.manual_seed(123)
    expected_after = torch.rand(4)
    torch.manual_seed(123)
    with _device.scoped_global_stream(7):
        a = torch.rand(5)
    assert torch.equal(torch.rand(4), expected_after)          # the caller's stream is untouched
    with _device.scoped_global_stream(7):
        b = torch.rand(5)
    with _device.scoped_global_stream(8):
        c = torch.rand(5)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a, torch.rand(5, generator=_device.generator(7)))   # the explicit generator's stream


@pytest.mark.parametrize("dtype,shape", [(torch.float64, (300, 40)), (torch.float64, (5,)), (torch.float32, (300, 40))])
def test_smoothing_noise_is_reproducible_normal_and_advances(dtype, shape):
    from scipy import stats

    a = _device.smoothing_noise(shape, _device.generator(3), dtype)
    g = _device.generator(3)
    b = _device.smoothing_noise(shape, g, dtype)
    c = _device.smoothing_noise(shape, g, dtype)
    assert a.shape == shape and a.dtype == _device.smoothing_dtype(dtype)
    assert torch.equal(a, b) and not torch.equal(b, c)        # same seed, same draw; the generator advanced
    z = torch.cat([_device.smoothing_noise(shape, g, dtype).reshape(-1) for _ in range(40)]).double().numpy()
    # Monte Carlo tolerances: 5 standard errors of the mean and variance, and a KS test at 1e-3
    assert abs(z.mean()) < 5 / np.sqrt(z.size)
    assert abs(z.var() - 1.0) < 5 * np.sqrt(2.0 / z.size)
    assert stats.kstest(z, "norm").pvalue > 1e-3


def test_smoothing_dtype_and_its_draws():
    # float32 for float64 on the CPU only; the draws are torch's normals in that dtype, same stream
    assert _device.smoothing_dtype(torch.float64) == torch.float32
    assert _device.smoothing_dtype(torch.float64, "cpu") == torch.float32
    assert _device.smoothing_dtype(torch.float32, "cpu") == torch.float32
    assert _device.smoothing_dtype(torch.float64, "meta") == torch.float64
    for dtype in (torch.float64, torch.float32):
        z = _device.smoothing_noise((50, 4), _device.generator(8), dtype)
        want = torch.randn((50, 4), generator=_device.generator(8), dtype=torch.float32)
        assert z.dtype == torch.float32 and torch.equal(z, want)


def test_smoothing_noise_in_float64_has_float32_draws_and_bounded_tails():
    # the documented trade: draws for float64 states are float32 values, none beyond the largest Box-Muller
    # radius of a 24-bit uniform, sqrt(-2 log 2^-24) = 5.77 (N(0, 1) exceeds it with probability 8e-9)
    z = _device.smoothing_noise((200_000,), _device.generator(5), torch.float64)
    assert z.dtype == torch.float32
    assert float(z.abs().max()) <= math.sqrt(-2.0 * math.log(2.0 ** -24)) + 1e-6
