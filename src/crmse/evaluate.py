"""The `evaluate` stage: every observable of DESIGN.md §3 for the MSE and the CRMSE model of one run.

Inputs (below the repository root):

* ``data/splits/<mol>/n<size>/s<seed>/{test,reference}.npz`` — test split and DFT reference pool;
* ``models/<mol>/n<size>/s<seed>/{mse,crmse}.pt`` — checkpoints (``crmse.model.load_checkpoint``);
* ``results/<mol>/n<size>/s<seed>/[T<K>/]{mse,crmse}/samples.npz`` — the sample stage's trajectories, and
  its ``sample.json`` beside it for the samples' configurational temperature (computed there with
  ``crmse.temperature``; the Laplacian costs 3n backward passes per frame, so it is not redone here
  unless sample.json lacks it).

Outputs (``metrics/<mol>/n<size>/s<seed>/[T<K>/]``, the sub-folder for a temperature-ablation run):

* ``metrics.json`` — flat numeric sections ``mse``, ``crmse``, ``reference``, ``noise_floor``;
* ``plots/`` — CSV tables, one per curve and source: ``hr/<source>.csv`` (r_A, h),
  ``energy/<source>.csv`` (energy_rel_kcal_mol = E − ⟨E_DFT⟩ of the pool, density),
  ``dihedral/<torsion>_<source>.csv`` (phi_deg, F_kcal_mol; unvisited bins omitted),
  ``parity/{energy,forces}_<model>.csv`` (dft, model; energies relative to the test-set DFT mean,
  forces an evenly spaced subset of at most 5,000 components) and ``stability/<model>.csv``
  (time_ps, stable_fraction). Sources: reference, mse, crmse.

All F(φ) curves of a run use one temperature (the MSE samples' set temperature, recorded as
``reference.dihedral_temperature``), so F(φ) differences are differences of ln p(φ) in kcal/mol.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from crmse.data import Frames
from crmse.io import atomic_path, read_json, run_dir, write_json
from crmse.molecules import TORSIONS, check_molecule
from crmse.observables import (
    HR_EDGES,
    BondReference,
    Distributions,
    SpuriousDetector,
    compare,
    dihedral_edges,
    distributions,
    energy_edges,
    energy_histogram,
    evenly_spaced,
    first_unstable_frame,
    kinetic_temperature,
    noise_floor,
    replica_bootstrap,
    stability_summary,
    stable_fraction_curve,
    valid_mask,
)

MODELS = ("mse", "crmse")
PARITY_MAX_FORCES = 5000
SAMPLE_KEYS = ("R", "E", "T_kin", "time_ps", "unstable_frame", "z", "temperature")


class EvaluateError(ValueError):
    """An input of the evaluate stage is missing or inconsistent."""


@dataclass
class Samples:
    """A sample stage output (see notes/HELPERS.md): R (T, M, n, 3) Å, E/T_kin (T, M), time_ps (T,), ..."""

    R: np.ndarray
    E: np.ndarray
    T_kin: np.ndarray
    time_ps: np.ndarray
    unstable_frame: np.ndarray
    z: np.ndarray
    temperature: float


def load_samples(path: str | Path) -> Samples:
    """Read and check a ``samples.npz``; raise :class:`EvaluateError` naming the file and the problem."""
    path = Path(path)
    if not path.exists():
        raise EvaluateError(f"samples file not found: {path} (run the sample stage for this model first)")
    with np.load(path) as d:
        missing = [k for k in SAMPLE_KEYS if k not in d]
        if missing:
            raise EvaluateError(f"{path}: missing keys {missing}; expected {list(SAMPLE_KEYS)}")
        s = Samples(
            R=d["R"].astype(np.float64),
            E=d["E"].astype(np.float64),
            T_kin=d["T_kin"].astype(np.float64),
            time_ps=d["time_ps"].astype(np.float64),
            unstable_frame=d["unstable_frame"].astype(np.int64),
            z=d["z"].astype(np.int64),
            temperature=float(d["temperature"]),
        )
    T, M = s.R.shape[:2] if s.R.ndim == 4 else (-1, -1)
    if s.R.ndim != 4 or s.R.shape[2:] != (len(s.z), 3):
        raise EvaluateError(f"{path}: R has shape {s.R.shape}, expected (T, M, {len(s.z)}, 3)")
    for name, arr, shape in (("E", s.E, (T, M)), ("T_kin", s.T_kin, (T, M)), ("time_ps", s.time_ps, (T,))):
        if arr.shape != shape:
            raise EvaluateError(f"{path}: {name} has shape {arr.shape}, expected {shape}")
    if s.unstable_frame.shape != (M,):
        raise EvaluateError(f"{path}: unstable_frame has shape {s.unstable_frame.shape}, expected ({M},)")
    if T < 1 or M < 1:
        raise EvaluateError(f"{path}: no saved frames ({T} frames × {M} replicas)")
    return s


def load_split_frames(path: str | Path) -> Frames:
    """A split file (z R E F md17_index) as :class:`Frames`."""
    path = Path(path)
    if not path.exists():
        raise EvaluateError(f"split file not found: {path} (run the split stage first)")
    with np.load(path) as d:
        return Frames(d["z"], d["R"], d["E"].reshape(-1), d["F"], d["md17_index"])


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
    bonds: BondReference,
    detector: SpuriousDetector,
    ref: Distributions,
    torsions: Any,
    ev: dict[str, Any],
    temperature: float,
) -> tuple[dict[str, Any], Distributions | None, np.ndarray, np.ndarray]:
    """Stability, spurious-state occupancy, T_kin and distribution metrics of one model's samples.

    Returns (metrics row, the samples' distributions or None when no frame is valid, first unstable
    frame per replica (M,), valid-frame mask (T, M)). Only frames before instability count.
    """
    uf = first_unstable_frame(s.R, bonds, ev["bond_tolerance"], s.unstable_frame)
    valid = valid_mask(uf, len(s.time_ps)) & np.isfinite(s.E) & np.isfinite(s.R).all((2, 3))
    row: dict[str, Any] = dict(stability_summary(uf, s.time_ps))
    row["n_replicas"] = int(s.R.shape[1])
    row["n_valid_frames"] = int(valid.sum())
    row.update(detector.summary(s.R, s.E, valid, s.time_ps))
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


def evaluate_run(
    molecule: str,
    size: int,
    seed: int,
    params: dict[str, Any],
    root: str | Path = ".",
    device: str | torch.device = "cpu",
    progress: bool = True,
    variant: str = "",
) -> dict[str, Any]:
    """Compute and write metrics.json and the plot tables of one (molecule, size, seed); return the metrics.

    ``variant`` (e.g. ``T500``, :func:`crmse.io.temperature_variant`) reads the samples of that
    sub-folder of results/<run>/ and writes to the same sub-folder of metrics/<run>/.
    """
    from crmse.model import load_checkpoint

    check_molecule(molecule)
    ev = params["evaluate"]
    root = Path(root)
    split = run_dir(root / "data/splits", molecule, size, seed)
    ckpts = {m: run_dir(root / "models", molecule, size, seed) / f"{m}.pt" for m in MODELS}
    sample_files = {m: run_dir(root / "results", molecule, size, seed) / variant / m / "samples.npz" for m in MODELS}
    out = run_dir(root / "metrics", molecule, size, seed) / variant

    # Fail early, naming every missing input at once.
    needed = [split / "test.npz", split / "reference.npz", *ckpts.values(), *sample_files.values()]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise EvaluateError("evaluate: missing inputs (both models are required): " + ", ".join(missing))

    pool = load_split_frames(split / "reference.npz")
    test = load_split_frames(split / "test.npz")
    samples = {m: load_samples(p) for m, p in sample_files.items()}
    for m, s in samples.items():
        if not np.array_equal(s.z, pool.z):
            raise EvaluateError(f"{sample_files[m]}: atoms z={s.z.tolist()} differ from the reference pool's")
    torsions = TORSIONS[molecule]
    T_phi = samples["mse"].temperature  # one temperature for every F(φ) curve of this run
    bins = ev["dihedral_bins"]

    print(f"evaluate {molecule} n{size} s{seed}: reference pool {len(pool)} frames, test {len(test)} frames")
    bonds = BondReference.from_frames(pool.z, pool.R, ev["bond_factor"])
    detector = SpuriousDetector.from_reference(
        pool.z, pool.R, pool.E, bonds.bonds, ev["spurious_energy_margin"], ev["spurious_distance_margin"]
    )
    ref = distributions(pool.R, pool.E, torsions, bins, T_phi)
    reference: dict[str, Any] = {
        "n_frames": len(pool),
        "energy_min": float(pool.E.min()),
        "energy_mean": float(pool.E.mean()),
        "energy_std": float(pool.E.std()),
        "max_bond_deviation": float(bonds.max_deviation(pool.R).max()),
        "min_nonbonded_distance": detector.distance_min,
        "spurious_distance_threshold": detector.distance_threshold,
        "spurious_energy_threshold_rel_dft_min": -detector.energy_margin,
        "dihedral_temperature": T_phi,
    }
    floor = noise_floor(pool.R, pool.E, pool.md17_index, torsions, ev["noise_blocks"], bins, T_phi)
    floor["n_blocks"] = ev["noise_blocks"]

    results: dict[str, dict[str, Any]] = {}
    curves: dict[str, Any] = {}
    for m in MODELS:
        s = samples[m]
        model, _meta = load_checkpoint(ckpts[m], device=device)
        model.eval()
        if hasattr(model, "z") and not np.array_equal(np.asarray(model.z.cpu()), pool.z):
            raise EvaluateError(f"{ckpts[m]}: model atoms differ from the reference pool's")
        print(f"[{m}] test accuracy, stability, spurious states, distributions, temperatures")
        E_pred, F_pred = predict(model, test.R, ev["batch_size"], progress)
        row: dict[str, Any] = {
            "test_energy_mae": float(np.abs(E_pred - test.E).mean()),
            "test_forces_mae": float(np.abs(F_pred - test.F).mean()),
        }
        sampled, sim, uf, valid = sample_observables(s, bonds, detector, ref, torsions, ev, T_phi)
        row.update(sampled)
        row["T_conf"], row["T_conf_frames"] = samples_conf_temperature(
            sample_files[m].parent / "sample.json", model, s.R[valid], ev, progress
        )
        # DFT forces in the numerator, this model's Laplacian (DESIGN.md §3)
        reference[f"T_conf_{m}_laplacian"] = conf_temperature(
            model, pool.R, pool.F, ev["conf_temperature_frames"], ev["batch_size"], progress
        )
        if sim is None:
            print(f"warning: [{m}] no valid frames; distribution metrics are undefined")
        results[m] = row
        curves[m] = {"dist": sim, "E_pred": E_pred, "F_pred": F_pred, "uf": uf, "time_ps": s.time_ps}

    metrics = {**results, "reference": reference, "noise_floor": floor}
    _write_outputs(out, metrics, ref, curves, pool, test, ev["energy_bins"])
    return metrics


def _write_outputs(
    out: Path,
    metrics: dict[str, Any],
    ref: Distributions,
    curves: dict[str, dict[str, Any]],
    pool: Frames,
    test: Frames,
    energy_bins: int,
) -> None:
    """Plot tables first, metrics.json last (its presence marks a complete evaluation)."""
    plots = out / "plots"
    if plots.exists():  # stale tables of an earlier run (e.g. another torsion table) must not survive
        shutil.rmtree(plots)
    dists = {m: c["dist"] for m, c in curves.items() if c["dist"] is not None}
    e_edges = energy_edges(ref.energies, [d.energies for d in dists.values()], energy_bins)
    e0 = float(pool.E.mean())
    _write_distribution_plots(plots, "reference", ref, e_edges, e0)
    for m, c in curves.items():
        if c["dist"] is not None:
            _write_distribution_plots(plots, m, c["dist"], e_edges, e0)
        et = float(test.E.mean())
        _write_csv(
            plots / "parity" / f"energy_{m}.csv", ["dft", "model"], zip(test.E - et, c["E_pred"] - et, strict=True)
        )
        f_dft, f_model = test.F.reshape(-1), c["F_pred"].reshape(-1)
        sel = evenly_spaced(len(f_dft), PARITY_MAX_FORCES)
        _write_csv(plots / "parity" / f"forces_{m}.csv", ["dft", "model"], zip(f_dft[sel], f_model[sel], strict=True))
        frac = stable_fraction_curve(c["uf"], len(c["time_ps"]))
        _write_csv(
            plots / "stability" / f"{m}.csv", ["time_ps", "stable_fraction"], zip(c["time_ps"], frac, strict=True)
        )
    write_json(out / "metrics.json", metrics)
