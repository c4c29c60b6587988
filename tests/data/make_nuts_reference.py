"""Regenerate ``nuts_tanh5.json``: the NUTS reference posterior predictive of a small Bayesian network.

Data: 20 inputs uniform on [-2, 2] (numpy default_rng(0)), targets tanh(2x) + 0.1 N(0, 1). Network:
1 -> 5 tanh -> 1 with independent Gaussian priors of sd 1 (first-layer weights, both biases) and
1/sqrt(5) (output weights): the prior of ``daml.ensembles.prior_sd`` for ``mlp(1, 5, activation="tanh")``.
Likelihood noise sd 0.1. Pyro NUTS (an independent library, test-only), 1 chain, 700 warm-up and 1500
kept draws. Stored: the predictive mean and variance of f at the test inputs and their Monte Carlo
standard errors (batch means over 10 batches).

Run: ``python tests/data/make_nuts_reference.py`` (about 5-10 minutes on one CPU core).
"""

import json
import math
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

H = 5
X_TEST = [-3.0, -1.0, 0.0, 0.5, 2.5]


def data():
    rng = np.random.default_rng(0)
    x = rng.uniform(-2, 2, 20)
    y = np.tanh(2 * x) + 0.1 * rng.normal(size=20)
    return x, y


def model(x, y):
    z = torch.zeros
    w1 = pyro.sample("w1", dist.Normal(z(H, 1, dtype=torch.float64), 1.0).to_event(2))
    b1 = pyro.sample("b1", dist.Normal(z(H, dtype=torch.float64), 1.0).to_event(1))
    w2 = pyro.sample("w2", dist.Normal(z(1, H, dtype=torch.float64), 1 / math.sqrt(H)).to_event(2))
    b2 = pyro.sample("b2", dist.Normal(z(1, dtype=torch.float64), 1.0).to_event(1))
    f = (torch.tanh(x[:, None] @ w1.T + b1) @ w2.T + b2)[:, 0]
    pyro.sample("y", dist.Normal(f, 0.1).to_event(1), obs=y)


def main():
    torch.set_num_threads(1)
    x, y = data()
    pyro.set_rng_seed(0)
    mcmc = MCMC(NUTS(model), num_samples=1500, warmup_steps=700, num_chains=1, disable_progbar=True)
    mcmc.run(torch.tensor(x), torch.tensor(y))
    s = mcmc.get_samples()
    xt = torch.tensor(X_TEST, dtype=torch.float64)
    f = (torch.tanh(xt[None, :, None] @ s["w1"].transpose(1, 2) + s["b1"][:, None, :]) @ s["w2"].transpose(1, 2)
         + s["b2"][:, None, :])[..., 0]                       # (S, n_test)
    batches = f.reshape(10, -1, len(X_TEST))
    out = {
        "x_test": X_TEST, "noise_sd": 0.1, "hidden": H, "draws": int(f.shape[0]),
        "mean": f.mean(0).tolist(), "var": f.var(0).tolist(),
        "mean_se": (batches.mean(1).std(0) / math.sqrt(10)).tolist(),
        "var_se": (batches.var(1).std(0) / math.sqrt(10)).tolist(),
        "generator": "pyro-ppl " + pyro.__version__ + " NUTS, seed 0",
    }
    path = Path(__file__).with_name("nuts_tanh5.json")
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2) + "\n")
    tmp.replace(path)
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
