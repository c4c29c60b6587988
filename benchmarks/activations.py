"""Benchmark: which activations let ``ensembles.fit``'s members converge (issue 26, item 2).

The two ``fit`` examples of docs/ensembles.md (the 1-20-1 network with 10 members on the sine data,
and the 2-8-1 network with 4 members of the ``loo_variance_scale`` example) trained with ``fit``'s
defaults and each activation of ``mlp``; per case the number of unconverged members, the largest
scaled gradient norm at the end and the wall seconds of ``fit``. The table in docs/ensembles.md
("The default activation of mlp is tanh") comes from this script.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/activations.py
"""

from __future__ import annotations

import time
import warnings

import numpy as np


def _cases():
    rng = np.random.default_rng(0)                 # the first example of docs/ensembles.md
    x = rng.uniform(-3, 3, (200, 1))
    y = np.sin(x[:, 0]) + 0.2 * rng.normal(size=200)
    yield "first example, 1-20-1, 10 members", dict(inputs=1, hidden=20, x=x, y=y, members=10)
    rng = np.random.default_rng(0)                 # the loo_variance_scale example
    x = rng.normal(size=(150, 2))
    y = x[:, 0] - 0.5 * x[:, 1] + 0.2 * rng.normal(size=150)
    yield "loo_variance_scale example, 2-8-1, 4 members", dict(inputs=2, hidden=8, x=x, y=y, members=4)


def main() -> None:
    import daml.ensembles as E
    from daml.errors import ConvergenceWarning

    activations = ("relu", "tanh", "silu", "gelu")
    print("| example of this page | " + " | ".join(f"`{a}`" for a in activations) + " |")
    print("|---|" + "---|" * len(activations))
    for label, c in _cases():
        cells = []
        for act in activations:
            t = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                ens = E.fit(E.mlp(c["inputs"], c["hidden"], activation=act), c["x"], c["y"], members=c["members"],
                            noise_sd=0.2, seed=0)
            seconds = time.perf_counter() - t
            conv = ens.convergence
            bad = int((~np.asarray(conv["converged"])).sum())
            worst = float(np.max(np.asarray(conv["scaled_grad_norm"])))
            cells.append(f"{bad} unconverged (scaled gradient norm up to {worst:.2f}), {seconds:.0f} s" if bad
                         else f"all converged, {seconds:.0f} s")
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
