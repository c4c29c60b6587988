"""Trained networks on disk: daml.io.save_network / load_network, make_model(file=), dpf(proposal=path), and an
experiment file that names both (issue 28: the learned models are usable wherever a model or proposal is)."""

import json
import os

import numpy as np
import pytest
import torch

import daml
from daml import filters, io, models
from daml.errors import InputError
from daml.experiment import load_config, run_experiment


def _trained_pair(seed=0):
    """A transition and proposal whose parameters differ from a fresh seeded draw (as after training)."""
    trans = models.MixtureTransition(3, components=2, hidden=(8,), seed=seed)
    prop = filters.MixtureProposal(3, 3, components=2, hidden=(8,), seed=seed + 1)
    with torch.no_grad():
        for p in list(trans.parameters()) + list(prop.parameters()):
            p.add_(0.01 * torch.arange(p.numel(), dtype=p.dtype).reshape(p.shape).sin())
    return trans, prop


def test_round_trip_gives_the_same_network(tmp_path):
    trans, prop = _trained_pair()
    io.save_network(trans, tmp_path / "t.pt")
    io.save_network(prop, tmp_path / "p.pt")
    t2 = io.load_network(tmp_path / "t.pt", "MixtureTransition")
    p2 = io.load_network(tmp_path / "p.pt")
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).reshape(4, 3)
    x1 = x.flip(0) * 0.5
    assert torch.equal(trans.log_transition(x, x1), t2.log_transition(x, x1))
    assert torch.equal(trans.step(x), t2.step(x))
    y, mask = torch.ones(3, dtype=torch.float64), torch.tensor([True, False, True])
    assert torch.equal(prop.log_prob(x, y, mask, x1), p2.log_prob(x, y, mask, x1))
    assert t2.config()["file"] == str(tmp_path / "t.pt") and "seed" not in t2.config()
    json.dumps(models.model_config(t2))                      # the attrs of a posterior stay JSON


def test_make_model_reads_a_trained_transition(tmp_path):
    trans, _ = _trained_pair()
    path = tmp_path / "t.pt"
    io.save_network(trans, path)
    m = models.make_model("mixture_transition", file=str(path))
    x = torch.ones(2, 3, dtype=torch.float64)
    assert torch.equal(m.step(x), trans.step(x))
    again = models.make_model(m.name, **m.config())           # the documented round trip of config()
    assert torch.equal(again.step(x), m.step(x))
    with pytest.raises(InputError, match="components"):
        models.make_model("mixture_transition", file=str(path), components=5)


def test_bad_files_are_refused_naming_the_argument(tmp_path):
    trans, prop = _trained_pair()
    with pytest.raises(InputError, match="path"):
        io.load_network(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="path"):
        io.load_network(tmp_path / "junk.pt")
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(InputError, match="no daml network"):
        io.load_network(tmp_path / "other.pt")
    io.save_network(prop, tmp_path / "p.pt")
    with pytest.raises(InputError, match="kind"):
        io.load_network(tmp_path / "p.pt", "MixtureTransition")
    with pytest.raises(InputError, match="network"):
        io.save_network(torch.nn.Linear(2, 2), tmp_path / "x.pt")
    with torch.no_grad():
        next(trans.parameters()).fill_(float("nan"))
    with pytest.raises(InputError, match="finite"):
        io.save_network(trans, tmp_path / "nan.pt")
    assert not (tmp_path / "nan.pt").exists()
    assert sorted(os.listdir(tmp_path)) == ["junk.pt", "other.pt", "p.pt"]      # no temporary file left


def test_dpf_reads_a_proposal_file_and_matches_the_object(tmp_path):
    trans, prop = _trained_pair()
    io.save_network(prop, tmp_path / "p.pt")
    data = daml.simulate(trans, 6, models.observe_all(3, sd=1.0), x0=np.zeros(3), x0_cov=0.5, experiments=2, seed=1)
    a = filters.run(filters.dpf(20, proposal=prop), trans, data, seed=3, progress=False).analysis
    b = filters.run(filters.dpf(20, proposal=str(tmp_path / "p.pt")), trans, data, seed=3, progress=False).analysis
    np.testing.assert_array_equal(a["x"].values, b["x"].values)
    assert json.loads(b.attrs["config"])["filter"]["proposal"] == str(tmp_path / "p.pt")


def test_an_experiment_file_names_the_trained_transition_and_proposal(tmp_path):
    trans, prop = _trained_pair()
    io.save_network(trans, tmp_path / "t.pt")
    io.save_network(prop, tmp_path / "p.pt")
    text = f"""
[experiment]
name = "learned"
steps = 8
burn_in = 0.0
experiments = 2
seed = 5

[model]
name = "mixture_transition"
file = "{tmp_path / 't.pt'}"

[observations]
kind = "all"
sd = 1.0

[prior]
x0 = "zeros"
cov = 0.5

[[methods]]
name = "dpf"
members = 30
proposal = "{tmp_path / 'p.pt'}"

[[methods]]
name = "dpf"
members = 30

[[methods]]
name = "enkf"
members = 10
"""
    exp = load_config(text)
    data, scores = run_experiment(exp, progress=False)
    assert [s.method for s in scores] == ["dpf", "dpf", "enkf"]
    for s in scores:
        assert s.status == "done" and np.isfinite(s.rmse_a) and s.rmse_a > 0
    assert json.loads(scores[0].posterior.attrs["config"])["model"] == "MixtureTransition"
