"""daml.causal.site raises no deprecation warning (issue 27 item 8: ``DatetimeIndex.dayofyear`` is
deprecated in pandas 3 in favour of ``day_of_year``); the day of year it uses is the calendar's."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("sklearn")
from daml.causal import site  # noqa: E402

DEPRECATIONS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)


def _strict():
    """A context in which every deprecation warning is an error."""
    ctx = warnings.catch_warnings()
    ctx.__enter__()
    for category in DEPRECATIONS:
        warnings.simplefilter("error", category)
    return ctx


def test_potential_radiation_warns_nothing_and_uses_the_calendar_day_of_year():
    times = pd.date_range("2004-02-27", periods=5 * 48, freq="30min")      # across a leap day
    ctx = _strict()
    try:
        got = site.potential_radiation(times, 47.12)
        got_np = site.potential_radiation(times.values, 47.12)
    finally:
        ctx.__exit__(None, None, None)
    np.testing.assert_array_equal(got, got_np)
    # an independent evaluation of the same formula, with the day of year from the datetime module
    lat = math.radians(47.12)
    for k in range(0, times.size, 7):
        t = times[k].to_pydatetime()
        doy = t.timetuple().tm_yday
        hour = t.hour + t.minute / 60.0 + 0.25
        decl = math.radians(23.44) * math.sin(2.0 * math.pi * (284.0 + doy) / 365.0)
        cos_z = (math.sin(lat) * math.sin(decl)
                 + math.cos(lat) * math.cos(decl) * math.cos(math.radians(15.0 * (hour - 12.0))))
        want = max(0.0, 1361.0 * (1.0 + 0.033 * math.cos(2.0 * math.pi * doy / 365.0)) * cos_z)
        assert got[k] == pytest.approx(want, rel=1e-12, abs=1e-9)


def test_synthetic_site_and_the_fluxnet_round_trip_warn_nothing(tmp_path):
    ctx = _strict()
    try:
        s = site.synthetic_site(1, seed=0)
        path = tmp_path / "site.csv"
        site.to_fluxnet_csv(s, path)
        frame, report = site.read_fluxnet_csv(path)
        # without SW_IN_POT the reader computes it from the timestamps (the day of year again)
        raw = pd.read_csv(path)
        assert "SW_IN_POT" in raw.columns
        raw.drop(columns="SW_IN_POT").to_csv(tmp_path / "no_pot.csv", index=False)
        frame2, report2 = site.read_fluxnet_csv(tmp_path / "no_pot.csv", latitude=47.12)
        sm, diff = site.smoothed_potential_radiation(s["SW_IN_POT"].values)
    finally:
        ctx.__exit__(None, None, None)
    assert report["kept"] == len(frame) > 0 and report2["kept"] == len(frame2) > 0
    # the synthetic site's SW_IN_POT is potential_radiation at its own latitude: the two readings agree
    np.testing.assert_allclose(frame2["SW_POT_sm"].to_numpy(), frame["SW_POT_sm"].to_numpy(), rtol=1e-6, atol=1e-6)
    assert np.isfinite(sm).all() and np.isfinite(diff).all()
