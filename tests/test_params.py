"""params.yaml validation: every bad value is named with what is allowed."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from crmse.params import ParamsError, check_sizes, load_params, validate
from crmse.presets import apply_preset

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_repository_params_are_valid():
    p = load_params(REPO / "params.yaml")
    assert p["molecules"] and p["train_sizes"]


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("molecules",), ["ethanol", "benzol"], r"molecules\[1\] = 'benzol'.*one of 'aspirin', 'ethanol'"),
        (("train_sizes",), [200, -5], r"train_sizes\[1\] = -5.*>= 1"),
        (("train_sizes",), [], r"train_sizes = \[\].*non-empty"),
        (("train_sizes",), [200, 200], r"duplicate"),
        (("device",), "tpu", r"device = 'tpu'.*'auto', 'cpu', 'cuda'"),
        (("md", "temperature"), "hot", r"md.temperature = 'hot'.*'auto'"),
        (("md", "temperature"), -10, r"md.temperature = -10.*> 0"),
        (("md", "dt"), 0, r"md.dt = 0.*> 0"),
        (("crmse", "p_reset"), 1.5, r"crmse.p_reset = 1.5.*<= 1"),
        (("crmse", "n_chains"), 2.5, r"crmse.n_chains = 2.5.*integer"),
        (("crmse", "ema_decay"), 1.0, r"crmse.ema_decay = 1.0.*<= 0.9999"),
        (("crmse", "spurious_weight"), 0.5, r"crmse.spurious_weight = 0.5.*>= 1"),
        (("crmse", "scout_temperature_ratio"), 0.8, r"crmse.scout_temperature_ratio = 0.8.*>= 1"),
        (("crmse", "hole_memory"), -1, r"crmse.hole_memory = -1.*>= 0"),
        (("crmse", "hole_projection"), "yes", r"crmse.hole_projection = 'yes'.*allowed: bool"),
        (("crmse", "remember_blowups"), 1, r"crmse.remember_blowups = 1.*allowed: bool"),
        (("mse", "lr"), "fast", r"mse.lr = 'fast'"),
        (("mse", "lr"), float("nan"), r"mse.lr = nan"),
        (("data", "variant"), "md22", r"data.variant = 'md22'.*'md17', 'rmd17'"),
        (("model", "n_interactions"), True, r"model.n_interactions = True"),
    ],
)
def test_bad_values_name_key_value_and_allowed(params, path, value, message):
    bad = copy.deepcopy(params)
    node = bad
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    with pytest.raises(ParamsError, match=message):
        validate(bad)


def test_missing_and_unknown_keys(params):
    bad = copy.deepcopy(params)
    del bad["md"]["dt"]
    with pytest.raises(ParamsError, match="missing key md.dt"):
        validate(bad)
    bad = copy.deepcopy(params)
    bad["md"]["timestep"] = 1
    with pytest.raises(ParamsError, match="unknown key md.timestep"):
        validate(bad)


def test_temperature_accepts_auto_and_numbers(params):
    p = copy.deepcopy(params)
    p["md"]["temperature"] = 500
    assert validate(p)["md"]["temperature"] == 500.0
    p["md"]["temperature"] = "auto"
    assert validate(p)["md"]["temperature"] == "auto"


def test_training_size_larger_than_data(params):
    p = validate(params)
    p["train_sizes"] = [9000]
    with pytest.raises(ParamsError, match=r"train_sizes contains 9000, but ethanol has only 9633 frames"):
        check_sizes(p, {"ethanol": 9633})
    check_sizes(validate(params), {"ethanol": 9633})


def test_load_params_reports_bad_yaml(tmp_path):
    (tmp_path / "params.yaml").write_text("molecules: [ethanol\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")


def test_presets_are_valid_and_cpu_restores_defaults(tmp_path):
    presets = REPO / "presets"
    names = sorted(p.stem for p in presets.glob("*.yaml"))
    assert "cpu" in names and "paper" in names
    target = tmp_path / "params.yaml"
    target.write_text((REPO / "params.yaml").read_text())
    default = load_params(target)
    for name in names:
        apply_preset(name, target, presets)
        assert load_params(target)  # every preset yields valid params
    apply_preset("cpu", target, presets)
    assert load_params(target) == default
    with pytest.raises(ParamsError, match="unknown preset 'huge'"):
        apply_preset("huge", target, presets)


def test_per_molecule_overrides_apply_to_their_molecule_only(tmp_path, params):
    p = copy.deepcopy(params)
    p["molecules"] = ["ethanol", "aspirin"]
    p["per_molecule"] = {"ethanol": {}, "aspirin": {"md": {"n_replicas": 7}, "crmse": {"n_chains": 5}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    base = load_params(tmp_path / "params.yaml")
    asp = load_params(tmp_path / "params.yaml", molecule="aspirin")
    eth = load_params(tmp_path / "params.yaml", molecule="ethanol")
    assert (asp["md"]["n_replicas"], asp["crmse"]["n_chains"]) == (7, 5)
    assert eth["md"] == base["md"] and eth["crmse"] == base["crmse"]
    assert asp["md"]["dt"] == base["md"]["dt"]  # keys the override leaves alone keep the shared value


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"md": {"n_replicas": 0}}, r"md.n_replicas = 0.*>= 1"),
        ({"md": {"replicas": 3}}, r"unknown key per_molecule.aspirin.md.replicas"),
        ({"seeds": [1]}, r"per_molecule.aspirin.seeds cannot be set per molecule"),
        ("many", r"per_molecule.aspirin must be a mapping"),
    ],
)
def test_bad_per_molecule_overrides_are_named(params, override, message):
    p = copy.deepcopy(params)
    p["per_molecule"] = {"ethanol": {}, "aspirin": override}
    with pytest.raises(ParamsError, match=message):
        validate(p)


def test_every_molecule_needs_a_per_molecule_entry(params):
    p = copy.deepcopy(params)
    p["molecules"] = ["ethanol", "aspirin"]
    p["per_molecule"] = {"ethanol": {}}
    with pytest.raises(ParamsError, match=r"per_molecule has no entry for aspirin"):
        validate(p)
    p["per_molecule"] = {"ethanol": {}, "aspirin": {}, "benzol": {}}
    with pytest.raises(ParamsError, match=r"per_molecule.benzol: unknown molecule"):
        validate(p)


def test_scouts_without_a_hole_memory_are_refused_up_front(params):
    bad = copy.deepcopy(params)
    bad["crmse"]["hole_memory"] = 0
    with pytest.raises(ParamsError, match="scout_chains > 0 needs crmse.hole_memory > 0"):
        validate(bad)


def test_remembering_blowups_without_a_hole_memory_is_refused_up_front(params):
    bad = copy.deepcopy(params)
    bad["crmse"]["hole_memory"] = 0
    bad["crmse"]["scout_chains"] = 0
    bad["crmse"]["remember_blowups"] = True
    with pytest.raises(ParamsError, match="remember_blowups needs crmse.hole_memory > 0"):
        validate(bad)


def test_energy_projection_without_hole_projection_is_refused_up_front(params):
    bad = copy.deepcopy(params)
    bad["crmse"]["hole_projection"] = False
    bad["crmse"]["energy_projection"] = True
    with pytest.raises(ParamsError, match="energy_projection needs crmse.hole_projection"):
        validate(bad)
