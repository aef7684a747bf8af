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
        (("md", "temperatures"), ["auto", "hot"], r"md.temperatures\[1\] = 'hot'.*'auto'"),
        (("md", "temperatures"), [-10], r"md.temperatures\[0\] = -10.*> 0"),
        (("md", "temperatures"), [], r"md.temperatures = \[\].*non-empty"),
        (("arms",), ["mse", "crmse_hinge"], r"arms\[1\] = 'crmse_hinge'.*'crmse', 'crmse_memory'"),
        (("md", "dt"), 0, r"md.dt = 0.*> 0"),
        (("crmse", "chains", "p_reset"), 1.5, r"crmse.chains.p_reset = 1.5.*<= 1"),
        (("crmse", "chains", "n"), 2.5, r"crmse.chains.n = 2.5.*integer"),
        (("crmse", "ema_decay"), 1.0, r"crmse.ema_decay = 1.0.*<= 0.9999"),
        (("crmse", "selection", "rule"), "best", r"crmse.selection.rule = 'best'.*'fewest_chain_failures'"),
        (("crmse_memory", "scouts", "temperature_ratio"), 0.8, r"crmse_memory.scouts.temperature_ratio = 0.8.*>= 1"),
        (("crmse_memory", "slots"), 0, r"crmse_memory.slots = 0.*>= 1"),
        (("crmse_memory", "projection"), True, r"crmse_memory.projection = True.*'off', 'fit', 'fit_and_energy'"),
        (("mse", "lr"), "fast", r"mse.lr = 'fast'"),
        (("mse", "lr"), float("nan"), r"mse.lr = nan"),
        (("data", "variant"), "md22", r"data.variant = 'md22'.*'md17', 'rmd17'"),
        (("model", "n_interactions"), True, r"model.n_interactions = True"),
    ],
)
def test_bad_values_name_key_value_and_allowed(params, path, value, message):
    with pytest.raises(ParamsError, match=message):
        validate(_with(params, path, value))


def _with(params: dict, path: tuple[str, ...], value: object) -> dict:
    """A copy of ``params`` with the key at ``path`` set to ``value``."""
    out = copy.deepcopy(params)
    node = out
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return out


def test_missing_and_unknown_keys(params):
    bad = copy.deepcopy(params)
    del bad["md"]["dt"]
    with pytest.raises(ParamsError, match="missing key md.dt"):
        validate(bad)
    bad = copy.deepcopy(params)
    bad["md"]["timestep"] = 1
    with pytest.raises(ParamsError, match="unknown key md.timestep"):
        validate(bad)


def test_temperatures_keep_their_spelling_and_name_their_folders(params):
    from crmse.artifacts import RunPaths, temperature_folder

    p = copy.deepcopy(params)
    p["md"]["temperatures"] = ["auto", 500, 612.5]
    assert validate(p)["md"]["temperatures"] == ["auto", 500, 612.5]
    assert [temperature_folder(t) for t in validate(p)["md"]["temperatures"]] == ["Tauto", "T500", "T612.5"]
    # dvc.yaml interpolates the same text: results/<run>/T${item.temperature}/<arm>
    assert str(RunPaths("ethanol", 200, 0).samples_dir(500, "mse")) == "results/ethanol/n200/s0/T500/mse"
    p["crmse"]["chains"]["temperature"] = 500
    assert validate(p)["crmse"]["chains"]["temperature"] == 500.0


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
    p["per_molecule"] = {"ethanol": {}, "aspirin": {"md": {"n_replicas": 7}, "crmse": {"chains": {"n": 5}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(p))
    base = load_params(tmp_path / "params.yaml")
    asp = load_params(tmp_path / "params.yaml", molecule="aspirin")
    eth = load_params(tmp_path / "params.yaml", molecule="ethanol")
    assert (asp["md"]["n_replicas"], asp["crmse"]["chains"]["n"]) == (7, 5)
    assert asp["crmse"]["chains"]["dt"] == base["crmse"]["chains"]["dt"]  # nested keys merge, not replace
    assert eth["md"] == base["md"] and eth["crmse"] == base["crmse"]
    assert asp["md"]["dt"] == base["md"]["dt"]  # keys the override leaves alone keep the shared value


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"md": {"n_replicas": 0}}, r"md.n_replicas = 0.*>= 1"),
        ({"md": {"replicas": 3}}, r"unknown key per_molecule.aspirin.md.replicas"),
        ({"seeds": [1]}, r"per_molecule.aspirin.seeds cannot be set per molecule"),
        ({"arms": ["mse"]}, r"per_molecule.aspirin.arms cannot be set per molecule"),
        ({"md": {"temperatures": [500]}}, r"per_molecule.aspirin.md.temperatures cannot be set per molecule"),
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


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        (("md", "trajectory_replica"), 64, r"md.trajectory_replica = 64 must be < md.n_replicas = 64"),
        (("md", "production_ps"), 0.005, r"md.production_ps = 0.005 is 10 steps.*shorter than one save interval"),
        (("crmse", "selection", "every"), 5000, r"crmse.selection.every = 5000 exceeds crmse.iterations"),
    ],
)
def test_rules_between_keys_fail_before_any_stage(params, path, value, message):
    with pytest.raises(ParamsError, match=message):
        validate(_with(params, path, value))


def test_a_rule_broken_only_by_a_per_molecule_override_is_caught(params):
    bad = copy.deepcopy(params)
    bad["per_molecule"]["aspirin"] = {"md": {"n_replicas": 4}}
    bad["md"]["trajectory_replica"] = 10
    with pytest.raises(ParamsError, match=r"with per_molecule.aspirin: md.trajectory_replica = 10 must be < md.n_"):
        validate(bad)
