"""The sampling run behind the `sample` stage: Langevin MD of M replicas, saved in resumable chunks.

Outputs in ``out_dir`` (read back by :func:`crmse.artifacts.load_samples`):

* ``samples.npz``: R (T, M, n, 3) float32 Å, E (T, M) kcal/mol, T_kin (T, M) K, time_ps (T,),
  unstable_frame (M,) (first saved frame at/after which the replica is unstable, −1 = stable
  to the end; frames from there on are NaN), z (n,), temperature () K;
* ``sample.json``: settings, stability summary, mean kinetic temperature, configurational
  temperature of the samples — only what the same inputs always give (a dependency of evaluate);
* ``trajectory.traj``: ASE trajectory of one replica (its frames before instability).

Throughput, wall time, whether the run resumed and the compaction of frozen replicas vary from run to
run: they go to ``timing_path`` (outside ``out_dir``, so no stage that reads the samples depends on them).

Resuming: the run is cut into chunks of ``chunk_frames`` saved frames. Each chunk is written
atomically to ``scratch_dir`` together with the complete engine state (positions, velocities,
forces, RNG state) at its end, so an interrupted run restarts from the last complete chunk and
produces the same numbers as an uninterrupted one. The scratch folder lives beside ``out_dir``
(DVC deletes a stage's outputs before it runs, so it must not be inside them), is tied to a
fingerprint of the settings, the inputs and the code that produces the trajectory
(:func:`code_fingerprint`: a changed run never resumes a stale one), is created only once the
inputs have been checked, is verified chunk by chunk on resuming (a damaged chunk is discarded
with the ones after it and recomputed), and is removed once the outputs are written.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import math
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from crmse.io import atomic_path, read_json, write_json, write_npz
from crmse.langevin import EnergyForces, Langevin, LangevinState, StabilityCheck
from crmse.temperature import frames_temperature
from crmse.units import masses


@dataclass(frozen=True)
class SampleSettings:
    """Settings of one sampling run (units: K, fs, 1/fs, ps, Å)."""

    temperature: float
    dt: float = 0.5
    friction: float = 0.01
    n_replicas: int = 64
    equilibration_fs: float = 500.0
    production_ps: float = 10.0
    save_every: int = 20
    chunk_frames: int = 50
    trajectory_replica: int = 0
    seed: int = 0
    bond_tolerance: float = 0.5
    bond_factor: float = 1.3
    conf_temperature_frames: int = 2048

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ValueError(f"temperature must be positive, got {self.temperature} K")
        if self.trajectory_replica >= self.n_replicas:
            raise ValueError(
                f"md.trajectory_replica = {self.trajectory_replica} but there are only {self.n_replicas} replicas"
            )
        if self.n_frames < 1:
            raise ValueError(
                f"production of {self.production_ps} ps at dt = {self.dt} fs is {self.production_steps} steps, "
                f"fewer than md.save_every = {self.save_every}: no frame would be saved"
            )

    @classmethod
    def from_params(cls, params: dict[str, Any], temperature: float, seed: int) -> SampleSettings:
        """From validated params (sections ``md`` and ``evaluate``), a resolved temperature in K and the run seed."""
        md, ev = params["md"], params["evaluate"]
        return cls(
            temperature=float(temperature),
            dt=md["dt"],
            friction=md["friction"],
            n_replicas=md["n_replicas"],
            equilibration_fs=md["equilibration_fs"],
            production_ps=md["production_ps"],
            save_every=md["save_every"],
            chunk_frames=md["chunk_frames"],
            trajectory_replica=md["trajectory_replica"],
            seed=seed,
            bond_tolerance=ev["bond_tolerance"],
            bond_factor=ev["bond_factor"],
            conf_temperature_frames=md["conf_temperature_frames"],
        )

    @property
    def equilibration_steps(self) -> int:
        return round(self.equilibration_fs / self.dt)

    @property
    def production_steps(self) -> int:
        return round(self.production_ps * 1000.0 / self.dt)

    @property
    def n_frames(self) -> int:
        return self.production_steps // self.save_every

    @property
    def n_chunks(self) -> int:
        return math.ceil(self.n_frames / self.chunk_frames)


def start_frames(reference_R: np.ndarray, n_replicas: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random reference frames (without replacement when there are enough): (indices, R (M, n, 3))."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(reference_R), size=n_replicas, replace=n_replicas > len(reference_R))
    return idx, np.asarray(reference_R)[idx]


#: Modules whose code shapes a trajectory (integrator, model, pair list, stability check, units):
#: a partial run made by other code is never resumed.
TRAJECTORY_MODULES = (
    "crmse.sampling", "crmse.langevin", "crmse.pairlist", "crmse.model", "crmse.geometry",
    "crmse.units", "crmse.observables", "crmse.molecules",
)
#: Libraries whose version shapes a trajectory.
TRAJECTORY_LIBRARIES = ("torch", "numpy", "schnetpack", "ase")


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return tree


@cache
def source_digest(module: str) -> str:
    """sha256 of a module's code as Python parses it: comments, docstrings and layout do not count.

    A comment edit must not throw away hours of sampling; any change the interpreter can see does.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(f"cannot find the source of {module}")
    tree = _strip_docstrings(ast.parse(Path(spec.origin).read_text(), filename=spec.origin))
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def code_fingerprint() -> dict[str, str]:
    """What of the code a trajectory depends on: :data:`TRAJECTORY_MODULES` digests, Python and library versions."""
    out = {m: source_digest(m) for m in TRAJECTORY_MODULES}
    out["python"] = platform.python_version()
    for lib in TRAJECTORY_LIBRARIES:
        out[lib] = torch.__version__ if lib == "torch" else importlib.metadata.version(lib)
    return out


def _fingerprint(
    settings: SampleSettings, z: np.ndarray, reference_R: np.ndarray, meta: dict[str, Any], code: dict[str, str]
) -> str:
    h = hashlib.sha256()
    record = {"settings": asdict(settings), "meta": meta, "code": code}
    h.update(json.dumps(record, sort_keys=True, default=str).encode())
    h.update(np.ascontiguousarray(z, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(reference_R, dtype=np.float64).tobytes())
    return h.hexdigest()


def _stale_reason(marker: Path, fingerprint: str, settings: SampleSettings, code: dict[str, str]) -> str | None:
    """Why a partial run's folder must not be resumed (None = it may be)."""
    if not marker.exists():
        return "it has no fingerprint"
    try:
        old = read_json(marker)
        if old["fingerprint"] == fingerprint:
            return None
    except (ValueError, KeyError, TypeError, OSError) as exc:
        return f"its fingerprint is unreadable ({type(exc).__name__})"
    old_code = old.get("code") or {}
    changed = sorted(k for k in set(code) | set(old_code) if code.get(k) != old_code.get(k))
    if changed:
        return "it was made by other code: " + ", ".join(changed)
    old_settings = old.get("settings") or {}
    changed = sorted(k for k, v in asdict(settings).items() if old_settings.get(k) != v)
    if changed:
        return "it was made with other settings: " + ", ".join(changed)
    return "it was made from other inputs (checkpoint, atoms, reference frames, device or dtype)"


def _save_chunk(path: Path, state: LangevinState, frames: dict[str, np.ndarray] | None) -> None:
    arrays = {f"state_{k}": v for k, v in state.state_dict().items()}
    if frames is not None:
        arrays.update(frames)
    write_npz(path, **arrays)


_STATE_KEYS = ("R", "V", "F", "E", "alive", "unstable_step", "step", "rng_state")


def _chunk_problem(path: Path, n_frames: int | None, M: int, n: int) -> str | None:
    """What is wrong with a saved chunk (None = every array reads back, CRC-checked, with the right shape).

    ``n_frames`` None: the equilibrated state (no frames).
    """
    try:
        with np.load(path, allow_pickle=False) as d:
            arrays = {k: d[k] for k in d.files}  # reads every member to the end: zip CRC checked
    except Exception as exc:  # noqa: BLE001 - BadZipFile, zlib.error, EOFError, ...: all mean "damaged"
        reason = str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}{': ' + reason if reason else ''}"
    missing = [k for k in (f"state_{s}" for s in _STATE_KEYS) if k not in arrays]
    if n_frames is not None:
        missing += [k for k in ("R", "E", "T_kin", "alive") if k not in arrays]
    if missing:
        return f"missing arrays {missing}"
    expect = {"state_R": (M, n, 3), "state_alive": (M,)}
    if n_frames is not None:
        expect.update(R=(n_frames, M, n, 3), E=(n_frames, M), T_kin=(n_frames, M), alive=(n_frames, M))
    wrong = [f"{k} {arrays[k].shape} != {v}" for k, v in expect.items() if arrays[k].shape != v]
    return f"wrong shapes: {', '.join(wrong)}" if wrong else None


def _model_of(fn: Any) -> Any | None:
    """The :class:`crmse.model.Potential` behind an energy callable (a VerletPotential, a bound method), if any."""
    for obj in (fn, getattr(fn, "model", None), getattr(fn, "__self__", None)):
        if obj is not None and hasattr(obj, "energy_and_forces") and isinstance(getattr(obj, "z", None), torch.Tensor):
            return obj
    return None


def _check_model_atoms(fns: tuple[Any, ...], z: np.ndarray, source: str) -> None:
    """A model driving the run must be of the data's atoms, in order (checked before any work)."""
    for fn in fns:
        model = _model_of(fn)
        if model is not None:
            from crmse.model import check_atoms  # here: the toy models of the tests need no schnetpack

            check_atoms(source, model.z.cpu().numpy(), z)


def _load_state(path: Path, device: torch.device) -> LangevinState:
    with np.load(path) as d:
        return LangevinState.from_state_dict({k[6:]: d[k] for k in d.files if k.startswith("state_")}, device)


def _to_host(frames: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {
        "R": frames["R"].to(torch.float32).cpu().numpy(),
        "E": frames["E"].to(torch.float64).cpu().numpy(),
        "T_kin": frames["T_kin"].to(torch.float64).cpu().numpy(),
        "alive": frames["alive"].cpu().numpy(),
    }


def stability_summary(unstable_frame: np.ndarray, time_ps: np.ndarray, unstable_ps: np.ndarray) -> dict[str, Any]:
    """Fraction stable to the end and median time to instability (ps; stable replicas count as the full run)."""
    M = len(unstable_frame)
    stable = unstable_frame < 0
    length = float(time_ps[-1])
    times = np.where(stable, length, np.clip(unstable_ps, 0.0, length))
    return {
        "n_replicas": M,
        "n_stable": int(stable.sum()),
        "stable_fraction": float(stable.mean()),
        "median_time_to_instability_ps": float(np.median(times)),
        "median_time_to_instability_unstable_only_ps": float(np.median(times[~stable])) if (~stable).any() else None,
        "unstable_time_ps": [float(t) for t in times[~stable]],
        "failed_during_equilibration": int((unstable_ps < 0).sum()),
        "production_ps": length,
    }


def write_trajectory(path: Path, z: np.ndarray, R: np.ndarray, E: np.ndarray) -> int:
    """ASE trajectory (atomic) of frames R (T, n, 3) Å with energies E (T,) kcal/mol → eV; stops at the first NaN."""
    from ase import Atoms, units
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import Trajectory

    n_written = 0
    with atomic_path(path) as tmp:
        with Trajectory(str(tmp), "w") as traj:
            for r, e in zip(R, E, strict=True):
                if not (np.isfinite(r).all() and np.isfinite(e)):
                    break
                atoms = Atoms(numbers=z, positions=r)
                atoms.calc = SinglePointCalculator(atoms, energy=float(e) * units.kcal / units.mol)
                traj.write(atoms)
                n_written += 1
    return n_written


def run_sampling(
    energy_forces: EnergyForces,
    z: np.ndarray,
    reference_R: np.ndarray,
    settings: SampleSettings,
    out_dir: str | Path,
    scratch_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    energy_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    meta: dict[str, Any] | None = None,
    progress: bool = True,
    compact: bool = True,
    timing_path: str | Path | None = None,
) -> dict[str, Any]:
    """Equilibrate and sample M replicas started from random reference frames; write the outputs; return the summary.

    ``energy_forces`` drives the dynamics (one call per step); ``energy_fn`` (R → E, twice
    differentiable), if given, is used for the configurational temperature of the samples.
    ``meta`` (e.g. molecule, model, checkpoint hash) goes into sample.json and the resume fingerprint.
    A :class:`crmse.model.Potential` behind either must be of atoms ``z`` (checked before anything
    is written). ``compact``: leave frozen replicas out of the model evaluation (same numbers).
    The summary's ``throughput`` is also written to ``timing_path`` when given.
    """
    out_dir = Path(out_dir)
    scratch = Path(scratch_dir) if scratch_dir is not None else out_dir.parent / f".{out_dir.name}.partial"
    device = torch.device(device)
    meta = dict(meta or {})
    z = np.asarray(z).astype(np.int64)
    reference_R = np.asarray(reference_R, dtype=np.float64)
    s = settings
    if reference_R.ndim != 3 or reference_R.shape[1:] != (len(z), 3):
        raise ValueError(
            f"reference frames must have shape (N, {len(z)}, 3) for {len(z)} atoms, got {reference_R.shape}"
        )
    _check_model_atoms((energy_forces, energy_fn), z, str(meta.get("checkpoint", "the model")))

    code = code_fingerprint()
    fingerprint = _fingerprint(s, z, reference_R, {**meta, "device": device.type, "dtype": str(dtype)}, code)
    marker = scratch / "fingerprint.json"
    if scratch.exists():
        stale = _stale_reason(marker, fingerprint, s, code)
        if stale is not None:
            # Never mix runs: a partial result of other settings, inputs or code is thrown away.
            print(f"sample: discarding the partial run in {scratch}: {stale}; starting over")
            shutil.rmtree(scratch)

    def save(path: Path, state: LangevinState, frames: dict[str, np.ndarray] | None) -> None:
        # The scratch folder appears with its first result: a run failing before that leaves nothing behind.
        if not marker.exists():
            write_json(marker, {"fingerprint": fingerprint, "settings": asdict(s), "meta": meta, "code": code})
        _save_chunk(path, state, frames)

    check = StabilityCheck.from_reference(z, reference_R, tolerance=s.bond_tolerance, factor=s.bond_factor)
    engine = Langevin(
        energy_forces, masses(z), dt=s.dt, temperature=s.temperature, friction=s.friction,
        stability=check, device=device, dtype=dtype, compact=compact,
    )
    start_idx, R0 = start_frames(reference_R, s.n_replicas, s.seed)

    steps_run, t_run = 0, 0.0
    chunk_paths = [scratch / f"chunk_{c:05d}.npz" for c in range(s.n_chunks)]
    done = 0
    while done < s.n_chunks and chunk_paths[done].exists():
        n_c = min(s.chunk_frames, s.n_frames - done * s.chunk_frames)
        problem = _chunk_problem(chunk_paths[done], n_c, s.n_replicas, len(z))
        if problem is not None:
            later = [p for p in chunk_paths[done + 1 :] if p.exists()]
            after = f" with the {len(later)} chunk(s) after it" if later else ""
            since = f"chunk {done - 1}" if done > 0 else "equilibration"
            print(f"sample: {chunk_paths[done]} is damaged ({problem}): discarded{after}; resuming after {since}")
            for p in chunk_paths[done:]:
                p.unlink(missing_ok=True)
            break
        done += 1
    equil_path = scratch / "equilibrated.npz"
    if done == 0 and equil_path.exists():
        problem = _chunk_problem(equil_path, None, s.n_replicas, len(z))
        if problem is not None:
            print(f"sample: {equil_path} is damaged ({problem}): discarded; equilibrating again")
            equil_path.unlink()
    total_steps = s.equilibration_steps + s.n_frames * s.save_every
    bar = tqdm(total=total_steps, desc=f"MD {meta.get('label', '')}".strip(), unit="step", disable=not progress)

    if done > 0:
        state = _load_state(chunk_paths[done - 1], device)
        bar.update(s.equilibration_steps + min(done * s.chunk_frames, s.n_frames) * s.save_every)
    elif equil_path.exists():
        state = _load_state(equil_path, device)
        bar.update(s.equilibration_steps)
    else:
        t0 = time.perf_counter()
        state = engine.init_state(R0, seed=s.seed)
        left = s.equilibration_steps
        while left > 0:
            k = min(left, 100)
            engine.step(state, k)
            left -= k
            bar.update(k)
        _ = state.alive.cpu()  # wait for queued device work so the timing is honest
        t_run += time.perf_counter() - t0
        steps_run += s.equilibration_steps
        save(equil_path, state, None)

    for c in range(done, s.n_chunks):
        n = min(s.chunk_frames, s.n_frames - c * s.chunk_frames)
        t0 = time.perf_counter()
        parts = []
        for _ in range(n):
            parts.append(engine.run(state, s.save_every, s.save_every))
            bar.update(s.save_every)
        frames = _to_host({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
        t_run += time.perf_counter() - t0
        steps_run += n * s.save_every
        save(chunk_paths[c], state, frames)
        bar.set_postfix(alive=f"{int(frames['alive'][-1].sum())}/{s.n_replicas}")
    bar.close()

    # Assemble the production frames from the chunks.
    parts = []
    for p in chunk_paths:
        with np.load(p) as d:
            parts.append({k: d[k] for k in ("R", "E", "T_kin", "alive")})
    R = np.concatenate([p["R"] for p in parts])
    E = np.concatenate([p["E"] for p in parts])
    T_kin = np.concatenate([p["T_kin"] for p in parts])
    alive = np.concatenate([p["alive"] for p in parts])
    with np.load(chunk_paths[-1]) as d:
        unstable_step = d["state_unstable_step"]

    dead = ~alive
    unstable_frame = np.where(dead.any(0), dead.argmax(0), -1)
    # Once unstable, a replica stays frozen (alive never comes back), so mask from that frame on.
    invalid = np.arange(len(R))[:, None] >= np.where(unstable_frame < 0, len(R), unstable_frame)[None, :]
    R[invalid] = np.nan
    E[invalid] = np.nan
    T_kin[invalid] = np.nan
    time_ps = (np.arange(1, s.n_frames + 1) * s.save_every * s.dt / 1000.0).astype(np.float64)
    unstable_ps = np.where(unstable_step >= 0, (unstable_step - s.equilibration_steps) * s.dt / 1000.0, np.inf)

    out_dir.mkdir(parents=True, exist_ok=True)
    write_npz(
        out_dir / "samples.npz",
        R=R.astype(np.float32),
        E=E,
        T_kin=T_kin,
        time_ps=time_ps,
        unstable_frame=unstable_frame.astype(np.int64),
        z=z,
        temperature=np.array(s.temperature),
        start_index=start_idx.astype(np.int64),
    )
    n_traj = write_trajectory(out_dir / "trajectory.traj", z, R[:, s.trajectory_replica], E[:, s.trajectory_replica])

    valid = ~invalid
    T_conf, n_conf = None, 0
    if energy_fn is not None and valid.any() and s.conf_temperature_frames > 0:
        t_idx, r_idx = np.nonzero(valid)
        pick = np.linspace(0, len(t_idx) - 1, min(s.conf_temperature_frames, len(t_idx))).round().astype(int)
        sel = R[t_idx[pick], r_idx[pick]]
        n_conf = len(sel)
        try:
            T_conf = frames_temperature(energy_fn, sel, None, 64, device, dtype, progress=progress)
        except ValueError as exc:  # e.g. a non-convex model surface there: report, do not crash
            T_conf = None
            meta["conf_temperature_error"] = str(exc)

    per_replica = np.array([np.nanmean(T_kin[:, r]) if valid[:, r].any() else np.nan for r in range(s.n_replicas)])
    summary = {
        **meta,
        "settings": asdict(s),
        "temperature_K": s.temperature,
        "n_frames": s.n_frames,
        "equilibration_steps": s.equilibration_steps,
        "production_steps": s.n_frames * s.save_every,
        "device": str(device),
        "dtype": str(dtype).replace("torch.", ""),
        # Not in sample.json (see the module docstring): timing_path.
        "throughput": {
            "steps_run_this_invocation": steps_run,
            "wall_s": t_run,
            "replica_steps_per_s": s.n_replicas * steps_run / t_run if t_run > 0 else None,
            "ns_per_day_per_replica": steps_run * s.dt * 1e-6 * 86400 / t_run if t_run > 0 else None,
            "resumed": done > 0 or steps_run < total_steps,
            "compaction": {"enabled": compact, **engine.compaction},
        },
        "stability": stability_summary(unstable_frame, time_ps, unstable_ps),
        "T_kin_mean_K": float(np.nanmean(T_kin)) if valid.any() else None,
        "T_kin_replica_sem_K": float(np.nanstd(per_replica) / np.sqrt(np.isfinite(per_replica).sum()))
        if np.isfinite(per_replica).sum() > 1
        else None,
        "T_conf_samples_K": T_conf,
        "T_conf_frames": n_conf,
        "E_mean_kcal_mol": float(np.nanmean(E)) if valid.any() else None,
        "trajectory_replica": s.trajectory_replica,
        "trajectory_frames": n_traj,
        "start_reference_index": start_idx.tolist(),
    }
    # Run-to-run-varying numbers apart, so that an identical rerun leaves sample.json (a dependency) unchanged.
    write_json(out_dir / "sample.json", {k: v for k, v in summary.items() if k != "throughput"})
    if timing_path is not None:
        write_json(Path(timing_path), summary["throughput"])
    shutil.rmtree(scratch, ignore_errors=True)
    return summary
