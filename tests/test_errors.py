import pickle

import pytest

from daml import errors


@pytest.mark.parametrize("cls, base", [(errors.ShapeError, ValueError), (errors.NonFiniteError, ValueError),
                                       (errors.DtypeError, TypeError), (errors.SeedError, TypeError),
                                       (errors.PosteriorError, ValueError), (errors.DeviceError, ValueError)])
def test_error_types_name_argument_expected_and_got(cls, base):
    err = cls("log_weight", "finite values", "3 NaN entries", hint="fix it")
    assert isinstance(err, base) and isinstance(err, errors.DamlError)
    assert str(err) == "log_weight: expected finite values, got 3 NaN entries (fix it)"
    assert (err.argument, err.expected, err.got) == ("log_weight", "finite values", "3 NaN entries")
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is cls and str(again) == str(err)


def test_divergence_error_carries_step_and_pickles():
    err = errors.DivergenceError("ensemble spread exploded", step=17)
    assert err.step == 17 and "time step 17" in str(err) and isinstance(err, RuntimeError)
    again = pickle.loads(pickle.dumps(err))
    assert again.step == 17 and str(again) == str(err)


def test_check_fits_refuses_sizes_beyond_memory_and_passes_small_ones():
    avail = errors.available_memory()
    assert avail is None or avail > 0
    errors.check_fits("n", 1024)  # a kilobyte always fits
    if avail is not None:
        with pytest.raises(errors.InputError, match=r"n_members: expected a size whose arrays fit in memory "
                                                    r"\(about .* GiB available\), got n_members=10\*\*12, needing"):
            errors.check_fits("n_members", 8.0 * 10**12 * 40, what="n_members=10**12")
    with pytest.raises(errors.InputError, match="NaN"):
        errors.check_fits("n", float("nan"))
