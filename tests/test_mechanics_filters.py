"""Every registered filter runs a learned mechanical model (issue 30: 'usable in every filter'; the true
pendulum is in the filter-by-model matrix of tests/test_filters_contract.py).

The pendulum with a little model noise, its angle observed; the forecast model is a small Hamiltonian
network stepped by Stormer-Verlet (implicit stages; its field is a gradient, which must also work under
the inference mode in which ``daml.filters.run`` steps models), compared where it matters with the true
system. Each filter either gives a valid posterior whose analysis is finite, or refuses the model with a
daml error naming it (the Kalman filter needs a linear model).
"""

import os
import sys

import numpy as np
import pytest
import torch

import daml
from daml import filters
from daml.errors import InputError
from daml.models import HamiltonianNet, Mechanical, Pendulum, observe_indices
from daml.posterior import validate

sys.path.insert(0, os.path.dirname(__file__))
from test_filters_contract import PARAMS as CONTRACT  # noqa: E402

PARAMS = {**CONTRACT,                              # the contract's settings, sized for a 2-variable state
          "letkf": {"members": 12, "radius": 1.0},
          "climatology": {"mean": np.array([1.0, 0.0]), "cov": np.eye(2), "members": 12},
          "letpf": {"members": 12, "radius": 1.0, "second_order": True},
          "diffusion": {"members": 12, "bandwidth": 0.3, "steps": 10},
          "ensf": {"members": 12, "steps": 100}}     # fewer steps are refused as unstable at sd 0.1


def test_every_registered_filter_is_listed():
    assert set(filters.REGISTRY) == set(PARAMS)


@pytest.fixture(scope="module")
def problem():
    system = Pendulum(mass=2.0, length=0.5, gravity=3.0)
    truth = Mechanical(system, 0.1, substeps=4, noise_cov=1e-4)
    op = observe_indices(2, [0], sd=0.1)
    data = daml.simulate(truth, 12, op, every=3, x0=[1.0, 0.0], x0_cov=0.01, seed=3)
    net = HamiltonianNet(1, hidden=8, seed=0)
    learned = Mechanical(net, 0.1, substeps=1, noise_cov=1e-4, max_iter=12)   # fixed count under jacfwd (EKF)
    return {"true": truth, "learned": learned}, op, data


FAST = {"kf", "ekf", "etkf", "bootstrap", "ensf"}     # the default suite; the rest run with the slow marker


@pytest.mark.parametrize("which", ["learned"])
@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in sorted(PARAMS)])
def test_filter_runs_the_mechanical_model(name, which, problem):
    models, op, data = problem
    model = models[which]
    try:
        res = filters.run(filters.make_filter(name, **PARAMS[name]), model, data, operator=op, seed=1)
    except InputError as err:                   # a filter that cannot take this model says so, by name
        assert name == "kf" and "model" in str(err.argument)
        return
    validate(res.analysis)
    assert bool(np.isfinite(res.analysis.x.values).all())
    if which == "learned" and name == "etkf":   # the network moved the ensemble (its field is not zero)
        x0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
        with torch.inference_mode():
            assert not torch.equal(model.step(x0), x0)
