"""Loading one report: a run (molecule, training size, seed) at one temperature setting, every arm.

Reads only tables the other stages wrote (paths from :class:`crmse.artifacts.RunPaths`):
``metrics/<run>/<T>/<arm>/`` (metrics.json, replicas.csv, worst_frame.json, plots/, audit.json,
audit_frames.csv), ``metrics/<run>/<T>/reference/`` (metrics.json, plots/), ``models/<run>/``
(``<arm>_metrics.json``, ``<arm>_log.csv``, ``<arm>_val.csv``) and params.yaml.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crmse.artifacts import POSTTRAINED, RunPaths, temperature_folder
from crmse.io import read_json
from crmse.molecules import TORSIONS, Torsion


class ReportError(ValueError):
    """An input of the report is missing or malformed."""


@dataclass
class RunData:
    """Everything one report reads, loaded once. ``arms`` in params order; dicts keyed by arm."""

    paths: RunPaths
    temperature: str  # the setting as written in params.yaml: "auto" or K
    arms: tuple[str, ...]
    params: dict[str, Any]
    rows: dict[str, dict[str, Any]]  # metrics/<run>/<T>/<arm>/metrics.json
    reference: dict[str, Any]
    noise_floor: dict[str, Any]
    train: dict[str, dict[str, Any]]  # models/<run>/<arm>_metrics.json (mse always)
    logs: dict[str, pd.DataFrame]  # models/<run>/<arm>_log.csv (mse: per epoch, others: per iteration)
    val: dict[str, pd.DataFrame]  # models/<run>/<arm>_val.csv of the post-trained arms
    replicas: dict[str, pd.DataFrame]
    worst: dict[str, dict[str, Any]]
    audit: dict[str, dict[str, Any]] = field(default_factory=dict)  # arms with an audit.json
    audit_frames: dict[str, pd.DataFrame] = field(default_factory=dict)
    _curves: dict[str, pd.DataFrame | None] = field(default_factory=dict, repr=False)

    @property
    def molecule(self) -> str:
        return self.paths.molecule

    @property
    def torsions(self) -> tuple[Torsion, ...]:
        return TORSIONS[self.molecule]

    @property
    def posttrained(self) -> tuple[str, ...]:
        """The arms made by post-training (they have chain logs and validation logs)."""
        return tuple(a for a in self.arms if a in POSTTRAINED)

    @property
    def title(self) -> str:
        T = "auto (the data's configurational temperature)" if self.temperature == "auto" else f"{self.temperature} K"
        return f"{self.molecule}, n_train = {self.paths.size}, seed {self.paths.seed}, sampled at T = {T}"

    def n_replicas(self, arm: str) -> int:
        return int(self.rows[arm].get("n_replicas") or len(self.replicas[arm]))

    def curve(self, source: str, kind: str, name: str | None = None) -> pd.DataFrame | None:
        """Plot table ``plots/<kind>/<name>.csv`` of an arm or of ``reference`` (None when absent)."""
        name = name or source
        key = f"{source}/{kind}/{name}"
        if key not in self._curves:
            path = self.paths.metrics_dir(self.temperature, source) / "plots" / kind / f"{name}.csv"
            self._curves[key] = pd.read_csv(path) if path.exists() else None
        return self._curves[key]


def required_inputs(paths: RunPaths, temperature: Any, arms: tuple[str, ...]) -> list[Path]:
    """Every file a report of these arms needs (audit files are optional: the audit may be skipped)."""
    need = [paths.reference_dir(temperature) / "metrics.json", paths.train_metrics("mse"), paths.train_log("mse")]
    for arm in arms:
        d = paths.metrics_dir(temperature, arm)
        need += [d / "metrics.json", d / "replicas.csv", d / "worst_frame.json"]
        if arm in POSTTRAINED:
            need += [paths.train_metrics(arm), paths.train_log(arm), paths.val_log(arm)]
    return need


def _read_csv(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    if df.empty:
        raise ReportError(f"{path} has no rows")
    return df


def _single_model(audit: dict[str, Any], arm: str) -> dict[str, Any]:
    """The one model entry of an arm's audit.json (``models.<arm>``, or its only entry)."""
    models = audit.get("models") or {}
    if arm in models:
        return models[arm]
    return next(iter(models.values())) if len(models) == 1 else {}


def load_run(root: str | os.PathLike, molecule: str, size: int, seed: int, temperature: Any = "auto",
             params: dict[str, Any] | None = None) -> RunData:
    """Load one report's inputs; raise :class:`ReportError` naming every missing file at once.

    ``params`` (validated, molecule overrides merged) defaults to ``<root>/params.yaml``.
    """
    root = Path(root)
    if molecule not in TORSIONS:
        raise ReportError(f"unknown molecule {molecule!r}; known: {', '.join(sorted(TORSIONS))}")
    if params is None:
        from crmse.params import load_params

        if not (root / "params.yaml").exists():
            raise ReportError(f"report: missing inputs: {root / 'params.yaml'}")
        params = load_params(root / "params.yaml", molecule=molecule)
    paths = RunPaths(molecule, int(size), int(seed), root)
    T = str(temperature)
    arms = tuple(params["arms"])
    missing = [p for p in required_inputs(paths, T, arms) if not p.exists()]
    if missing:
        rel = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in missing]
        raise ReportError(f"report {molecule} n{size} s{seed} {temperature_folder(T)}: missing inputs (run the "
                          f"stages before `report`): " + ", ".join(rel))
    ref = read_json(paths.reference_dir(T) / "metrics.json")
    for key in ("reference", "noise_floor"):
        if key not in ref:
            raise ReportError(f"{paths.reference_dir(T) / 'metrics.json'}: no section {key!r}")
    run = RunData(
        paths=paths, temperature=T, arms=arms, params=params,
        rows={a: read_json(paths.metrics_dir(T, a) / "metrics.json") for a in arms},
        reference=ref["reference"], noise_floor=ref["noise_floor"],
        train={a: read_json(paths.train_metrics(a)) for a in ("mse", *(a for a in arms if a in POSTTRAINED))},
        logs={a: _read_csv(paths.train_log(a)) for a in ("mse", *(a for a in arms if a in POSTTRAINED))},
        val={a: _read_csv(paths.val_log(a)) for a in arms if a in POSTTRAINED},
        replicas={a: pd.read_csv(paths.metrics_dir(T, a) / "replicas.csv") for a in arms},
        worst={a: read_json(paths.metrics_dir(T, a) / "worst_frame.json") for a in arms},
    )
    for a in arms:
        d = paths.metrics_dir(T, a)
        if (d / "audit.json").exists():
            run.audit[a] = read_json(d / "audit.json")
            if not run.audit[a].get("skipped") and (d / "audit_frames.csv").exists():
                frames = pd.read_csv(d / "audit_frames.csv")
                if not frames.empty:
                    run.audit_frames[a] = frames.assign(model=a)
    return run


def audited(run: RunData) -> list[str]:
    """The arms whose audit ran (an audit.json that is not ``skipped``)."""
    return [a for a in run.arms if a in run.audit and not run.audit[a].get("skipped")]


def audit_model(run: RunData, arm: str) -> dict[str, Any]:
    """The arm's model entry of its audit.json ({} when absent or skipped)."""
    a = run.audit.get(arm)
    return _single_model(a, arm) if a and not a.get("skipped") else {}


def _stats(x: np.ndarray) -> dict[str, Any]:
    x = x[np.isfinite(x)]
    return {"n": int(len(x)), "mean": float(x.mean()) if len(x) else None,
            "sd": float(x.std(ddof=1)) if len(x) > 1 else None}


def audit_errors(audit: dict[str, Any] | None, frames: pd.DataFrame | None, arm: str) -> dict[str, dict[str, Any]]:
    """|E_model − E_DFT| (kcal/mol) of an arm's audited frames: mean, sample sd and n per group.

    Groups: ``random`` = randomly chosen sampled frames the detector does not flag; ``flagged`` = every
    audited frame it flags (reported apart); ``reference`` = pool frames (the floor). From audit_frames.csv
    when present, else the means of audit.json (no sd). {} when the audit is absent or skipped.
    """
    if not audit or audit.get("skipped"):
        return {}
    if frames is not None and {"kind", "status", "model_minus_dft", "spurious"} <= set(frames.columns):
        ok = frames[frames["status"].astype(str) == "ok"]
        err = ok["model_minus_dft"].astype(float).abs().to_numpy()
        flag = ok["spurious"].astype(str).str.lower().isin(("true", "1")).to_numpy()
        kind = ok["kind"].astype(str).to_numpy()
        return {"random": _stats(err[(kind == "random") & ~flag]),
                "flagged": _stats(err[flag & (kind != "reference")]),
                "reference": _stats(err[kind == "reference"])}
    m = _single_model(audit, arm)
    rnd, sp = m.get("random") or {}, m.get("spurious") or {}
    return {"random": {"n": rnd.get("n"), "mean": rnd.get("energy_mae"), "sd": None},
            "flagged": {"n": sp.get("n"), "mean": sp.get("energy_mae"), "sd": None},
            "reference": {"n": None, "mean": m.get("reference_energy_mae"), "sd": None}}

