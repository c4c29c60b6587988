"""daml._device.threads / auto_threads: the intra-op thread count of a block, chosen for the problem's
size, with the caller's setting restored (nesting, exceptions). No timings here: the benchmark is
benchmarks/threads.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from daml import _device
from daml.errors import InputError


@pytest.fixture(autouse=True)
def _keep_caller_threads(monkeypatch):
    monkeypatch.delenv(_device.THREADS_ENV, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_threads_sets_the_count_and_restores_the_callers():
    torch.set_num_threads(3)
    with _device.threads(1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3
    with _device.threads(None) as n:
        assert n == 3 and torch.get_num_threads() == 3
    assert torch.get_num_threads() == 3


def test_nested_blocks_restore_level_by_level():
    torch.set_num_threads(4)
    with _device.threads(2):
        assert torch.get_num_threads() == 2
        with _device.auto_threads(10):
            assert torch.get_num_threads() == 1
            with _device.threads(3):
                assert torch.get_num_threads() == 3
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 4


def test_exceptions_restore_the_callers_setting():
    torch.set_num_threads(3)
    with pytest.raises(ZeroDivisionError):
        with _device.auto_threads(1):
            assert torch.get_num_threads() == 1
            1 / 0
    assert torch.get_num_threads() == 3
    with pytest.raises(KeyboardInterrupt):
        with _device.threads(2):
            raise KeyboardInterrupt
    assert torch.get_num_threads() == 3


def test_a_block_that_changes_the_count_itself_is_undone_too():
    torch.set_num_threads(3)
    with _device.threads(1):
        torch.set_num_threads(2)
    assert torch.get_num_threads() == 3


def test_the_choice_rule():
    small, large = _device.SMALL_WORK - 1, _device.SMALL_WORK
    assert _device.choose_threads(0) == 1
    assert _device.choose_threads(small) == 1
    assert _device.choose_threads(float(small)) == 1
    assert _device.choose_threads(np.int64(small)) == 1
    assert _device.choose_threads(large) is None          # the caller's setting
    assert _device.choose_threads(10 ** 12) is None
    assert _device.choose_threads(10, threads=2) == 2     # an explicit count always wins
    assert _device.choose_threads(10 ** 12, threads=1) == 1
    # an L96-40 ETKF with 24 members, one experiment, is small; 100 experiments batched are not
    assert _device.choose_threads(1 * 24 * 40) == 1
    assert _device.choose_threads(100 * 24 * 40) is None


def test_auto_threads_keeps_the_callers_count_for_large_work():
    torch.set_num_threads(3)
    with _device.auto_threads(_device.SMALL_WORK * 10) as n:
        assert n == 3 and torch.get_num_threads() == 3
    with _device.auto_threads(_device.SMALL_WORK - 1) as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3


def test_environment_variable_forces_the_count(monkeypatch):
    torch.set_num_threads(3)
    monkeypatch.setenv(_device.THREADS_ENV, "2")
    assert _device.choose_threads(1) == 2
    with _device.auto_threads(1):
        assert torch.get_num_threads() == 2
    with _device.auto_threads(10 ** 9):
        assert torch.get_num_threads() == 2
    with _device.auto_threads(1, threads=1):               # the argument wins over the variable
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 3
    monkeypatch.setenv(_device.THREADS_ENV, " Auto ")
    assert _device.choose_threads(1) == 1 and _device.choose_threads(10 ** 9) is None


@pytest.mark.parametrize("raw", ["0", "-1", "two", "1.5"])
def test_a_bad_environment_value_is_refused_naming_it(monkeypatch, raw):
    monkeypatch.setenv(_device.THREADS_ENV, raw)
    torch.set_num_threads(3)
    with pytest.raises(InputError, match=_device.THREADS_ENV):
        with _device.auto_threads(1):
            pass
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("bad", [0, -2, 1.0, True, "2", math.nan])
def test_bad_thread_counts_are_refused_naming_threads(bad):
    torch.set_num_threads(3)
    with pytest.raises(InputError, match="threads"):
        with _device.threads(bad):
            pass
    with pytest.raises(InputError, match="threads"):
        with _device.auto_threads(1, threads=bad):
            pass
    assert torch.get_num_threads() == 3


@pytest.mark.parametrize("bad", [-1, math.nan, "big", None, True, [1]])
def test_bad_work_is_refused_naming_work(bad):
    with pytest.raises(InputError, match="work"):
        _device.choose_threads(bad)


def test_accelerator_blocks_leave_the_cpu_setting_unless_forced():
    torch.set_num_threads(3)
    with _device.auto_threads(1, device="meta"):
        assert torch.get_num_threads() == 3
    with _device.auto_threads(1, threads=2, device="meta"):
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == 3


def test_results_do_not_depend_on_the_block():
    """Inside the block torch computes what it computes outside (same numbers, one thread or more)."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(50, 40, dtype=torch.float64, generator=gen)
    outside = torch.linalg.eigh(a.T @ a).eigenvalues
    with _device.auto_threads(a.numel()):
        inside = torch.linalg.eigh(a.T @ a).eigenvalues
    assert torch.allclose(inside, outside, rtol=1e-12, atol=1e-9)


def test_work_measures_of_filters_and_training():
    assert _device.ensemble_work((24, 40)) == 24 * 40                   # one L96-40 ETKF, N = 24
    assert _device.ensemble_work((100, 24, 40)) == 100 * 24 * 40        # 100 experiments batched
    assert _device.ensemble_work((3, 2, 100, 40)) == 6 * 100 * 100      # the N x N transforms dominate
    assert _device.ensemble_work((40,)) == 40
    assert _device.choose_threads(_device.ensemble_work((24, 40))) == 1
    assert _device.choose_threads(_device.ensemble_work((1000, 40))) is None
    net = torch.nn.Sequential(torch.nn.Linear(1, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1))
    n_params = 20 + 20 + 20 + 1
    assert _device.network_work(net, 5, 32) == 5 * max(n_params, 32 * 20)
    big = torch.nn.Linear(300, 200)
    assert _device.network_work(big, 2, 8) == 2 * (300 * 200 + 200)


def test_network_training_threshold_is_its_own_and_named(monkeypatch):
    """choose_threads(work, small=...): one thread below ``small``; SMALL_NETWORK_WORK (the dynamics networks'
    training) is above SMALL_WORK, so Greydanus' spring HNN (150 000 elements) gets one thread there only."""
    import pytest
    from daml import _device
    from daml.errors import InputError

    monkeypatch.delenv("DAML_THREADS", raising=False)
    work = 150_000
    assert _device.SMALL_WORK < work < _device.SMALL_NETWORK_WORK
    assert _device.choose_threads(work) is None
    assert _device.choose_threads(work, small=_device.SMALL_NETWORK_WORK) == 1
    assert _device.choose_threads(_device.SMALL_NETWORK_WORK, small=_device.SMALL_NETWORK_WORK) is None
    assert _device.choose_threads(work, threads=2, small=_device.SMALL_NETWORK_WORK) == 2
    with pytest.raises(InputError, match="small"):
        _device.choose_threads(work, small=0)
