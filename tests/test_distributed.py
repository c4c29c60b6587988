"""daml.distributed on a LocalCluster of two worker processes (issue 31): each distributed result is
compared with the same computation in this process, bit for bit.

One cluster serves the whole module (starting it and importing daml on the workers takes about ten
seconds); the test that kills a worker runs last.
"""

import dataclasses
import math
import os
import signal
import threading
import time

import numpy as np
import pytest
import xarray as xr

from daml import experiment
from daml.errors import InputError

distributed_mod = pytest.importorskip("distributed")
from daml import distributed  # noqa: E402

SWEEP = """
[experiment]
name = "{name}"
steps = {steps}
burn_in = 2.0
experiments = 2
seed = {seed}

[model]
name = "lorenz96"
n = 40

[observations]
kind = "every"
k = 2
sd = 1.0
every = 2

[prior]
cov = 0.1

[[methods]]
name = "etkf"
members = 20
inflation = 1.02

[[methods]]
name = "letkf"
members = 10
radius = 4.0
inflation = 1.02

[[methods]]
name = "bootstrap"
members = 200

[[methods]]
name = "climatology"
"""


def _exp(name="a", seed=1, steps=80):
    return experiment.load_config(SWEEP.format(name=name, seed=seed, steps=steps))


@pytest.fixture(scope="module")
def client():
    c = distributed.connect("local:2")
    try:
        c.wait_for_workers(2)
        yield c
    finally:
        c.close()


def _assert_same_run(one, other):
    (d1, s1), (d2, s2) = one, other
    assert d1.identical(d2)
    assert [s.index for s in s1] == [s.index for s in s2]
    for a, b in zip(s1, s2):
        assert (a.label, a.status, a.keep) == (b.label, b.status, b.keep)
        for key in ("rmse_a", "rmv_a", "crps", "rank_pvalue"):
            assert getattr(a, key) == getattr(b, key) or (np.isnan(getattr(a, key)) and np.isnan(getattr(b, key)))
        assert a.rmse_a_each == b.rmse_a_each
        if a.posterior is not None:
            pa, pb = a.posterior, b.posterior
            for v in pa.data_vars:
                assert np.array_equal(pa[v].values, pb[v].values, equal_nan=True), (a.label, v)


def _from_files(scores):
    """The scores with each posterior read back from the file the run wrote."""
    assert all(s.posterior is None and s.path is not None for s in scores)        # written as they arrived
    return [dataclasses.replace(s, posterior=xr.load_dataset(s.path)) for s in scores]


def test_a_sweep_on_two_workers_is_bit_for_bit_the_sweep_in_one_process(client, tmp_path):
    exps = [_exp("a", 1), _exp("b", 2)]
    here = experiment.run_experiments(exps, progress=False)
    lines = []
    there = experiment.run_experiments(exps, progress=False, client=client, out=tmp_path, log=lines.append)
    for one, (data, scores) in zip(here, there):
        _assert_same_run(one, (data, _from_files(scores)))
    assert sum(line.endswith("started") for line in lines) == 8 and sum(line.endswith(" s") for line in lines) == 8
    assert sorted(p.name for p in tmp_path.glob("*_scores.json")) == ["a_scores.json", "b_scores.json"]


def test_one_experiment_with_client_keeps_posteriors_in_memory(client):
    exp = _exp("c", 5)
    here = experiment.run_experiment(exp, progress=False, only=["letkf", "climatology"])
    there = experiment.run_experiment(exp, progress=False, only=["letkf", "climatology"], client=client)
    _assert_same_run(here, there)


def test_daml_run_with_a_scheduler_address_writes_the_files_of_one_process(client, tmp_path):
    from daml import cli

    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(SWEEP.format(name="a", seed=1, steps=60))
    b.write_text(SWEEP.format(name="b", seed=2, steps=60))
    assert cli.main(["run", str(a), str(b), "--out", str(tmp_path / "one"), "--only", "etkf", "letkf"]) == 0
    assert cli.main(["run", str(a), str(b), "--out", str(tmp_path / "two"), "--only", "etkf", "letkf",
                     "--scheduler", client.scheduler.address]) == 0
    files = sorted(p.name for p in (tmp_path / "one").glob("*.nc"))
    assert files == ["a_etkf.nc", "a_letkf.nc", "b_etkf.nc", "b_letkf.nc"]
    assert files == sorted(p.name for p in (tmp_path / "two").glob("*.nc"))
    for f in files:
        one, two = xr.load_dataset(tmp_path / "one" / f), xr.load_dataset(tmp_path / "two" / f)
        for v in one.variables:
            assert np.array_equal(one[v].values, two[v].values, equal_nan=True), (f, v)


def _regression(n=60, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 2, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.sin(x[:, 0]) * x[:, 1] + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


@pytest.mark.parametrize("block", [None, 3])
def test_member_blocks_on_two_workers_are_bit_for_bit_the_fit_in_one_process(client, block):
    import torch

    from daml import ensembles

    x, y = _regression()
    net = ensembles.mlp(2, 8, activation="tanh")
    kw = dict(members=7, noise_sd=0.1, epochs=60, seed=11, progress=False)
    here = ensembles.fit(net, x, y, **kw)
    there = ensembles.fit(net, x, y, client=client, block=block, **kw)      # daml.distributed.fit
    for name in ("params", "prior_draw", "buffers", "prior_sd"):
        a, b = getattr(here, name), getattr(there, name)
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.equal(here.log_weight, there.log_weight)
    assert torch.equal(torch.nan_to_num(here.history, nan=-1.0), torch.nan_to_num(there.history, nan=-1.0))
    assert all(torch.equal(here.convergence[k], there.convergence[k]) for k in here.convergence)
    assert here.config == there.config
    # the weights and the predictive follow unchanged
    (e1, _), (e2, _) = ensembles.weigh(here, x, y), ensembles.weigh(there, x, y)
    assert torch.equal(e1.log_weight, e2.log_weight)
    p1, p2 = ensembles.predict(e1, x[:5], seed=0), ensembles.predict(e2, x[:5], seed=0)
    for v in p1.variables:
        assert np.array_equal(p1[v].values, p2[v].values), v


def _grid(n=600, members=12, seed=0, every=1):
    import torch

    from daml.models import make_model

    g = torch.Generator().manual_seed(seed)
    model = make_model("lorenz96", n=n)
    truth = 8.0 + torch.randn(n, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(40):
            truth = model.step(truth)
    x = truth + torch.randn(members, n, generator=g, dtype=torch.float64)
    y = truth + torch.randn(n, generator=g, dtype=torch.float64)
    y[torch.arange(n) % every != 0] = float("nan")
    coords = {"variable": np.arange(n)}
    return (xr.DataArray(x.numpy(), dims=("member", "variable"), coords=coords, name="x"),
            xr.DataArray(y.numpy(), dims=("variable",), coords=coords), truth.numpy())


@pytest.mark.parametrize("block", [None, 97, 250])
def test_a_blocked_letkf_on_two_workers_is_bit_for_bit_the_analysis_in_one_process(client, block):
    from daml.filters import letkf
    from daml.filters.base import EnsembleState
    from daml.models import observe_every
    from daml.posterior import validate
    import torch

    fx, y, _ = _grid(every=2)
    here = distributed.local_analysis(fx, y, 0.5, 3.0)
    there = distributed.local_analysis(fx, y, 0.5, 3.0, client=client, block=block)
    validate(there)
    assert there.attrs["blocks"] > 1 and there.attrs["halo"] == 10
    assert np.array_equal(here["x"].values, there["x"].values)
    # and it is the dense LETKF's analysis (daml.filters.letkf, every second variable observed)
    op = observe_every(600, 2, sd=math.sqrt(0.5))
    filt = letkf(12, 3.0)
    xt = torch.from_numpy(fx.values)
    obs = torch.from_numpy(y.values[::2])
    state, _ = filt.analysis(EnsembleState(xt, torch.full((12,), -math.log(12), dtype=torch.float64)), obs, op,
                             torch.ones(300, dtype=torch.bool), torch.Generator())
    np.testing.assert_allclose(there["x"].values, state.x.numpy(), rtol=1e-10, atol=1e-12)


def test_a_blocked_letpf_on_two_workers_equals_the_analysis_in_one_process(client):
    fx, y, _ = _grid(n=240, members=8, seed=3)
    here = distributed.local_analysis(fx, y, 1.0, 2.0, method="letpf", solver="emd")
    there = distributed.local_analysis(fx, y, 1.0, 2.0, method="letpf", solver="emd", client=client, block=50)
    assert there.attrs["blocks"] == 5
    assert np.array_equal(here["x"].values, there["x"].values)          # one exact OT problem per grid point
    here = distributed.local_analysis(fx, y, 1.0, 2.0, method="letpf")
    there = distributed.local_analysis(fx, y, 1.0, 2.0, method="letpf", client=client, block=50)
    # batched Sinkhorn problems share the switch to over-relaxation, so a block is not bitwise the whole
    # grid; both are converged to tol 1e-6 on the transport plan
    np.testing.assert_allclose(here["x"].values, there["x"].values, rtol=0, atol=1e-9)


def test_warnings_raised_on_the_workers_reach_the_caller(client):
    """An unconverged transport problem warns on the worker that solves it; the caller must hear it too
    (a sweep's method, a block of a local analysis), or a plausible wrong answer would pass silently."""
    from daml.errors import ConvergenceWarning

    exp = experiment.load_config(SWEEP.format(name="w", seed=3, steps=60).replace(
        '[[methods]]\nname = "etkf"',
        '[[methods]]\nname = "letpf"\nmembers = 10\nradius = 4.0\nmax_iter = 2\n\n[[methods]]\nname = "etkf"'))
    with pytest.warns(ConvergenceWarning, match="letpf: 2377 transport problems"):
        experiment.run_experiment(exp, progress=False, only=["letpf"])
    with pytest.warns(ConvergenceWarning, match="letpf: 2377 transport problems"):
        experiment.run_experiment(exp, progress=False, only=["letpf"], client=client)
    fx, y, _ = _grid(n=120, members=8, seed=4)
    with pytest.warns(ConvergenceWarning, match="did not"):
        here = distributed.local_analysis(fx, y, 1.0, 2.0, method="letpf", max_iter=2)
    with pytest.warns(ConvergenceWarning, match="blocks had local transport problems"):
        there = distributed.local_analysis(fx, y, 1.0, 2.0, method="letpf", max_iter=2, client=client, block=40)
    assert here.attrs["warned_blocks"] == 1 and there.attrs["warned_blocks"] == there.attrs["blocks"] == 3
    quiet = distributed.local_analysis(fx, y, 1.0, 2.0, client=client, block=40)       # the LETKF: nothing to say
    assert quiet.attrs["warned_blocks"] == 0


def test_local_analysis_refuses_a_chunked_member_and_bad_inputs(client):
    fx, y, _ = _grid(n=100, members=6)
    with pytest.raises(InputError, match="member"):
        distributed.local_analysis(fx.chunk({"member": 3}), y, 1.0, 2.0, client=client)
    with pytest.raises(InputError, match="block"):
        distributed.local_analysis(fx, y, 1.0, 4.0, client=client, block=5)
    with pytest.raises(InputError, match="method"):
        distributed.local_analysis(fx, y, 1.0, 2.0, method="enkf")
    with pytest.raises(InputError, match="variance"):
        distributed.local_analysis(fx, y, -1.0, 2.0)
    with pytest.raises(InputError, match="y"):
        distributed.local_analysis(fx, y * np.nan, 1.0, 2.0)


def test_bad_clients_schedulers_and_sweeps_are_refused_by_name():
    from daml import ensembles

    x, y = _regression()
    with pytest.raises(InputError, match="client"):
        ensembles.fit(ensembles.mlp(2, 4), x, y, members=2, noise_sd=0.1, client=object())
    with pytest.raises(InputError, match="block"):
        ensembles.fit(ensembles.mlp(2, 4), x, y, members=2, noise_sd=0.1, block=1)
    with pytest.raises(InputError, match="client"):
        experiment.run_experiment(_exp(), client="tcp://127.0.0.1:1")
    with pytest.raises(InputError, match="scheduler"):
        distributed.connect("local:0")
    with pytest.raises(InputError, match="scheduler"):
        distributed.connect("")
    with pytest.raises(InputError, match=r"experiments\[1\]\.name"):
        experiment.run_experiments([_exp("a"), _exp("a")])
    with pytest.raises(InputError, match="experiments"):
        experiment.run_experiments(_exp("a"))


def test_a_worker_killed_during_a_sweep_is_replaced_and_the_result_is_unchanged(client):
    """The worker running a method is killed (SIGKILL) while the method runs: the scheduler runs the
    task again on the other worker from the same inputs, and the scores are those of one process."""
    exp = _exp("k", 7, steps=600)
    here = experiment.run_experiment(exp, progress=False, only=["etkf", "letkf"])
    pids = client.run(os.getpid)                        # {worker address: its process}
    killed: dict = {}

    def kill_the_busy_worker():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            busy = [w for w, keys in client.processing().items() if any("daml-method" in str(k) for k in keys)]
            if busy:
                time.sleep(0.3)                          # inside the task: the workers have imported daml
                os.kill(pids[busy[0]], signal.SIGKILL)
                killed["worker"] = busy[0]
                return
            time.sleep(0.02)

    thread = threading.Thread(target=kill_the_busy_worker)
    thread.start()
    there = experiment.run_experiment(exp, progress=False, only=["etkf", "letkf"], client=client)
    thread.join()
    assert killed, "no worker was busy with a daml task"
    client.wait_for_workers(2, timeout=60)
    assert killed["worker"] in pids and killed["worker"] not in client.scheduler_info()["workers"]
    _assert_same_run(here, there)
