"""Issue 26, item 2: the settings that docs/ensembles.md shows are settings that work.

* Every python block of docs/ensembles.md runs with ``ConvergenceWarning`` turned into an error: every
  ensemble the page trains reaches its tolerance under daml's defaults, except where the page says, next
  to the block, that the block shows non-convergence on purpose (it then asserts the warning itself).
* The page's own settings (the keyword arguments of its first example's ``fit``, ``weigh`` and
  ``equal_weight`` calls, read from the page) applied to a model linear in its parameters give the exact
  posterior of Bayesian linear regression: the weighted and the equal-weight means within 3 Monte Carlo
  standard errors (``sqrt(var / ESS)``) and the variances within 4 standard errors of a variance ratio
  (``sqrt(2 / ESS)``) of the exact ones, with no member marked unconverged.
* (slow) The autoconversion example runs under the defaults with every member converged.
"""

import ast
import math
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import daml.ensembles as E
from daml.errors import ConvergenceWarning

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "ensembles.md"
BLOCK = re.compile(r"```python\n(.*?)```", flags=re.S)
DELIBERATE = "deliberately unconverged"      # the phrase the page puts next to a block that shows non-convergence


def blocks() -> list[tuple[str, str]]:
    """(code, the paragraph of text just before it) for every python block of the page."""
    text = PAGE.read_text()
    out, last = [], 0
    for m in BLOCK.finditer(text):
        before = text[last:m.start()].strip().split("\n\n")[-1]
        out.append((m.group(1), before))
        last = m.end()
    return out


def keywords(code: str, name: str) -> list[dict]:
    """The literal keyword arguments of every call ``E.<name>(...)`` in ``code``."""
    found = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == name:
            found.append({k.arg: ast.literal_eval(k.value) for k in node.keywords})
    return found


def test_docs_blocks_train_every_member_to_its_tolerance(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pages = blocks()
    assert len(pages) >= 3
    namespace: dict = {}
    trained = []
    real_fit = E.fit

    def recording_fit(*args, **kw):            # every ensemble the page trains through E.fit
        ens = real_fit(*args, **kw)
        trained.append(ens)
        return ens

    monkeypatch.setattr(E, "fit", recording_fit)
    for i, (code, before) in enumerate(pages):
        if "ConvergenceWarning" in code:
            # a block about non-convergence must say so next to it, and check the warning itself
            assert DELIBERATE in before or DELIBERATE in code, (i, before[-300:])
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            exec(compile(code, f"ensembles.md[block {i}]", "exec"), namespace)
    assert trained
    for ens in trained:
        conv = ens.convergence
        assert bool(conv["converged"].all()), conv["scaled_grad_norm"]
        assert float(conv["scaled_grad_norm"].max()) <= ens.config["tol"]
        assert "epochs" not in ens.config or int(conv["epochs"].max()) < ens.config["epochs"]


def test_the_docs_defaults_are_what_the_page_trains_with():
    """The page's examples leave the training settings (and the activation) to daml's defaults, so that
    the convergence test above is a test of the defaults."""
    code = "\n".join(c for c, _ in blocks())
    for kw in keywords(code, "fit") + keywords(code, "mlp"):
        assert not {"epochs", "tol", "polish", "lr", "batch_size", "activation"} & set(kw), kw


def test_docs_settings_give_the_exact_posterior_on_a_linear_model():
    first = blocks()[0][0]
    (fit_kw,) = keywords(first, "fit")
    (weigh_kw,) = keywords(first, "weigh")
    (equal_kw,) = keywords(first, "equal_weight")
    noise = fit_kw["noise_sd"]
    members = 200                                        # the page's 10 members are too few to test a mean
    kw = {**fit_kw, "members": members}
    rng = np.random.default_rng(5)
    n = 60
    x = rng.normal(size=(n, 2))
    y = x @ np.array([0.8, -1.5]) + 0.4 + noise * rng.normal(size=n)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        ens = E.fit(E.mlp(2, ()), x, y, **kw)            # (w1, w2, b): linear in its parameters
        weighted, info = E.weigh(ens, x, y, **weigh_kw)
        equal, corr = E.equal_weight(weighted, x, y, **equal_kw)
    assert bool(ens.convergence["converged"].all()) and info.trusted and bool(info.converged.all())
    # the exact posterior in the ensemble's normalised units, with its default diagonal prior
    xn = ens.normalise_x(torch.tensor(x)).numpy()
    yn = ((torch.tensor(y) - ens.y_mean) / ens.y_sd).numpy()
    sd = torch.cat([s.reshape(-1) for s in ens.prior_sd.values()]).numpy()
    xx = np.column_stack([xn, np.ones(n)])
    cov = np.linalg.inv(xx.T @ xx / ens.noise_sd**2 + np.diag(1 / sd**2))
    mean = cov @ xx.T @ yn / ens.noise_sd**2
    for name, e, ess in (("weighted", weighted, info.ess), ("equal weight", equal, float(members))):
        theta = E.flat_params(e).numpy()
        w = np.exp(e.log_weight.numpy())
        m = w @ theta
        var = w @ (theta - m) ** 2
        z = np.abs(m - mean) / np.sqrt(np.diag(cov) / ess)
        ratio = var / np.diag(cov)
        assert z.max() < 3, (name, z)
        assert np.abs(ratio - 1).max() < 4 * math.sqrt(2 / ess), (name, ratio)
    # RML on a linear model: uniform weights, so resampling keeps every member
    assert info.ess == pytest.approx(members, rel=1e-6) and corr.unique_before == members


@pytest.mark.slow
def test_autoconversion_example_converges_under_the_defaults(tmp_path):
    """The example's four ensembles of 20 members (about 3 minutes on one core)."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import ensembles_autoconversion as example
    finally:
        sys.path.pop(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        path = example.main(["--out", str(tmp_path)])
    assert Path(path).exists()
