"""The `reference` and `evaluate` stages: every observable of docs/method.md, per arm and temperature.

:func:`evaluate_reference` (one run, one temperature setting) describes the DFT reference pool:
thresholds of the spurious-state detector, the pool's distributions and their noise floor (the same
metrics between two halves of the pool). :func:`evaluate_arm` (one run, temperature, arm) compares one
arm's samples with the pool and measures its test accuracy. Paths come from :class:`crmse.artifacts.RunPaths`:

* ``metrics/<run>/<T>/reference/`` — ``metrics.json`` (sections ``reference``, ``noise_floor``) and
  ``plots/{hr,energy,dihedral}/…reference.csv``;
* ``metrics/<run>/<T>/<arm>/`` — ``metrics.json`` (the arm's flat row), ``replicas.csv`` (one row per
  replica: first spurious entry, lowest energy, closest non-bonded contact, instability, time in spurious
  states), ``worst_frame.json`` (the lowest-energy valid frame, for the report's picture) and ``plots/``:
  ``hr/<arm>.csv`` (r_A, h), ``energy/<arm>.csv`` (energy_rel_kcal_mol = E − ⟨E_DFT⟩ of the pool, density),
  ``dihedral/<torsion>_<arm>.csv`` (phi_deg, F_kcal_mol; unvisited bins omitted),
  ``parity/{energy,forces}_<arm>.csv`` (dft, model) and ``stability/<arm>.csv`` (time_ps, stable_fraction).

Every F(φ) curve at one temperature setting uses the resolved temperature of that setting, so F(φ)
differences are differences of ln p(φ) in kcal/mol. The samples' configurational temperature comes
from the sample stage's sample.json (the Laplacian costs 3n backward passes per frame).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from crmse.artifacts import (
    ArtifactError,
    ReferenceMonitors,
    RunPaths,
    Samples,
    load_samples,
    load_split,
    resolve_temperature,
    valid_frames,
)
from crmse.data import Frames
from crmse.io import atomic_path, read_json, write_json
from crmse.molecules import TORSIONS, check_molecule
from crmse.observables import (
    HR_EDGES,
    Distributions,
    compare,
    dihedral_edges,
    distributions,
    energy_edges,
    energy_histogram,
    evenly_spaced,
    kinetic_temperature,
    noise_floor,
    replica_bootstrap,
    stability_summary,
    stable_fraction_curve,
)

PARITY_MAX_FORCES = 5000
REPLICA_COLUMNS = ("replica", "first_spurious_ps", "lowest_energy_rel_dft_min", "min_nonbonded_distance_A",
                   "first_unstable_ps", "spurious_frame_fraction")


class EvaluateError(ArtifactError):
    """An input of the evaluate stage is missing or inconsistent."""


def _model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    p = next(model.parameters())
    return p.dtype, p.device


def predict(model: Any, R: np.ndarray, batch_size: int = 100, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Model energies (N,) kcal/mol and forces (N, n, 3) kcal/mol/Å of frames R (N, n, 3), in batches."""
    dtype, device = _model_dtype_device(model)
    Es, Fs = [], []
    for s in tqdm(range(0, len(R), batch_size), desc="predict", disable=not progress, leave=False):
        Rb = torch.as_tensor(np.asarray(R[s : s + batch_size]), dtype=dtype, device=device)
        E, F = model.energy_and_forces(Rb)
        Es.append(E.detach().double().cpu().numpy())
        Fs.append(F.detach().double().cpu().numpy())
    return np.concatenate(Es), np.concatenate(Fs)


def conf_temperature(
    model: Any, R: np.ndarray, F: np.ndarray | None, n_frames: int, batch_size: int, progress: bool = False
) -> float | None:
    """T_conf (K) on at most ``n_frames`` evenly spaced frames (``crmse.temperature``); None if undefined.

    ``F`` (DFT forces) replaces the model's forces in the numerator when given.
    """
    from crmse.temperature import frames_temperature

    if len(R) == 0:
        return None
    sel = evenly_spaced(len(R), n_frames)
    dtype, device = _model_dtype_device(model)
    try:
        return float(
            frames_temperature(
                model.energy, R[sel], None if F is None else F[sel], batch_size, device, dtype, progress=progress
            )
        )
    except ValueError as exc:  # e.g. a Laplacian ≤ 0 on a broken surface: report, do not crash
        print(f"warning: configurational temperature undefined: {exc}")
        return None


def samples_conf_temperature(
    sample_json: Path, model: Any, R_valid: np.ndarray, ev: dict[str, Any], progress: bool = False
) -> tuple[float | None, int]:
    """(T_conf K, frames used) of a model's samples: from the sample stage's sample.json, else computed."""
    if sample_json.exists():
        info = read_json(sample_json)
        if info.get("T_conf_samples_K") is not None:
            return float(info["T_conf_samples_K"]), int(info.get("T_conf_frames", 0))
    n = min(len(R_valid), ev["conf_temperature_frames"])
    return conf_temperature(model, R_valid, None, n, ev["batch_size"], progress), n


def _write_csv(path: Path, header: list[str], rows: Any) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(header)
            for row in rows:
                w.writerow([f"{v:.8g}" for v in row])


def _write_distribution_plots(plots: Path, source: str, dist: Distributions, e_edges: np.ndarray, e_ref: float) -> None:
    """h(r), energy histogram (relative to ``e_ref``) and F(φ) tables of one source."""
    r = 0.5 * (HR_EDGES[1:] + HR_EDGES[:-1])
    _write_csv(plots / "hr" / f"{source}.csv", ["r_A", "h"], zip(r, dist.hr, strict=True))
    centres = 0.5 * (e_edges[1:] + e_edges[:-1]) - e_ref
    _write_csv(
        plots / "energy" / f"{source}.csv",
        ["energy_rel_kcal_mol", "density"],
        zip(centres, energy_histogram(dist.energies, e_edges), strict=True),
    )
    for name, F in dist.free_energy.items():
        edges = dihedral_edges(len(F))
        phi = 0.5 * (edges[1:] + edges[:-1])
        ok = np.isfinite(F)
        _write_csv(
            plots / "dihedral" / f"{name}_{source}.csv", ["phi_deg", "F_kcal_mol"], zip(phi[ok], F[ok], strict=True)
        )


def sample_observables(
    s: Samples,
    mon: ReferenceMonitors,
    ref: Distributions,
    torsions: Any,
    ev: dict[str, Any],
    temperature: float,
) -> tuple[dict[str, Any], Distributions | None, np.ndarray, np.ndarray]:
    """Stability, spurious-state occupancy, T_kin and distribution metrics of one model's samples.

    Returns (metrics row, the samples' distributions or None when no frame is valid, first unstable
    frame per replica (M,), valid-frame mask (T, M)). Only frames before instability count.
    """
    uf, valid = valid_frames(s, mon.bonds, ev["bond_tolerance"])
    row: dict[str, Any] = dict(stability_summary(uf, s.time_ps))
    row["n_replicas"] = int(s.R.shape[1])
    row["n_valid_frames"] = int(valid.sum())
    row.update(mon.detector.summary(s.R, s.E, valid, s.time_ps))
    row["T_set"] = s.temperature
    row["T_kin"] = kinetic_temperature(s.T_kin, valid)
    if valid.any():
        sim = distributions(s.R[valid], s.E[valid], torsions, ev["dihedral_bins"], temperature)
        row.update(compare(sim, ref))
        row.update(replica_bootstrap(s.R, s.E, valid, ref, torsions, ev["dihedral_bins"], temperature,
                                     ev["bootstrap_draws"]))
    else:  # every replica failed before its first saved frame: nothing to compare (same keys, null)
        sim = None
        row.update(dict.fromkeys(compare(ref, ref)))
        row.update(replica_bootstrap(s.R, s.E, valid, ref, torsions, ev["dihedral_bins"], temperature, 0))
    return row, sim, uf, valid


def _reference_inputs(paths: RunPaths, temperature: Any, ev: dict[str, Any]) -> tuple[Frames, ReferenceMonitors, float]:
    """The pool, its monitors and the F(φ) temperature (K) of a temperature setting."""
    check_molecule(paths.molecule)
    pool = load_split(paths.split("reference"))
    return pool, ReferenceMonitors.from_pool(pool, ev), resolve_temperature(temperature, paths)


def evaluate_reference(paths: RunPaths, temperature: Any, params: dict[str, Any]) -> dict[str, Any]:
    """Write the reference pool's metrics.json and plot tables for one temperature setting; return the metrics."""
    ev = params["evaluate"]
    pool, mon, T_phi = _reference_inputs(paths, temperature, ev)
    torsions, bins = TORSIONS[paths.molecule], ev["dihedral_bins"]
    print(f"reference {paths.rel} {temperature}: {len(pool)} pool frames, F(φ) at {T_phi:.1f} K")
    ref = distributions(pool.R, pool.E, torsions, bins, T_phi)
    det = mon.detector
    reference = {
        "n_frames": len(pool),
        "energy_min": float(pool.E.min()),
        "energy_mean": float(pool.E.mean()),
        "energy_std": float(pool.E.std()),
        "max_bond_deviation": float(mon.bonds.max_deviation(pool.R).max()),
        "min_nonbonded_distance": det.distance_min,
        "spurious_distance_threshold": det.distance_threshold,
        "spurious_energy_threshold_rel_dft_min": -det.energy_margin,
        "dihedral_temperature": T_phi,
    }
    floor = noise_floor(pool.R, pool.E, pool.md17_index, torsions, ev["noise_blocks"], bins, T_phi)
    floor["n_blocks"] = ev["noise_blocks"]
    out = paths.reference_dir(temperature)
    plots = _fresh_plots(out)
    _write_distribution_plots(plots, "reference", ref, energy_edges(ref.energies, [], ev["energy_bins"]),
                              float(pool.E.mean()))
    metrics = {"reference": reference, "noise_floor": floor}
    write_json(out / "metrics.json", metrics)
    return metrics


def evaluate_arm(
    paths: RunPaths,
    temperature: Any,
    arm: str,
    params: dict[str, Any],
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, Any]:
    """Compute and write one arm's metrics.json, replicas.csv, worst_frame.json and plot tables; return the row."""
    from crmse.model import load_checkpoint

    ev = params["evaluate"]
    ckpt = paths.checkpoint(arm)
    sample_dir = paths.samples_dir(temperature, arm)
    # Fail early, naming every missing input at once.
    needed = [paths.split("test"), paths.split("reference"), ckpt, sample_dir / "samples.npz"]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise EvaluateError("evaluate: missing inputs: " + ", ".join(missing))
    pool, mon, T_phi = _reference_inputs(paths, temperature, ev)
    test = load_split(paths.split("test"))
    s = load_samples(sample_dir / "samples.npz", z=pool.z)
    torsions, bins = TORSIONS[paths.molecule], ev["dihedral_bins"]
    ref = distributions(pool.R, pool.E, torsions, bins, T_phi)

    model, _meta = load_checkpoint(ckpt, device=device, expected_z=pool.z)
    model.eval()
    print(f"evaluate {paths.rel} {temperature} {arm}: test accuracy, stability, spurious states, distributions")
    E_pred, F_pred = predict(model, test.R, ev["batch_size"], progress)
    row: dict[str, Any] = {
        "test_energy_mae": float(np.abs(E_pred - test.E).mean()),
        "test_forces_mae": float(np.abs(F_pred - test.F).mean()),
    }
    sampled, sim, uf, valid = sample_observables(s, mon, ref, torsions, ev, T_phi)
    row.update(sampled)
    row["T_conf"], row["T_conf_frames"] = samples_conf_temperature(
        sample_dir / "sample.json", model, s.R[valid], ev, progress
    )
    # DFT forces in the numerator, this model's Laplacian: the temperature this surface assigns to the data
    row["T_conf_pool_laplacian"] = conf_temperature(
        model, pool.R, pool.F, ev["conf_temperature_frames"], ev["batch_size"], progress
    )
    if sim is None:
        print(f"warning: [{arm}] no valid frames; distribution metrics are undefined")

    out = paths.metrics_dir(temperature, arm)
    plots = _fresh_plots(out)
    if sim is not None:
        edges = energy_edges(ref.energies, [sim.energies], ev["energy_bins"])
        _write_distribution_plots(plots, arm, sim, edges, float(pool.E.mean()))
    et = float(test.E.mean())
    _write_csv(plots / "parity" / f"energy_{arm}.csv", ["dft", "model"], zip(test.E - et, E_pred - et, strict=True))
    f_dft, f_model = test.F.reshape(-1), F_pred.reshape(-1)
    sel = evenly_spaced(len(f_dft), PARITY_MAX_FORCES)
    _write_csv(plots / "parity" / f"forces_{arm}.csv", ["dft", "model"], zip(f_dft[sel], f_model[sel], strict=True))
    frac = stable_fraction_curve(uf, len(s.time_ps))
    _write_csv(plots / "stability" / f"{arm}.csv", ["time_ps", "stable_fraction"], zip(s.time_ps, frac, strict=True))
    replicas, worst = replica_table(s, mon, uf, valid)
    _write_csv(out / "replicas.csv", list(REPLICA_COLUMNS), replicas)
    write_json(out / "worst_frame.json", worst)
    write_json(out / "metrics.json", row)  # last: its presence marks a complete evaluation
    return row


def replica_table(
    s: Samples, mon: ReferenceMonitors, uf: np.ndarray, valid: np.ndarray
) -> tuple[list[tuple[float, ...]], dict[str, Any]]:
    """Per-replica spurious-state facts (rows of :data:`REPLICA_COLUMNS`) and the lowest-energy valid frame.

    Energies are relative to the pool's DFT minimum (kcal/mol), distances in Å, times in ps (NaN: never).
    """
    det = mon.detector
    spur = det(s.R, s.E) & valid
    entered = spur.any(0)
    first = np.where(entered, s.time_ps[spur.argmax(0)], np.nan)
    E_rel = np.where(valid, s.E - det.energy_min, np.inf)
    lowest = np.where(valid.any(0), E_rel.min(0), np.nan)
    dist = np.where(valid, det.min_nonbonded_distance(s.R), np.inf)
    closest = np.where(valid.any(0), dist.min(0), np.nan)
    unstable = np.where(uf >= 0, s.time_ps[np.clip(uf, 0, len(s.time_ps) - 1)], np.nan)
    occupied = spur.sum(0) / np.maximum(valid.sum(0), 1)
    rows = list(zip(range(s.n_replicas), first, lowest, closest, unstable, occupied, strict=True))
    worst: dict[str, Any] = {}
    if valid.any():
        t, m = np.unravel_index(np.argmin(E_rel), E_rel.shape)
        R = s.R[t, m]
        i, j = det.pairs[np.argmin(np.linalg.norm(R[det.pairs[:, 1]] - R[det.pairs[:, 0]], axis=-1))]
        worst = {
            "replica": int(m),
            "time_ps": float(s.time_ps[t]),
            "energy_rel_dft_min": float(E_rel[t, m]),
            "z": s.z.tolist(),
            "R": np.round(R, 6).tolist(),
            "bonds": mon.bonds.bonds.tolist(),
            "closest_pair": [int(i), int(j)],
        }
    return rows, worst


def _fresh_plots(out: Path) -> Path:
    """``out/plots``, emptied: stale tables of an earlier run (e.g. another torsion's) must not survive."""
    plots = out / "plots"
    if plots.exists():
        shutil.rmtree(plots)
    return plots
