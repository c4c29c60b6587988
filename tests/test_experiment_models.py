"""A method's own forecast model in an experiment file (``model = {...}`` in a ``[[methods]]`` table), and
mechanical models (true systems and learned networks) in ``daml run`` configurations."""

import pytest
import torch

from daml.errors import InputError
from daml.experiment import load_config, run_experiment

BASE = """
[experiment]
name = "pendulum_twin"
steps = 60
burn_in = 1.0
experiments = 2
seed = 4

[model]
name = "mechanical"
system = "pendulum"
mass = 2.0
length = 0.5
gravity = 3.0
dt = 0.1
substeps = 4

[observations]
kind = "indices"
indices = [0]
sd = 0.1
every = 3

[prior]
x0 = [1.5, 0.5]
cov = 0.01

[[methods]]
name = "etkf"
members = 16
"""


def test_a_method_runs_its_own_model_and_the_truth_keeps_its_own():
    wrong = BASE + """
[[methods]]
name = "etkf"
members = 16
model = {name = "mechanical", system = "pendulum", mass = 2.0, length = 0.5, gravity = 6.0, dt = 0.1, substeps = 4}
"""
    exp = load_config(wrong)
    data, scores = run_experiment(exp)
    right, mis = scores
    assert mis.label != right.label
    # each posterior records the model it ran
    assert '"gravity": 6.0' in mis.posterior.attrs["config"] and '"gravity": 3.0' in right.posterior.attrs["config"]
    assert right.rmse_a < 0.1 < mis.rmse_a                  # twice the gravity: a much worse forecast
    # the same method without its own model is the first row, bit for bit
    alone = run_experiment(load_config(BASE))[1][0]
    assert alone.rmse_a == right.rmse_a


@pytest.mark.parametrize("spec, key", [
    ("3", "methods[1].model"),
    ('{name = "nope"}', "methods[1].model.name"),
    ('{name = "mechanical", system = "pendulum", dt = 0.2}', "methods[1].model.dt"),
    ('{name = "mechanical", system = "double_pendulum", dt = 0.1}', "methods[1].model"),
    ('{name = "mechanical", system = "pendulum", dt = 0.1, bogus = 1}', "methods[1].model"),
])
def test_a_bad_method_model_is_named_by_its_key(spec, key):
    with pytest.raises(InputError) as err:
        load_config(BASE + f'\n[[methods]]\nname = "etkf"\nmembers = 8\nmodel = {spec}\n')
    assert str(err.value.argument).startswith(f"config key '{key}")


def test_a_learned_network_from_a_file_is_a_forecast_model(tmp_path):
    from daml.io import save_network
    from daml.models import HamiltonianNet, Mechanical, make_model

    net = HamiltonianNet(1, hidden=8, seed=1)
    path = tmp_path / "hnn.pt"
    save_network(net, path)
    model = make_model("mechanical", file=str(path), dt=0.1, substeps=2)
    assert isinstance(model, Mechanical)
    x = torch.tensor([[0.3, -0.2]], dtype=torch.float64)
    assert torch.equal(model.step(x), Mechanical(net, 0.1, substeps=2).step(x))
    again = make_model("mechanical", **model.config())                # the config names the file
    assert torch.equal(again.step(x), model.step(x))
    exp = load_config(BASE.replace("steps = 60", "steps = 12") + f"""
[[methods]]
name = "etkf"
members = 8
model = {{name = "mechanical", file = "{path}", dt = 0.1, substeps = 2}}
""")
    _, scores = run_experiment(exp)
    assert scores[1].status == "done" and scores[1].rmse_a == scores[1].rmse_a   # finite
    with pytest.raises(InputError, match="dim"):
        make_model("mechanical", file=str(path), dt=0.1, dim=2)           # a check against the file


def test_the_pendulum_example_runs_its_learned_networks(monkeypatch):
    """examples/pendulum_learned.toml (issue 30): the truth is the pendulum, two of the three rows per
    filter run networks read from the shipped files; a short version of it runs and scores every row."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)                      # the network files are relative to the working directory
    text = (root / "examples" / "pendulum_learned.toml").read_text()
    short = text.replace("steps = 300", "steps = 60").replace("experiments = 4", "experiments = 1") \
        .replace("members = 300", "members = 40")
    exp = load_config(short)
    assert [m.get("model", {}).get("file") for m in exp.methods] == [
        None, "examples/pendulum_hnn.pt", "examples/pendulum_mlp.pt"] * 2
    _, scores = run_experiment(exp, only=["etkf"])
    assert all(s.status == "done" and s.rmse_a < 1.0 for s in scores)
    assert '"file": "examples/pendulum_hnn.pt"' in scores[1].posterior.attrs["config"]
