"""Every posterior daml builds, including the causal ones that do not go through from_members,
carries the log_weight attributes that tell a plain-xarray user how to weight (issue 27, item 4)."""

import numpy as np
import pytest

from daml.posterior import LOG_WEIGHT, LOG_WEIGHT_ATTRS, validate

causal = pytest.importorskip("daml.causal")
from sklearn.linear_model import LinearRegression  # noqa: E402  (the causal extra is installed with causal)


def test_plr_posterior_log_weight_attrs():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    d = x[:, 0] + rng.normal(size=200)
    y = 0.5 * d + x[:, 1] + rng.normal(size=200)
    post = causal.plr(y, d, x, ml_l=LinearRegression(), ml_m=LinearRegression(), seed=0)
    validate(post)
    assert post[LOG_WEIGHT].attrs == dict(LOG_WEIGHT_ATTRS)
    w = np.exp(post[LOG_WEIGHT])            # what the attributes tell the user to do
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
