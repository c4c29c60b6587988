"""A synthetic flux-tower site, and FLUXNET2015-style CSV files.

No flux-tower data can be downloaded here, so :func:`synthetic_site` generates half-hourly
meteorology with realistic diurnal and seasonal cycles at a mid-latitude site (by default the
location of AT-Neu, Neustift, Austria, 47.12 N, the site of Cohrs et al. 2024) and drives the
generating process of their synthetic study with it:

* potential radiation ``SW_IN_POT`` from solar geometry (declination, hour angle, eccentricity);
* daily cloudiness ``c`` in (0, 1), persistent from day to day (an AR(1) process in logit space);
* incoming shortwave ``SW_IN = SW_IN_POT (0.75 - 0.55 c)`` with a few per cent half-hourly flicker;
* air temperature ``TA``: an annual cycle (coldest in late January), a diurnal cycle peaking at
  15:00 whose amplitude shrinks on cloudy days, and AR(1) synoptic anomalies (about 3 K);
* relative humidity rising with cloudiness and at night, and ``VPD = es(TA) (1 - RH)`` in hPa;
* ``SW_POT_sm``: the 10-day (480 half-hour) centred moving average of ``SW_IN_POT``, and
  ``SW_POT_sm_diff``: the same moving average of ``1e4`` times its forward difference per half hour
  (the record is padded by reflection, where the original code zero-pads);
* base respiration ``RB = 0.75 (0.01 SW_POT_sm - 0.005 SW_POT_sm_diff - min(...) + 0.1 pi)``;
* ``RECO = RB * Q10^((TA - Tref)/10)`` with ``Tref = 15 C``;
* ``GPP = RUE * SW_IN / 12.011`` with ``RUE = 0.5 exp(-(0.1 (TA - 20))^2) min(1, exp(-0.1 (VPD - 10)))``,
  so the true light-use efficiency is ``LUE = RUE / 12.011``;
* ``NEE = RECO - GPP``; observations are multiplicative: ``RECO_obs = RECO (1 + e)``,
  ``GPP_obs = GPP (1 + e')`` with ``e, e'`` Gaussian of standard deviation ``noise`` truncated to
  [-0.95, 0.95], and ``NEE_obs = RECO_obs - GPP_obs`` (at night ``NEE_obs = RECO_obs``).

The temperature is confounded with the seasonal controls (``corr(TA, SW_POT_sm)`` is about 0.6), so
an ordinary regression of ``log RECO`` on temperature alone overstates Q10 badly, which is what makes
the problem a test of causal adjustment.

:func:`to_fluxnet_csv` writes a site in the FLUXNET2015 column convention (``TIMESTAMP_START``,
``TA_F``, ``SW_IN_F``, ``SW_IN_POT``, ``VPD_F``, ``NEE_VUT_REF`` and its ``_QC`` flag, ``NIGHT``,
-9999 for missing), and :func:`read_fluxnet_csv` reads such a file, checks units and returns the
night-time respiration data that :func:`daml.causal.q10` uses.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

from .. import _device
from ..errors import DtypeError, InputError, NonFiniteError, ShapeError, check_int, check_real
from ..io import atomic_write_path

__all__ = ["synthetic_site", "potential_radiation", "smoothed_potential_radiation", "to_fluxnet_csv",
           "read_fluxnet_csv", "FLUXNET_REQUIRED", "saturation_vapour_pressure"]

FLUXNET_REQUIRED = ("TIMESTAMP_START", "TA_F", "SW_IN_F", "VPD_F", "NEE_VUT_REF", "NEE_VUT_REF_QC", "NIGHT")
_MISSING = -9999.0


def saturation_vapour_pressure(ta: Any) -> np.ndarray:
    """Saturation vapour pressure in hPa over water at air temperature ``ta`` in degrees Celsius (Tetens).

    Refuses NaN and infinite values and temperatures at or below -237.3 C, the pole of Tetens' formula
    (below it the formula returns nonsense; -273.15 C is absolute zero).
    """
    from .dml import _numeric

    ta = _numeric(ta, "ta")
    if not np.isfinite(ta).all():
        raise NonFiniteError("ta", "finite temperatures (drop missing values first)",
                             f"{int((~np.isfinite(ta)).sum())} NaN or infinite entries")
    if ta.size and float(ta.min()) <= -237.3:
        what = "below absolute zero, -273.15 C" if float(ta.min()) < -273.15 else "at or below the formula's pole"
        raise InputError("ta", "air temperatures in degrees Celsius above -237.3 (the pole of Tetens' formula)",
                         f"minimum {float(ta.min()):.6g} ({what})")
    return 6.1078 * np.exp(17.27 * ta / (ta + 237.3))


def potential_radiation(time: Any, latitude: float, step_hours: float = 0.5) -> np.ndarray:
    """Top-of-atmosphere shortwave radiation on a horizontal surface (W m-2), averaged at mid-interval.

    ``time`` holds the interval starts (local solar time is taken as clock time); the sun is evaluated
    at the middle of each interval of ``step_hours``.
    """
    latitude = check_real(latitude, "latitude", expected="degrees north within [-90, 90]")
    if abs(latitude) > 90.0:
        raise InputError("latitude", "degrees north within [-90, 90]", latitude)
    step_hours = check_real(step_hours, "step_hours", positive=True, expected="a positive interval length in hours")
    if step_hours > 24.0:
        raise InputError("step_hours", "an interval length of at most 24 hours", step_hours)
    t = _as_times(time, "time")
    doy = t.day_of_year.values.astype(float)
    hour = t.hour.values + t.minute.values / 60.0 + step_hours / 2.0
    lat = math.radians(latitude)
    decl = np.radians(23.44) * np.sin(2.0 * np.pi * (284.0 + doy) / 365.0)
    omega = np.radians(15.0 * (hour - 12.0))
    cos_z = np.sin(lat) * np.sin(decl) + np.cos(lat) * np.cos(decl) * np.cos(omega)
    return np.maximum(0.0, 1361.0 * (1.0 + 0.033 * np.cos(2.0 * np.pi * doy / 365.0)) * cos_z)


def _as_times(time: Any, name: str) -> pd.DatetimeIndex:
    """``time`` as a DatetimeIndex of dates (numbers and text that is not a date are refused, never read as
    nanoseconds since 1970)."""
    if time is None or isinstance(time, (str, bytes)):
        raise InputError(name, "an array of timestamps (datetime64)", repr(time)[:60])
    raw = np.atleast_1d(np.asarray(time))
    if raw.ndim != 1:
        raise ShapeError(name, "a 1-d array of timestamps", f"shape {raw.shape}")
    if raw.dtype.kind in "biufc":
        raise DtypeError(name, "timestamps (datetime64 or pandas Timestamps)", f"numbers of dtype {raw.dtype}")
    try:
        t = pd.DatetimeIndex(raw)
    except (ValueError, TypeError) as exc:
        raise DtypeError(name, "timestamps (datetime64 or pandas Timestamps)", f"dtype {raw.dtype} ({exc})") from exc
    if t.hasnans:
        raise NonFiniteError(name, "timestamps without NaT", f"{int(t.isna().sum())} NaT entries")
    return t


def _moving_average(v: np.ndarray, window: int) -> np.ndarray:
    half = window // 2
    padded = np.pad(v, (half, window - 1 - half), mode="reflect")
    c = np.cumsum(np.concatenate([[0.0], padded]))
    return (c[window:] - c[:-window]) / window


def smoothed_potential_radiation(sw_in_pot: Any, steps_per_day: int = 48, days: float = 10.0) -> tuple[np.ndarray, np.ndarray]:
    """``SW_POT_sm`` and ``SW_POT_sm_diff`` of Cohrs et al. (2024) from a regular ``SW_IN_POT`` series.

    ``SW_POT_sm`` is the centred ``days``-day moving average; ``SW_POT_sm_diff`` the same average of
    ``1e4`` times the forward difference of ``SW_POT_sm`` per half hour (for hourly data the per-step
    difference is halved). The ends are padded by reflection.
    """
    from .dml import _numeric

    v = _numeric(sw_in_pot, "sw_in_pot")
    if v.ndim != 1 or v.size < 2:
        raise ShapeError("sw_in_pot", "a 1-d series of at least two values", f"shape {v.shape}")
    if not np.isfinite(v).all():
        raise NonFiniteError("sw_in_pot", "a complete, finite series (potential radiation is computed, never missing)",
                             f"{int((~np.isfinite(v)).sum())} NaN or infinite values")
    if float(v.min()) < 0.0:
        raise InputError("sw_in_pot", "non-negative potential radiation (W m-2)", f"minimum {float(v.min()):.4g}")
    steps_per_day = check_int(steps_per_day, "steps_per_day", minimum=1)
    days = check_real(days, "days", positive=True, expected="a positive window length in days")
    window = max(1, int(round(days * steps_per_day)))
    if window >= v.size:
        raise InputError("sw_in_pot", f"a series longer than the {days:g}-day window (days={days:g} x "
                         f"steps_per_day={steps_per_day} = {window} steps)", f"{v.size} steps")
    sm = _moving_average(v, window)
    diff = np.diff(sm, append=sm[-1] + (sm[-1] - sm[-2])) * (48.0 / steps_per_day)
    return sm, _moving_average(1e4 * diff, window)


def _truncated_normal(rng: np.random.Generator, sd: float, size: int, bound: float = 0.95) -> np.ndarray:
    if sd == 0.0:
        return np.zeros(size)
    e = rng.normal(0.0, sd, size)
    bad = np.abs(e) > bound
    while bad.any():                                   # rejection: an exact truncated Gaussian
        e[bad] = rng.normal(0.0, sd, int(bad.sum()))
        bad = np.abs(e) > bound
    return e


def synthetic_site(years: int = 5, *, start: str = "2003-01-01", latitude: float = 47.12, q10: float = 1.5,
                   tref: float = 15.0, noise: float = 0.2, gpp_noise: float | None = None,
                   seed: _device.Seed = 0) -> xr.Dataset:
    """Half-hourly synthetic flux-tower data with a known Q10 and known GPP/RECO (see the module text).

    Parameters
    ----------
    years : int
        Length of the record (from ``start``), half-hourly.
    start : str
        First timestamp (interval start), e.g. ``"2003-01-01"``.
    latitude : float
        Degrees north (default AT-Neu).
    q10, tref : float
        True temperature sensitivity and reference temperature (C).
    noise : float
        Standard deviation of the multiplicative noise on respiration (truncated to +-0.95).
    gpp_noise : float, optional
        The same for GPP (default: ``noise``).
    seed : int, SeedSequence, torch.Generator or None
        Drivers and noise come from independent child streams, so changing ``noise`` keeps the weather.

    Returns
    -------
    xarray.Dataset
        Over ``time``: ``TA`` (C), ``SW_IN``, ``SW_IN_POT``, ``SW_POT_sm``, ``SW_POT_sm_diff`` (W m-2),
        ``VPD`` (hPa), ``NIGHT`` (1 where ``SW_IN_POT == 0``), the truths ``RB``, ``RECO``, ``GPP``,
        ``LUE`` (GPP per unit SW_IN), ``NEE`` (umol m-2 s-1) and the
        observations ``RECO_obs``, ``GPP_obs``, ``NEE_obs``. ``attrs`` record the true ``q10``, ``tref``,
        ``noise`` and the seed.
    """
    years = check_int(years, "years", minimum=1)
    q10 = check_real(q10, "q10", positive=True)
    tref = check_real(tref, "tref")
    if tref < -273.15:
        raise InputError("tref", "a reference temperature in degrees Celsius above absolute zero (-273.15)", tref)
    noise = check_real(noise, "noise")
    gpp_noise = noise if gpp_noise is None else check_real(gpp_noise, "gpp_noise")
    if not 0.0 <= noise < 1.0 or not 0.0 <= gpp_noise < 1.0:
        raise InputError("noise", "a relative standard deviation in [0, 1)", f"{noise}, gpp_noise {gpp_noise}")
    latitude = check_real(latitude, "latitude")
    if abs(latitude) > 66.0:
        raise InputError("latitude", "a latitude within +-66 degrees (no polar night or day)", latitude)
    if start is None or isinstance(start, (bool, int, float)):
        raise InputError("start", "a date such as '2003-01-01'", repr(start))
    try:
        t0 = pd.Timestamp(start)
        if pd.isna(t0):
            raise ValueError("NaT")
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError("start", "a date such as '2003-01-01'", repr(start)) from exc
    try:
        time = pd.date_range(t0, t0 + pd.DateOffset(years=years), freq="30min", inclusive="left")
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError("years", f"a record from {t0.date()} that ends within pandas' date range (before 2262)",
                         years) from exc
    if time.size < 2 * 480:
        raise InputError("years", "a record longer than the 10-day smoothing window", f"{time.size} half-hours")
    n = time.size
    weather_seed, noise_seed = _device.spawn(seed, 2)
    rng = np.random.default_rng(weather_seed)
    sw_pot = potential_radiation(time, latitude)
    doy = time.day_of_year.values.astype(float)
    hour = time.hour.values + time.minute.values / 60.0 + 0.25
    day = (time.normalize() - time[0].normalize()).days.values
    n_days = int(day[-1]) + 1
    z = np.empty(n_days)                                  # daily cloudiness, persistent
    z[0] = rng.normal(0.0, 1.0)
    shocks = rng.normal(0.0, 0.9, n_days)
    for k in range(1, n_days):
        z[k] = 0.6 * z[k - 1] + shocks[k]
    cloud = (1.0 / (1.0 + np.exp(-z)))[day]
    flicker = rng.normal(0.0, 0.04, n)
    sw_in = np.maximum(0.0, sw_pot * (0.75 - 0.55 * cloud) * (1.0 + flicker))
    innov = rng.normal(0.0, 0.2, n)
    anomaly = np.empty(n)
    anomaly[0] = rng.normal(0.0, 0.2 / math.sqrt(1 - 0.998**2))
    phi = 0.998
    for k in range(1, n):                                 # AR(1) synoptic anomaly
        anomaly[k] = phi * anomaly[k - 1] + innov[k]
    diurnal = np.cos(2.0 * np.pi * (hour - 15.0) / 24.0)
    ta = 7.0 - 10.0 * np.cos(2.0 * np.pi * (doy - 20.0) / 365.25) + 5.0 * (1.0 - 0.6 * cloud) * diurnal + anomaly
    rh = np.clip(0.55 + 0.35 * cloud - 0.2 * (1.0 - 0.5 * cloud) * diurnal + rng.normal(0.0, 0.04, n), 0.05, 1.0)
    vpd = np.maximum(0.0, saturation_vapour_pressure(ta) * (1.0 - rh))
    sw_sm, sw_sm_diff = smoothed_potential_radiation(sw_pot)
    base = 0.01 * sw_sm - 0.005 * sw_sm_diff
    rb = 0.75 * (base - base.min() + 0.1 * np.pi)
    reco = rb * q10 ** ((ta - tref) / 10.0)
    rue = 0.5 * np.exp(-((0.1 * (ta - 20.0)) ** 2)) * np.minimum(1.0, np.exp(-0.1 * (vpd - 10.0)))
    lue = rue / 12.011
    gpp = lue * sw_in
    nrng = np.random.default_rng(noise_seed)
    reco_obs = reco * (1.0 + _truncated_normal(nrng, noise, n))
    gpp_obs = gpp * (1.0 + _truncated_normal(nrng, gpp_noise, n))
    flux = "umol m-2 s-1"
    v = {
        "TA": (ta, "degC", "air temperature"),
        "SW_IN": (sw_in, "W m-2", "incoming shortwave radiation"),
        "SW_IN_POT": (sw_pot, "W m-2", "potential (top-of-atmosphere) shortwave radiation"),
        "SW_POT_sm": (sw_sm, "W m-2", "10-day moving average of SW_IN_POT"),
        "SW_POT_sm_diff": (sw_sm_diff, "1e-4 W m-2 per half hour", "10-day moving average of its change"),
        "VPD": (vpd, "hPa", "vapour pressure deficit"),
        "NIGHT": ((sw_pot == 0.0).astype(np.int8), "1", "night flag (SW_IN_POT = 0)"),
        "RB": (rb, flux, "true base respiration at Tref"),
        "RECO": (reco, flux, "true ecosystem respiration"),
        "GPP": (gpp, flux, "true gross primary production"),
        "LUE": (lue, "umol m-2 s-1 per W m-2", "true light-use efficiency GPP / SW_IN"),
        "NEE": (reco - gpp, flux, "true net ecosystem exchange"),
        "RECO_obs": (reco_obs, flux, "observed respiration"),
        "GPP_obs": (gpp_obs, flux, "observed gross primary production"),
        "NEE_obs": (reco_obs - gpp_obs, flux, "observed net ecosystem exchange"),
    }
    ds = xr.Dataset({k: ("time", a, {"units": u, "long_name": ln}) for k, (a, u, ln) in v.items()},
                    coords={"time": time})
    ds.attrs.update({"q10": q10, "tref": tref, "noise": noise, "gpp_noise": gpp_noise, "latitude": latitude,
                     "seed": _device.seed_to_attr(seed), "source": "daml.causal.synthetic_site"})
    return ds


def to_fluxnet_csv(site: xr.Dataset, path: str | os.PathLike, *, nee: str = "NEE_obs") -> None:
    """Write ``site`` (from :func:`synthetic_site`) as a FLUXNET2015-style half-hourly CSV (atomically)."""
    if not isinstance(site, xr.Dataset):
        raise InputError("site", "an xarray.Dataset from daml.causal.synthetic_site", type(site).__name__)
    if not isinstance(nee, str):
        raise InputError("nee", "a variable name (str)", repr(nee))
    if not isinstance(path, (str, os.PathLike)):
        raise InputError("path", "a file path (str or os.PathLike)", type(path).__name__)
    if nee not in site.variables:
        raise InputError("nee", f"the name of a variable of site ({sorted(map(str, site.data_vars))[:20]})", repr(nee))
    needed = ["time", "TA", "SW_IN_POT", "SW_IN", "VPD", nee, "NIGHT"]
    missing = [k for k in needed if k not in site.variables]
    if missing:
        raise InputError("site", f"the variables {needed}", f"a Dataset without {missing} (variables {list(site.variables)[:20]})")
    t = _as_times(site["time"].values, "site['time']")
    frame = pd.DataFrame({
        "TIMESTAMP_START": t.strftime("%Y%m%d%H%M"),
        "TIMESTAMP_END": (t + pd.Timedelta(minutes=30)).strftime("%Y%m%d%H%M"),
        "TA_F": site["TA"].values, "TA_F_QC": 0,
        "SW_IN_POT": site["SW_IN_POT"].values,
        "SW_IN_F": site["SW_IN"].values, "SW_IN_F_QC": 0,
        "VPD_F": site["VPD"].values, "VPD_F_QC": 0,
        "NEE_VUT_REF": site[nee].values, "NEE_VUT_REF_QC": 0,
        "NIGHT": site["NIGHT"].values.astype(int),
    })
    frame = frame.fillna(_MISSING)
    with atomic_write_path(path, suffix=".csv") as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")


def read_fluxnet_csv(path: str | os.PathLike, *, max_qc: int = 0, latitude: float | None = None,
                     min_night: int = 100) -> tuple[pd.DataFrame, dict[str, int]]:
    """Read a FLUXNET2015-style half-hourly CSV and return its night-time respiration data.

    Night-time NEE is respiration. The rows kept are ``NIGHT == 1``, ``NEE_VUT_REF_QC <= max_qc``
    (0 = measured), no missing value in the drivers and ``NEE_VUT_REF > 0`` (a respiration must be
    positive to take its logarithm); every dropped row is counted in the returned report.

    ``SW_IN_POT`` is used when present; otherwise it is computed from the timestamps and ``latitude``
    (required then). The controls ``SW_POT_sm`` and ``SW_POT_sm_diff`` are computed on the full,
    regular record before any row is dropped.

    Returns
    -------
    (pandas.DataFrame, dict)
        Columns ``time``, ``RECO`` (= night NEE), ``TA``, ``VPD``, ``SW_POT_sm``, ``SW_POT_sm_diff``;
        and counts: ``rows``, ``night``, ``bad_qc``, ``missing``, ``non_positive``, ``kept``.

    Raises
    ------
    InputError
        Missing columns, values whose units look wrong (Kelvin temperatures, VPD in kPa, fluxes out of
        range), too few usable night-time rows (fewer than ``min_night``).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise InputError("path", "a CSV file path (str or os.PathLike)", type(path).__name__)
    max_qc = check_int(max_qc, "max_qc", minimum=0)
    min_night = check_int(min_night, "min_night", minimum=1)
    if latitude is not None:
        latitude = check_real(latitude, "latitude", expected="degrees north within [-90, 90]")
        if abs(latitude) > 90.0:
            raise InputError("latitude", "degrees north within [-90, 90]", latitude)
    if os.path.isdir(path):
        raise InputError("FILE", "a CSV file", f"{path} is a folder")
    try:
        header = pd.read_csv(path, nrows=0).columns
    except FileNotFoundError as exc:
        raise InputError("FILE", "an existing CSV file", str(path)) from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise InputError("FILE", "a CSV file with a header row", f"{path} ({exc})") from exc
    if len(header) == 1:                              # one column: another separator than the comma?
        for sep, what in ((";", "semicolon-separated (a decimal-comma export?)"), ("\t", "tab-separated")):
            if sep in str(header[0]):
                raise InputError("FILE", "a comma-separated CSV with decimal points (the FLUXNET2015 format)",
                                 f"{path}, which looks {what}: its header is {str(header[0])[:80]!r}",
                                 hint="convert it, e.g. pandas.read_csv(path, sep=';', decimal=',').to_csv(new_path, "
                                      "index=False)" if sep == ";" else "convert it, e.g. pandas.read_csv(path, "
                                      "sep='\\t').to_csv(new_path, index=False)")
    required = [c for c in FLUXNET_REQUIRED if c not in header]
    if "SW_IN_POT" not in header and latitude is None:
        required.append("SW_IN_POT (or pass latitude)")
    if required:
        raise InputError("FILE", f"the FLUXNET2015 columns {', '.join(FLUXNET_REQUIRED)} and SW_IN_POT",
                         f"{path} without {', '.join(required)}")
    cols = [c for c in (*FLUXNET_REQUIRED, "SW_IN_POT", "TA_F_QC") if c in header]
    try:
        frame = pd.read_csv(path, usecols=cols, dtype={"TIMESTAMP_START": str}, na_values=[_MISSING, "-9999"])
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise InputError("FILE", "a CSV file with the same number of fields on every line",
                         f"{path} ({str(exc).splitlines()[0][:200]})",
                         hint="decimal commas in a comma-separated file split numbers into extra fields") from exc
    if len(frame) < 2:
        raise InputError("FILE", "a half-hourly or hourly record with data rows", f"{path} with {len(frame)} data rows")
    for col in cols:
        if col == "TIMESTAMP_START":
            continue
        values = frame[col]
        if values.dtype.kind not in "fiub":
            num = pd.to_numeric(values, errors="coerce")
            text = np.flatnonzero(num.isna().to_numpy() & values.notna().to_numpy())
            if text.size:
                decimal_comma = bool(values.astype(str).str.fullmatch(r"-?\d+,\d+").iloc[text].any())
                raise InputError("FILE", f"numbers in column {col}",
                                 f"{values.iloc[text[0]]!r} in {path}, data row {int(text[0]) + 1} (line "
                                 f"{int(text[0]) + 2}); {text.size} non-numeric entries in {col}",
                                 hint="decimal commas: write the file with decimal points" if decimal_comma else
                                 "missing values are -9999 in FLUXNET2015 files")
            frame[col] = num.astype(float)
        inf = np.flatnonzero(np.isinf(frame[col].to_numpy(float)))
        if inf.size:
            raise NonFiniteError("FILE", f"finite numbers in column {col} (-9999 for missing)",
                                 f"{inf.size} infinite values in {path}, first in data row {int(inf[0]) + 1}")
    try:
        time = pd.to_datetime(frame["TIMESTAMP_START"], format="%Y%m%d%H%M")
    except (ValueError, TypeError) as exc:
        raise InputError("TIMESTAMP_START", "timestamps written as YYYYMMDDHHMM", frame["TIMESTAMP_START"].iloc[0]) from exc
    step = np.diff(time.values).astype("timedelta64[m]").astype(int)
    if step.size == 0 or not (step == step[0]).all() or step[0] not in (30, 60):
        raise InputError("TIMESTAMP_START", "a regular half-hourly or hourly record without gaps in the time axis",
                         f"steps of {sorted(set(step.tolist()))[:5]} minutes")
    steps_per_day = 1440 // int(step[0])
    ta = frame["TA_F"].to_numpy(float)
    vpd = frame["VPD_F"].to_numpy(float)
    sw = frame["SW_IN_F"].to_numpy(float)
    nee = frame["NEE_VUT_REF"].to_numpy(float)
    cold = np.flatnonzero(ta < -273.15)
    if cold.size:
        raise InputError("TA_F", "air temperatures in degrees Celsius, above absolute zero (-273.15)",
                         f"{ta[cold[0]]:.6g} in {path}, data row {int(cold[0]) + 1} ({cold.size} such values)")
    night_flag = frame["NIGHT"].to_numpy(float)
    odd = np.flatnonzero(np.isfinite(night_flag) & (night_flag != 0) & (night_flag != 1))
    if odd.size:
        raise InputError("NIGHT", "a night flag of 0 or 1", f"{night_flag[odd[0]]:g} in {path}, data row {int(odd[0]) + 1}")
    _check_units(ta, vpd, sw, nee, night_flag)
    if "SW_IN_POT" in frame:
        sw_pot = frame["SW_IN_POT"].to_numpy(float)
        if np.isnan(sw_pot).any():
            raise InputError("SW_IN_POT", "a complete series (it is computed, never gap-filled)",
                             f"{int(np.isnan(sw_pot).sum())} missing values")
        if (sw_pot < 0).any():
            raise InputError("SW_IN_POT", "non-negative potential radiation (W m-2)",
                             f"{int((sw_pot < 0).sum())} negative values in {path}, first in data row "
                             f"{int(np.argmax(sw_pot < 0)) + 1}")
    else:
        sw_pot = potential_radiation(time, float(latitude), step_hours=int(step[0]) / 60.0)
    sm, sm_diff = smoothed_potential_radiation(sw_pot, steps_per_day=steps_per_day)
    night = frame["NIGHT"].to_numpy(float) == 1
    qc = frame["NEE_VUT_REF_QC"].to_numpy(float)
    good_qc = qc <= max_qc
    if "TA_F_QC" in frame:
        good_qc &= frame["TA_F_QC"].to_numpy(float) <= max(max_qc, 1)
    missing = np.isnan(ta) | np.isnan(vpd) | np.isnan(nee)
    report = {"rows": int(len(frame)), "night": int(night.sum()), "bad_qc": int((night & ~good_qc).sum()),
              "missing": int((night & good_qc & missing).sum())}
    usable = night & good_qc & ~missing
    positive = usable & (nee > 0)
    report["non_positive"] = int((usable & ~positive).sum())
    report["kept"] = int(positive.sum())
    if report["kept"] < min_night:
        raise InputError("FILE", f"at least {min_night} usable night-time rows (min_night; NIGHT = 1, NEE_VUT_REF_QC <= {max_qc}, "
                         "NEE_VUT_REF > 0, drivers present)",
                         f"{report['kept']} in {path} ({report})")
    out = pd.DataFrame({"time": time[positive].values, "RECO": nee[positive], "TA": ta[positive],
                        "VPD": vpd[positive], "SW_POT_sm": sm[positive], "SW_POT_sm_diff": sm_diff[positive]})
    return out, report


def _check_units(ta: np.ndarray, vpd: np.ndarray, sw: np.ndarray, nee: np.ndarray, night: np.ndarray) -> None:
    def q(a: np.ndarray, p: float) -> float:
        a = a[np.isfinite(a)]
        return float(np.quantile(a, p)) if a.size else float("nan")

    if q(ta, 0.5) > 150.0:
        raise InputError("TA_F", "air temperature in degrees Celsius", f"median {q(ta, 0.5):.1f} (looks like Kelvin)")
    if not -60.0 <= q(ta, 0.5) <= 50.0:
        raise InputError("TA_F", "air temperature in degrees Celsius (median within -60..50)", f"median {q(ta, 0.5):.1f}")
    if q(vpd, 0.99) < 5.0 and q(ta, 0.99) > 15.0:      # warm afternoons reach well over 5 hPa
        raise InputError("VPD_F", "vapour pressure deficit in hPa (FLUXNET2015 convention)",
                         f"99th percentile {q(vpd, 0.99):.3g} (looks like kPa)", hint="multiply by 10")
    if q(vpd, 0.01) < -1.0:
        raise InputError("VPD_F", "a non-negative vapour pressure deficit in hPa", f"1st percentile {q(vpd, 0.01):.3g}")
    if q(sw, 0.999) > 1600.0 or q(sw, 0.001) < -50.0:
        raise InputError("SW_IN_F", "shortwave radiation in W m-2 (0..1600)",
                         f"range {q(sw, 0.001):.4g}..{q(sw, 0.999):.4g}")
    night_nee = nee[(night == 1) & np.isfinite(nee)]
    if night_nee.size and (abs(float(np.median(night_nee))) > 50.0 or q(np.abs(nee), 0.99) > 200.0):
        raise InputError("NEE_VUT_REF", "net ecosystem exchange in umol CO2 m-2 s-1",
                         f"night-time median {float(np.median(night_nee)):.4g}, 99th percentile of |NEE| "
                         f"{q(np.abs(nee), 0.99):.4g}")
