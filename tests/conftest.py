"""Shared fixtures: seeds, devices and small posteriors.

Every random test draws from an explicit, fixed seed so that CI is deterministic; statistical
assertions state their false-alarm rate in the test docstring.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import daml

# Tests check correctness, not speed. One intra-op thread keeps the many small matrix products of the
# filters from stalling when the 2-core CI machine is shared (torch's thread pool then spins).
torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20261122)


@pytest.fixture
def weighted_post(rng):
    """A posterior with batch dim ``time`` (3), 200 members and 4 variables, unequal weights."""
    x = rng.normal(size=(3, 200, 4))
    lw = rng.normal(scale=1.5, size=(3, 200))
    return daml.from_members(
        x, lw, dims=("time", "member", "variable"),
        coords={"time": [0.0, 0.5, 1.0], "variable": list("abcd")},
        method="test", config={"k": 1}, seed=7,
    )
