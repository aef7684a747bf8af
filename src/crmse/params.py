"""Load ``params.yaml`` and validate it against one schema, before any work.

Every error names the key, the bad value and what is allowed. Stages call
:func:`load_params` and read plain dicts; nothing else parses params.yaml.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crmse.molecules import ATOMIC_NUMBERS

# The arms (crmse.artifacts.ARMS), CRMSE checkpoint-selection rules and hole-gradient projections
# (crmse.contrastive implements them); here so that validating params needs no torch.
ARMS = ("mse", "crmse", "crmse_memory")
SELECTION_RULES = ("fewest_chain_failures", "best_val_forces", "last")
PROJECTIONS = ("off", "fit", "fit_and_energy")


class ParamsError(ValueError):
    """params.yaml is missing a key, has an unknown key or a value out of range."""


@dataclass(frozen=True)
class Field:
    kind: str  # int | float | str | bool | temperature | list[int] | list[str] | list[temperature]
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    lo_open: bool = False  # lo itself is not allowed

    def describe(self) -> str:
        if self.choices:
            return "one of " + ", ".join(map(repr, self.choices))
        bounds = []
        if self.lo is not None:
            bounds.append(f"{'>' if self.lo_open else '>='} {self.lo}")
        if self.hi is not None:
            bounds.append(f"<= {self.hi}")
        what = {"temperature": "a temperature in K or 'auto'"}.get(self.kind, self.kind)
        return what + (" " + " and ".join(bounds) if bounds else "")


def _pos(kind: str = "float") -> Field:
    return Field(kind, 0, lo_open=True)


def _nonneg(kind: str = "int") -> Field:
    return Field(kind, 0)


def _prob() -> Field:
    return Field("float", 0, 1)


TEMPERATURE = Field("temperature", 0, 100000, lo_open=True)

SCHEMA: dict[str, Any] = {
    "molecules": Field("list[str]", choices=tuple(sorted(ATOMIC_NUMBERS))),
    "train_sizes": Field("list[int]", 1),
    "seeds": Field("list[int]", 0),
    "device": Field("str", choices=("auto", "cpu", "cuda")),
    "torch_threads": _nonneg(),
    "data": {
        "variant": Field("str", choices=("md17", "rmd17")),
        "url": Field("str"),
        "retries": _nonneg(),
        "timeout_s": _pos(),
    },
    "split": {
        "n_val": Field("int", 1),
        "n_test": Field("int", 1),
        "max_reference": Field("int", 100),
    },
    "model": {
        "n_atom_basis": Field("int", 1),
        "n_filters": Field("int", 1),
        "n_interactions": Field("int", 1),
        "n_rbf": Field("int", 1),
        "cutoff": _pos(),
        "dtype": Field("str", choices=("float32", "float64")),
    },
    "mse": {
        "rho_energy": _nonneg("float"),
        "rho_forces": _nonneg("float"),
        "batch_size": Field("int", 1),
        "lr": _pos(),
        "lr_factor": Field("float", 0, 1, lo_open=True),
        "lr_patience": Field("int", 1),
        "min_lr": _pos(),
        "max_epochs": Field("int", 1),
        "max_steps": Field("int", 1),
        "max_minutes": _pos(),
        "early_stopping_patience": Field("int", 1),
        "grad_clip": _pos(),
    },
    "arms": Field("list[str]", choices=ARMS),
    "crmse": {
        "lam": _nonneg("float"),
        "iterations": Field("int", 1),
        "lr": _pos(),
        "batch_size": Field("int", 1),
        "rho_energy": _nonneg("float"),
        "rho_forces": _nonneg("float"),
        "grad_clip": _pos(),
        "ema_decay": Field("float", 0.0, 0.9999),
        "chains": {
            "n": Field("int", 1),
            "steps_per_iter": Field("int", 1),
            "temperature": TEMPERATURE,
            "dt": _pos(),
            "friction": _nonneg("float"),
            "p_reset": _prob(),
        },
        "selection": {
            "rule": Field("str", choices=SELECTION_RULES),
            "every": Field("int", 1),
            "after": _prob(),
            "max_gap": _pos(),
            "max_energy_rise": _nonneg("float"),
        },
    },
    "crmse_memory": {
        "slots": Field("int", 1),
        "weight": _nonneg("float"),
        "scouts": {
            "n": _nonneg(),
            "temperature_ratio": Field("float", 1.0),
        },
        "projection": Field("str", choices=PROJECTIONS),
    },
    "md": {
        "temperatures": Field("list[temperature]", 0, 100000, lo_open=True),
        "auto_temperature_frames": Field("int", 2),
        "auto_temperature_bounds": Field("list[float]", 0, lo_open=True),
        "dt": _pos(),
        "friction": _nonneg("float"),
        "n_replicas": Field("int", 1),
        "equilibration_fs": _nonneg("float"),
        "production_ps": _pos(),
        "save_every": Field("int", 1),
        "chunk_frames": Field("int", 1),
        "trajectory_replica": _nonneg(),
        "skin": _nonneg("float"),
        "conf_temperature_frames": _nonneg(),
    },
    "evaluate": {
        "bond_factor": _pos(),
        "bond_tolerance": _pos(),
        "spurious_energy_margin": _nonneg("float"),
        "spurious_distance_margin": _nonneg("float"),
        "energy_bins": Field("int", 2),
        "dihedral_bins": Field("int", 4),
        "noise_blocks": Field("int", 2),
        "bootstrap_draws": _nonneg(),
        "conf_temperature_frames": Field("int", 1),
        "batch_size": Field("int", 1),
    },
    "audit": {
        "molecules": Field("list[str]", choices=tuple(sorted(ATOMIC_NUMBERS))),
        "n_lowest": _nonneg(),
        "n_spurious": _nonneg(),
        "n_random": _nonneg(),
        "n_reference": Field("int", 2),
        "xc": Field("str"),
        "basis": Field("str"),
        "max_cycle": Field("int", 1),
        "conv_tol": _pos(),
        "density_fit": Field("bool"),
        "grid_level": Field("int", 0, 9),
        "soscf_fallback": Field("bool"),
        "threads": Field("int", 1),
    },
}


def _check(key: str, value: Any, field: Field) -> Any:
    def fail(msg: str = "") -> ParamsError:
        why = f": {msg}" if msg else ""
        return ParamsError(f"params: {key} = {value!r} is invalid{why}; allowed: {field.describe()}")

    kind = field.kind
    if kind.startswith("list["):
        inner = Field(kind[5:-1], field.lo, field.hi, field.choices, field.lo_open)
        if not isinstance(value, list) or not value:
            raise fail("expected a non-empty list")
        if len(set(map(str, value))) != len(value):
            raise fail("duplicate entries")
        checked = [_check(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
        # Temperature settings name output folders (T500, Tauto) as written, as dvc.yaml does: keep them raw.
        return list(value) if inner.kind == "temperature" else checked
    if kind == "temperature" and value == "auto":
        return value
    if kind == "bool":
        if not isinstance(value, bool):
            raise fail()
        return value
    if kind == "str":
        if not isinstance(value, str):
            raise fail()
        if field.choices and value not in field.choices:
            raise fail()
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise fail()
    if kind == "int":
        if isinstance(value, float):
            raise fail("expected an integer")
    elif not math.isfinite(value):
        raise fail()
    if field.lo is not None and (value < field.lo or (field.lo_open and value == field.lo)):
        raise fail()
    if field.hi is not None and value > field.hi:
        raise fail()
    return float(value) if kind in ("float", "temperature") else value


def _validate_sections(params: dict[str, Any], schema: dict[str, Any] = SCHEMA, prefix: str = "") -> dict[str, Any]:
    """A validated copy of ``params`` against ``schema`` (no ``per_molecule``)."""
    if not isinstance(params, dict):
        raise ParamsError(f"params: {prefix or 'top level'} must be a mapping, got {type(params).__name__}")
    unknown = sorted(set(params) - set(schema))
    if unknown:
        raise ParamsError(f"params: unknown key {prefix}{unknown[0]}; known keys here: {', '.join(schema)}")
    out: dict[str, Any] = {}
    for name, spec in schema.items():
        key = prefix + name
        if name not in params:
            raise ParamsError(f"params: missing key {key}")
        if isinstance(spec, dict):
            out[name] = _validate_sections(params[name], spec, key + ".")
        else:
            out[name] = _check(key, params[name], spec)
    if not prefix:
        _check_across(out)
    return out


def _check_across(p: dict[str, Any]) -> None:
    """Rules between keys, checked before any stage runs (not hours into one)."""
    md = p["md"]
    bounds = md["auto_temperature_bounds"]
    if len(bounds) != 2 or bounds[0] >= bounds[1]:
        raise ParamsError(f"params: md.auto_temperature_bounds = {bounds} must be [low, high] K with low < high")
    if md["trajectory_replica"] >= md["n_replicas"]:
        raise ParamsError(f"params: md.trajectory_replica = {md['trajectory_replica']} must be < md.n_replicas "
                          f"= {md['n_replicas']} (replicas are numbered from 0)")
    steps = md["production_ps"] * 1000.0 / md["dt"]
    if steps < md["save_every"]:
        raise ParamsError(f"params: md.production_ps = {md['production_ps']} is {steps:.0f} steps of md.dt = "
                          f"{md['dt']} fs, shorter than one save interval (md.save_every = {md['save_every']})")
    c = p["crmse"]
    if c["selection"]["every"] > c["iterations"]:
        raise ParamsError(f"params: crmse.selection.every = {c['selection']['every']} exceeds crmse.iterations = "
                          f"{c['iterations']}: no checkpoint would be validated before the end")


def check_sizes(params: dict[str, Any], n_frames: dict[str, int]) -> None:
    """Raise if a training size plus val and test sets exceeds a molecule's frame count."""
    n_val, n_test = params["split"]["n_val"], params["split"]["n_test"]
    for mol, n in n_frames.items():
        for size in params["train_sizes"]:
            if size + n_val + n_test > n:
                raise ParamsError(
                    f"params: train_sizes contains {size}, but {mol} has only {n} frames: "
                    f"n_train + split.n_val + split.n_test = {size} + {n_val} + {n_test} must be <= {n}"
                )


#: Keys a per-molecule override cannot change (they define the pipeline's branches).
PER_RUN_EXCLUDED = ("molecules", "train_sizes", "seeds", "arms", "md.temperatures")


def _check_override(override: Any, schema: dict[str, Any], prefix: str) -> None:
    """Every key of an override must exist in the schema (values are checked after merging)."""
    if not isinstance(override, dict):
        raise ParamsError(f"params: {prefix.rstrip('.')} must be a mapping, got {type(override).__name__}")
    for key, value in override.items():
        if key not in schema:
            raise ParamsError(f"params: unknown key {prefix}{key}; known keys here: {', '.join(schema)}")
        if isinstance(schema[key], dict):
            _check_override(value, schema[key], f"{prefix}{key}.")


def _has_key(tree: dict[str, Any], dotted: str) -> bool:
    head, _, rest = dotted.partition(".")
    if head not in tree:
        return False
    return not rest or (isinstance(tree[head], dict) and _has_key(tree[head], rest))


def validate(params: dict[str, Any]) -> dict[str, Any]:
    """Return a validated copy of ``params`` (all sections, and each ``per_molecule`` override merged for
    its molecule); raise :class:`ParamsError` on the first problem."""
    if not isinstance(params, dict):
        raise ParamsError(f"params: top level must be a mapping, got {type(params).__name__}")
    overrides = params.get("per_molecule") or {}
    if not isinstance(overrides, dict):
        raise ParamsError(f"params: per_molecule must be a mapping of molecule -> overrides, got {overrides!r}")
    base = {k: v for k, v in params.items() if k != "per_molecule"}
    out = _validate_sections(base)
    for mol, override in overrides.items():
        if mol not in ATOMIC_NUMBERS:
            raise ParamsError(f"params: per_molecule.{mol}: unknown molecule; allowed: {', '.join(ATOMIC_NUMBERS)}")
        override = override or {}
        _check_override(override, SCHEMA, f"per_molecule.{mol}.")
        fixed = sorted(k for k in PER_RUN_EXCLUDED if _has_key(override, k))
        if fixed:
            raise ParamsError(f"params: per_molecule.{mol}.{fixed[0]} cannot be set per molecule")
        try:
            _validate_sections(deep_merge(base, override))
        except ParamsError as exc:
            raise ParamsError(f"params: with per_molecule.{mol}: {str(exc).removeprefix('params: ')}") from None
    missing = [mol for mol in out["molecules"] if mol not in overrides]
    if missing:
        # dvc.yaml declares per_molecule.<molecule> as a parameter of every per-run stage.
        raise ParamsError(f"params: per_molecule has no entry for {missing[0]} (add `{missing[0]}: {{}}` for none)")
    out["per_molecule"] = {mol: dict(o or {}) for mol, o in overrides.items()}
    return out


def for_molecule(params: dict[str, Any], molecule: str) -> dict[str, Any]:
    """The parameters of one molecule's stages: ``per_molecule[molecule]`` merged over the sections."""
    override = params.get("per_molecule", {}).get(molecule, {})
    merged = deep_merge({k: v for k, v in params.items() if k != "per_molecule"}, override)
    return {**_validate_sections(merged), "per_molecule": params.get("per_molecule", {})}


def load_params(path: str | os.PathLike = "params.yaml", molecule: str | None = None) -> dict[str, Any]:
    """Read and validate params.yaml (raises :class:`ParamsError` naming the key).

    With ``molecule``, that molecule's ``per_molecule`` overrides are merged in (see :func:`for_molecule`).
    """
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params: {path} not found (run from the repository root)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"params: {path} is not valid YAML: {exc}") from exc
    params = validate(raw)
    return for_molecule(params, molecule) if molecule is not None else params


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` merged in, recursively (for presets)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out
