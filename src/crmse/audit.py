"""Ab initio audit: DFT single points (PySCF) on configurations a potential samples.

The audit asks DFT itself whether what a model samples is physical (docs/method.md §7):

* :func:`select_frames` picks frames from a sample run (``samples.npz``): the lowest model energies
  (one per replica first, so the picks are not neighbouring frames of one replica), frames flagged
  spurious by :class:`crmse.observables.SpuriousDetector` (up to a cap, spread over replicas), and
  random ordinary frames — all seeded, and never a frame at/after a replica's instability.
* :func:`dft_single_point` computes the RKS energy (kcal/mol) and forces (kcal/mol/Å, −gradient) at
  the level of theory of rMD17 (PBE/def2-SVP by default) for one geometry in Å.
* :func:`run_dft` runs many frames through a persistent per-frame :class:`DFTCache` keyed by a hash of
  (atomic numbers, coordinates rounded to 1e-6 Å, settings, PySCF version), so re-runs and
  overlapping selections cost nothing. A non-converging SCF (or a PySCF error) is recorded in the
  result's ``status``, never raised.
* :func:`fit_offset` aligns energy scales: MD17 labels (PBE+vdW-TS, FHI-aims) differ from
  PBE/def2-SVP by a near-constant offset (ethanol ≈ +119.9 ± 1.0 kcal/mol). It is fitted on
  reference-pool frames (DFT vs their labels), never on sampled frames, and its spread is reported:
  that spread is the floor of every model − DFT energy comparison below.
* :func:`run_audit` ties it together and returns the metrics and per-frame rows.

Units: Å, kcal/mol, kcal/mol/Å. Hartree and Bohr conversions come from :mod:`crmse.units`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crmse.io import write_json
from crmse.units import BOHR, HARTREE

#: Coordinates are rounded to this many decimals (Å) before hashing AND before the DFT run, so the
#: cache key fully determines the computation (samples store float32 positions, ~1e-7 Å noise).
COORD_DECIMALS = 6

#: Bump when the meaning of a cached record changes.
CACHE_VERSION = 1

KINDS = ("lowest", "spurious", "random")

#: numpy (B, n, 3) Å → (E (B,) kcal/mol, F (B, n, 3) kcal/mol/Å): how the audit calls a model.
EnergyForces = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# ----------------------------------------------------------------------------------------------------
# Settings, results, single points


@dataclass(frozen=True)
class DFTSettings:
    """PySCF settings of the audit's single points (everything but ``threads`` enters the cache key)."""

    xc: str = "pbe"
    basis: str = "def2-svp"
    max_cycle: int = 100
    conv_tol: float = 1e-9  # Hartree; PySCF's RKS default
    # J-fitting with PySCF's default auxiliary basis (def2-*-jkfit for def2 sets): it reproduces
    # the rMD17 labels (ORCA uses RI-J by default for GGAs) 8x closer than exact J, and is faster.
    density_fit: bool = True
    grid_level: int = 2
    soscf_fallback: bool = True  # retry a failed DIIS SCF with second-order SCF (mf.newton())
    threads: int = 2

    def __post_init__(self) -> None:
        if self.max_cycle < 1:
            raise ValueError(f"DFT max_cycle must be >= 1, got {self.max_cycle}")
        if not self.conv_tol > 0:
            raise ValueError(f"DFT conv_tol must be > 0, got {self.conv_tol}")
        if self.threads < 1:
            raise ValueError(f"DFT threads must be >= 1, got {self.threads}")

    @classmethod
    def from_params(cls, audit: Mapping[str, Any]) -> DFTSettings:
        """Settings from the validated ``audit`` section of params.yaml."""
        return cls(**{k: audit[k] for k in cls.__dataclass_fields__ if k in audit})

    def key_fields(self) -> dict[str, Any]:
        """What a result depends on (threads do not change the numbers).

        The level of theory and every SCF setting (xc, basis, density fitting, grid level, conv_tol,
        max_cycle, SOSCF fallback), the method, charge and spin :func:`dft_single_point` uses, the
        PySCF version and the code of :func:`dft_single_point` itself (comments and docstrings aside);
        the geometry (atomic numbers, rounded coordinates) is added by :func:`frame_key`.
        """
        import pyscf

        d = asdict(self)
        d.pop("threads")
        return {
            **d, "method": "RKS", "charge": 0, "spin": 0, "pyscf": pyscf.__version__,
            "code": _single_point_code(), "decimals": COORD_DECIMALS, "cache_version": CACHE_VERSION,
        }


def _single_point_code() -> str:
    """sha256 of :func:`dft_single_point`'s code as parsed (this file's text, so a monkeypatched stand-in
    does not change it): an edit of how the settings are applied is a different computation."""
    import ast

    global _SINGLE_POINT_CODE
    if _SINGLE_POINT_CODE is None:
        tree = ast.parse(Path(__file__).read_text())
        fn = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "dft_single_point")
        if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant):
            fn.body = fn.body[1:]  # the docstring
        _SINGLE_POINT_CODE = hashlib.sha256(ast.dump(fn).encode()).hexdigest()
    return _SINGLE_POINT_CODE


_SINGLE_POINT_CODE: str | None = None


@dataclass
class DFTResult:
    """One single point. ``energy`` kcal/mol and ``forces`` (n, 3) kcal/mol/Å are NaN unless ``ok``.

    ``status``: "ok", "scf_not_converged" or "error" (``message`` says why); ``seconds`` is the wall
    time of the original computation (kept when the result comes from the cache).
    """

    energy: float
    forces: np.ndarray
    status: str
    seconds: float
    cycles: int | None = None
    message: str = ""
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "energy": None if not math.isfinite(self.energy) else self.energy,
            "forces": None if not np.isfinite(self.forces).all() else self.forces.tolist(),
            "status": self.status,
            "seconds": self.seconds,
            "cycles": self.cycles,
            "message": self.message,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any], n_atoms: int) -> DFTResult:
        forces = np.full((n_atoms, 3), np.nan) if d["forces"] is None else np.asarray(d["forces"], dtype=float)
        energy = math.nan if d["energy"] is None else float(d["energy"])
        return cls(energy, forces, d["status"], float(d["seconds"]), d.get("cycles"), d.get("message", ""), True)


def round_coordinates(R: np.ndarray) -> np.ndarray:
    """Positions (Å) as float64 rounded to :data:`COORD_DECIMALS` (−0.0 becomes 0.0)."""
    return np.round(np.asarray(R, dtype=np.float64), COORD_DECIMALS) + 0.0


def frame_key(z: np.ndarray, R: np.ndarray, settings: DFTSettings) -> str:
    """sha256 hex of (atomic numbers, rounded coordinates, settings): the cache key of one frame."""
    z = np.ascontiguousarray(np.asarray(z), dtype="<i8")
    R = np.ascontiguousarray(round_coordinates(R), dtype="<f8")
    if R.shape != (len(z), 3):
        raise ValueError(f"positions must have shape ({len(z)}, 3) for {len(z)} atoms, got {R.shape}")
    h = hashlib.sha256()
    h.update(json.dumps(settings.key_fields(), sort_keys=True).encode())
    h.update(z.tobytes())
    h.update(R.tobytes())
    return h.hexdigest()


def dft_single_point(z: np.ndarray, R: np.ndarray, settings: DFTSettings) -> DFTResult:
    """RKS energy (kcal/mol) and forces (kcal/mol/Å) of one neutral closed-shell geometry R (n, 3) Å.

    A non-converged SCF (after the optional second-order retry) gives status "scf_not_converged" and
    NaN energy/forces; it does not raise.
    """
    from pyscf import dft, gto, lib

    z = np.asarray(z, dtype=int)
    R = round_coordinates(R)
    if R.shape != (len(z), 3) or not np.isfinite(R).all():
        raise ValueError(f"need finite positions of shape ({len(z)}, 3) Å, got {R.shape}")
    if int(z.sum()) % 2:
        raise ValueError(f"RKS needs an even number of electrons; atomic numbers {z.tolist()} sum to {z.sum()}")
    lib.num_threads(settings.threads)
    t0 = time.perf_counter()
    mol = gto.M(
        atom=[(int(a), tuple(map(float, x))) for a, x in zip(z, R, strict=True)],
        unit="Angstrom",
        basis=settings.basis,
        verbose=0,
    )
    mf = dft.RKS(mol)
    mf.xc = settings.xc
    mf.max_cycle = settings.max_cycle
    mf.conv_tol = settings.conv_tol
    mf.grids.level = settings.grid_level
    if settings.density_fit:
        mf = mf.density_fit()
    cycles = [0]

    def count(_envs: dict) -> None:
        cycles[0] += 1

    mf.callback = count
    mf.kernel()
    message = ""
    if not mf.converged and settings.soscf_fallback:
        message = "DIIS SCF did not converge; retried with second-order SCF"
        mf2 = mf.newton()
        mf2.max_cycle = settings.max_cycle
        mf2.callback = count
        mf2.kernel(mf.make_rdm1())
        mf = mf2
    if not mf.converged:
        n = len(z)
        return DFTResult(
            math.nan, np.full((n, 3), np.nan), "scf_not_converged", time.perf_counter() - t0, cycles[0],
            (message + "; " if message else "") + f"not converged in max_cycle = {settings.max_cycle}",
        )
    energy = float(mf.e_tot) * HARTREE
    grad = np.asarray(mf.nuc_grad_method().kernel(), dtype=float)  # Hartree/Bohr
    forces = -grad * (HARTREE / BOHR)
    return DFTResult(energy, forces, "ok", time.perf_counter() - t0, cycles[0], message)


# ----------------------------------------------------------------------------------------------------
# Cache


class DFTCache:
    """Persistent per-frame results: ``root/<key[:2]>/<key>.json``, written atomically.

    Lives outside DVC outputs (DVC deletes a stage's outs before it runs; a memo of pure functions of
    (geometry, settings) must survive that). Records store z and the rounded coordinates; a record
    whose geometry does not match its key, or that cannot be read, is ignored and recomputed.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def load(self, key: str, z: np.ndarray, R: np.ndarray) -> DFTResult | None:
        p = self.path(key)
        if not p.exists():
            return None
        try:
            d = json.loads(p.read_text())
            if d["z"] != np.asarray(z).astype(int).tolist() or not np.array_equal(
                np.asarray(d["R"]), round_coordinates(R)
            ):
                return None
            return DFTResult.from_json(d["result"], len(z))
        except (ValueError, KeyError, TypeError):
            return None

    def store(self, key: str, z: np.ndarray, R: np.ndarray, settings: DFTSettings, result: DFTResult) -> None:
        write_json(
            self.path(key),
            {
                "z": np.asarray(z).astype(int).tolist(),
                "R": round_coordinates(R).tolist(),
                "settings": settings.key_fields(),
                "result": result.to_json(),
            },
        )


def run_dft(
    z: np.ndarray,
    R: np.ndarray,
    settings: DFTSettings,
    cache: DFTCache | None = None,
    progress: bool = True,
    desc: str = "DFT",
    single_point: Callable[[np.ndarray, np.ndarray, DFTSettings], DFTResult] | None = None,
) -> list[DFTResult]:
    """Single points of frames R (N, n, 3) Å, through the cache; one result per frame, in order.

    Duplicate geometries are computed once. Converged and non-converged SCF results are cached (both
    are deterministic for a key that includes max_cycle); an exception from PySCF is recorded as
    status "error" and not cached. ``single_point`` defaults to :func:`dft_single_point`.
    """
    from tqdm import tqdm

    compute = single_point or dft_single_point
    R = np.asarray(R)
    if R.ndim != 3 or R.shape[1:] != (len(z), 3):
        raise ValueError(f"frames must have shape (N, {len(z)}, 3), got {R.shape}")
    done: dict[str, DFTResult] = {}
    out: list[DFTResult] = []
    n_new = n_failed = 0
    bar = tqdm(range(len(R)), desc=desc, disable=not progress, unit="frame", leave=False)
    for i in bar:
        key = frame_key(z, R[i], settings)
        res = done.get(key) or (cache.load(key, z, R[i]) if cache is not None else None)
        if res is None:
            try:
                res = compute(z, R[i], settings)
            except Exception as exc:  # noqa: BLE001 - any PySCF failure is recorded, never fatal
                res = DFTResult(math.nan, np.full((len(z), 3), np.nan), "error", 0.0, None, repr(exc))
            else:
                if cache is not None:
                    cache.store(key, z, R[i], settings, res)
            n_new += 1
        done[key] = res
        n_failed += not res.ok
        out.append(res)
        bar.set_postfix(computed=n_new, failed=n_failed)
    return out


# ----------------------------------------------------------------------------------------------------
# Offset fit


@dataclass
class OffsetFit:
    """Constant offset DFT − label (kcal/mol) fitted on reference frames, and its spread."""

    offset: float  # mean residual = least-squares constant
    std: float  # sample std of DFT − label over the frames
    sem: float  # standard error of the offset
    median: float
    max_abs_deviation: float  # largest |DFT − label − offset|
    n: int
    n_failed: int


def fit_offset(E_dft: np.ndarray, E_label: np.ndarray) -> OffsetFit:
    """Fit E_dft ≈ E_label + offset on reference frames (NaN DFT energies are skipped and counted)."""
    E_dft = np.asarray(E_dft, dtype=float).reshape(-1)
    E_label = np.asarray(E_label, dtype=float).reshape(-1)
    if E_dft.shape != E_label.shape:
        raise ValueError(f"E_dft has {E_dft.size} frames but E_label has {E_label.size}")
    ok = np.isfinite(E_dft) & np.isfinite(E_label)
    if ok.sum() < 2:
        raise ValueError(f"offset fit needs >= 2 converged reference frames, got {int(ok.sum())} of {E_dft.size}")
    d = E_dft[ok] - E_label[ok]
    offset, std = float(d.mean()), float(d.std(ddof=1))
    return OffsetFit(
        offset, std, std / math.sqrt(len(d)), float(np.median(d)), float(np.abs(d - offset).max()),
        int(ok.sum()), int((~ok).sum()),
    )


# ----------------------------------------------------------------------------------------------------
# Frame selection


@dataclass(frozen=True)
class Pick:
    """One selected saved frame: index ``t`` along time, replica ``m``, and why it was chosen."""

    t: int
    m: int
    kind: str


def _spread_over_replicas(flat: np.ndarray, M: int) -> np.ndarray:
    """Reorder flat (t·M + m) candidates, already in priority order, so each replica comes once per round."""
    m = flat % M
    rank = np.zeros(len(flat), dtype=int)
    seen: dict[int, int] = {}
    for i, r in enumerate(m.tolist()):
        rank[i] = seen.get(r, 0)
        seen[r] = rank[i] + 1
    return flat[np.argsort(rank, kind="stable")]


def select_frames(
    E: np.ndarray,
    valid: np.ndarray,
    spurious: np.ndarray,
    n_lowest: int,
    n_spurious: int,
    n_random: int,
    seed: int | Sequence[int],
) -> list[Pick]:
    """Seeded choice of frames from a sample run; E, valid, spurious have shape (T, M).

    * lowest: the ``n_lowest`` lowest model energies, taking each replica's lowest frame before any
      replica's second (neighbouring frames of one replica are near-duplicates);
    * spurious: up to ``n_spurious`` further spurious frames, random but spread over replicas;
    * random: ``n_random`` further ordinary (not spurious) frames, uniformly at random.
    Only valid frames (before instability, finite energy) are chosen; no frame is chosen twice.
    """
    E = np.asarray(E, dtype=float)
    valid = np.asarray(valid, dtype=bool) & np.isfinite(E)
    spurious = np.asarray(spurious, dtype=bool)
    if E.ndim != 2 or valid.shape != E.shape or spurious.shape != E.shape:
        raise ValueError(f"E, valid and spurious must share one (T, M) shape, got {E.shape}, {valid.shape}, "
                         f"{spurious.shape}")
    for name, n in (("n_lowest", n_lowest), ("n_spurious", n_spurious), ("n_random", n_random)):
        if n < 0:
            raise ValueError(f"{name} must be >= 0, got {n}")
    T, M = E.shape
    rng = np.random.default_rng(seed)
    taken = np.zeros(T * M, dtype=bool)
    picks: list[Pick] = []

    def take(flat: np.ndarray, n: int, kind: str) -> None:
        for f in flat[:n].tolist():
            taken[f] = True
            picks.append(Pick(f // M, f % M, kind))

    v = valid.reshape(-1)
    cand = np.flatnonzero(v)
    take(_spread_over_replicas(cand[np.argsort(E.reshape(-1)[cand], kind="stable")], M), n_lowest, "lowest")
    cand = np.flatnonzero(v & spurious.reshape(-1) & ~taken)
    take(_spread_over_replicas(rng.permutation(cand), M), n_spurious, "spurious")
    cand = np.flatnonzero(v & ~spurious.reshape(-1) & ~taken)
    take(rng.permutation(cand), n_random, "random")
    return picks


# ----------------------------------------------------------------------------------------------------
# Model evaluation


def model_energy_forces(model: Any, batch_size: int = 64) -> EnergyForces:
    """Wrap a :class:`crmse.model.Potential`-like module (``energy_and_forces`` on tensors) for numpy frames."""
    import torch

    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device

    def fn(R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        R = np.asarray(R, dtype=np.float64)
        Es, Fs = [], []
        for s in range(0, len(R), batch_size):
            Rb = torch.as_tensor(R[s : s + batch_size], dtype=dtype, device=device)
            E, F = model.energy_and_forces(Rb)
            Es.append(E.detach().double().cpu().numpy())
            Fs.append(F.detach().double().cpu().numpy())
        if not Es:
            return np.zeros(0), np.zeros((0, *R.shape[1:]))
        return np.concatenate(Es), np.concatenate(Fs)

    return fn


# ----------------------------------------------------------------------------------------------------
# The audit


@dataclass
class AuditConfig:
    """Frame budget and seed of one audit (from params ``audit`` and the run's seed)."""

    n_lowest: int = 4
    n_spurious: int = 4
    n_random: int = 8
    n_reference: int = 16
    seed: int = 0
    w1_floor_draws: int = 200  # bootstrap draws for the expected W1 of a perfect sampler with this few frames


@dataclass
class SampleRun:
    """What the audit reads of one arm's samples: R (T, M, n, 3) Å, model E (T, M), the valid-frame mask (T, M)
    (:func:`crmse.artifacts.valid_frames`) and time_ps (T,)."""

    R: np.ndarray
    E: np.ndarray
    valid: np.ndarray
    time_ps: np.ndarray | None = None


@dataclass
class AuditResult:
    """Metrics (JSON-ready), per-frame rows (CSV-ready), per-frame arrays (geometries, forces) and the DFT
    wall times and cache use (``timing``: they depend on the cache's state, so they stay out of the metrics)."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)


def _mae(a: np.ndarray, b: np.ndarray) -> float | None:
    """Mean |a − b| over frames where both are finite (per component for forces (K, n, 3)); None if none."""
    d = np.abs(np.asarray(a, dtype=float) - np.asarray(b, dtype=float))
    if d.ndim > 1:
        d = d[np.isfinite(d).all(axis=tuple(range(1, d.ndim)))]
    else:
        d = d[np.isfinite(d)]
    return float(d.mean()) if d.size else None


def _stats(x: np.ndarray) -> dict[str, float | None]:
    x = np.asarray(x, dtype=float)
    x = x[np.isfinite(x)]
    if not len(x):
        return {"min": None, "median": None, "max": None}
    return {"min": float(x.min()), "median": float(np.median(x)), "max": float(x.max())}


def _w1_floor(E_ref: np.ndarray, n: int, draws: int, seed: int) -> float | None:
    """Mean W1 between ``n`` random reference energies and the whole pool: the W1 a perfect sampler scores."""
    from crmse.observables import energy_metrics

    if n < 1:
        return None
    rng = np.random.default_rng(seed)
    return float(np.mean([energy_metrics(rng.choice(E_ref, n, replace=False), E_ref)["energy_w1"]
                          for _ in range(draws)]))


@dataclass
class AuditedFrames:
    """Frames of one model that went through DFT: the model's claim next to what DFT says.

    ``E_model`` kcal/mol (the model at the exact geometry DFT saw), ``F_model`` kcal/mol/Å (NaN when no
    model was given), ``E_label`` the data label (reference frames only, else NaN), ``results`` raw DFT.
    """

    model: str
    kind: np.ndarray
    replica: np.ndarray
    frame: np.ndarray
    time_ps: np.ndarray
    R: np.ndarray
    E_model: np.ndarray
    F_model: np.ndarray
    E_label: np.ndarray
    spurious: np.ndarray
    min_nonbonded_distance: np.ndarray
    results: list[DFTResult]

    @property
    def ok(self) -> np.ndarray:
        return np.array([r.ok for r in self.results], dtype=bool)

    @property
    def E_dft(self) -> np.ndarray:
        return np.array([r.energy for r in self.results], dtype=float)

    @property
    def F_dft(self) -> np.ndarray:
        return np.stack([r.forces for r in self.results]) if self.results else np.zeros((0, *self.R.shape[1:]))

    def group(self, mask: np.ndarray, offset: float, pool_min: float) -> dict[str, Any]:
        """Errors model − aligned DFT on the frames in ``mask``, and both energies relative to the pool minimum."""
        ok = mask & self.ok
        E_dft = self.E_dft - offset
        diff = self.E_model[ok] - E_dft[ok]
        return {
            "n": int(mask.sum()),
            "n_failed": int((mask & ~self.ok).sum()),
            "energy_mae": _mae(self.E_model[ok], E_dft[ok]),
            "energy_mean_error": float(diff.mean()) if diff.size and np.isfinite(diff).all() else None,
            "forces_mae": _mae(self.F_model[ok], self.F_dft[ok]),
            "model_rel_dft_min": _stats(self.E_model[mask] - pool_min),
            "dft_rel_dft_min": _stats(E_dft[ok] - pool_min),
            "dft_above_pool_min_fraction": float(np.mean(E_dft[ok] > pool_min))
            if ok.any() and math.isfinite(offset) else None,
        }

    def rows(self, offset: float, pool_min: float) -> list[dict[str, Any]]:
        """One CSV row per frame (energies kcal/mol; ``*_rel_dft_min`` relative to the pool's lowest label)."""
        out = []
        for i, r in enumerate(self.results):
            e_al = r.energy - offset
            f_mae = _mae(self.F_model[i : i + 1], r.forces[None])
            out.append({
                "model": self.model, "kind": str(self.kind[i]), "replica": int(self.replica[i]),
                "frame": int(self.frame[i]), "time_ps": float(self.time_ps[i]), "spurious": bool(self.spurious[i]),
                "min_nonbonded_distance": float(self.min_nonbonded_distance[i]),
                "model_energy": float(self.E_model[i]), "label_energy": float(self.E_label[i]),
                "dft_energy": r.energy, "dft_energy_aligned": e_al, "model_minus_dft": float(self.E_model[i]) - e_al,
                "model_rel_dft_min": float(self.E_model[i]) - pool_min, "dft_rel_dft_min": e_al - pool_min,
                "forces_mae": math.nan if f_mae is None else f_mae,
                "status": r.status,
            })
        return out


def _evaluate(fn: EnergyForces | None, R: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model energies and forces of frames R, NaN when there is no model (or no frame)."""
    if fn is None or len(R) == 0:
        return np.full(len(R), np.nan), np.full(R.shape, np.nan)
    E, F = fn(R)
    return np.asarray(E, dtype=float).reshape(len(R)), np.asarray(F, dtype=float).reshape(R.shape)


def run_audit(
    z: np.ndarray,
    reference: Any,
    samples: Mapping[str, SampleRun],
    models: Mapping[str, EnergyForces | None],
    detector: Any,
    settings: DFTSettings,
    config: AuditConfig,
    cache: DFTCache | None = None,
    test: Any | None = None,
    progress: bool = True,
    single_point: Callable[[np.ndarray, np.ndarray, DFTSettings], DFTResult] | None = None,
) -> AuditResult:
    """Audit each model's samples against DFT.

    ``reference`` and ``test`` are :class:`crmse.data.Frames` (labels E kcal/mol, F kcal/mol/Å);
    ``samples[name]`` a :class:`SampleRun`; ``models[name]`` the model as :data:`EnergyForces` (or None:
    then the saved model energies are audited and force errors are not reported); ``detector`` a
    :class:`crmse.observables.SpuriousDetector` built on the reference pool (label energy scale).

    Per model: frames are selected (:func:`select_frames`), DFT is run through the cache, and errors
    model − (DFT − offset) are reported per kind, next to the same error on the offset's reference
    frames (the floor of this comparison: the label/DFT mismatch) and the test-set MAE against labels.
    """
    from crmse.data import stride_to
    from crmse.observables import energy_metrics

    z = np.asarray(z)
    E_pool = np.asarray(reference.E, dtype=float)
    pool_min = float(E_pool.min())

    # 1. The offset, on reference frames evenly spread over the pool in MD17 order (never sampled frames).
    ref_idx = stride_to(np.arange(len(E_pool)), config.n_reference)
    R_ref = round_coordinates(reference.R[ref_idx])
    ref_res = run_dft(z, R_ref, settings, cache, progress, "DFT reference", single_point)
    E_ref_dft = np.array([r.energy for r in ref_res])
    try:
        fit = fit_offset(E_ref_dft, E_pool[ref_idx])
        offset, offset_json = fit.offset, asdict(fit)
    except ValueError as exc:  # every reference SCF failed: say so, carry on with NaN-aligned energies
        offset, offset_json = math.nan, {"error": str(exc)}
    F_ref_dft = np.stack([r.forces for r in ref_res])
    offset_json["label_energy_mae"] = _mae(E_pool[ref_idx], E_ref_dft - offset)
    offset_json["label_forces_mae"] = _mae(reference.F[ref_idx], F_ref_dft)
    all_results = list(ref_res)

    audited: list[AuditedFrames] = []
    per_model: dict[str, Any] = {}
    for name, run in samples.items():
        fn = models.get(name)
        m_out: dict[str, Any] = {}
        # Reference frames through the model: the floor of every sampled-frame error below.
        E_mref, F_mref = _evaluate(fn, R_ref)
        n_ref = len(ref_idx)
        ref_frames = AuditedFrames(
            name, np.full(n_ref, "reference"), np.full(n_ref, -1), np.asarray(reference.md17_index)[ref_idx],
            np.full(n_ref, np.nan), R_ref, E_mref, F_mref, E_pool[ref_idx], np.zeros(n_ref, bool),
            detector.min_nonbonded_distance(R_ref), ref_res,
        )
        m_out["reference_energy_mae"] = _mae(E_mref, E_ref_dft - offset)
        m_out["reference_forces_mae"] = _mae(F_mref, F_ref_dft)
        if test is not None and fn is not None:
            E_t, F_t = _evaluate(fn, np.asarray(test.R))
            m_out["test_energy_mae"] = _mae(E_t, test.E)
            m_out["test_forces_mae"] = _mae(F_t, test.F)

        # 2. Choose frames, DFT them, and put the model's claim next to DFT's answer.
        valid = np.asarray(run.valid, dtype=bool)
        T, M = run.E.shape
        spur_all = np.asarray(detector(run.R, run.E), dtype=bool) & valid
        seed = (config.seed, zlib.crc32(name.encode()))  # per model, independent of the models' order
        picks = select_frames(run.E, valid, spur_all, config.n_lowest, config.n_spurious, config.n_random, seed)
        t = np.array([p.t for p in picks], dtype=int)
        m = np.array([p.m for p in picks], dtype=int)
        R_sel = round_coordinates(run.R[t, m]).reshape(len(picks), len(z), 3)
        res = run_dft(z, R_sel, settings, cache, progress, f"DFT {name}", single_point)
        all_results += res
        E_saved = run.E[t, m].astype(float)
        E_model, F_model = _evaluate(fn, R_sel)
        if fn is None:
            E_model = E_saved
        else:  # the claim audited is the model at the exact geometry DFT saw (rounded float32 positions)
            m_out["model_energy_recompute_max_abs"] = float(np.abs(E_model - E_saved).max()) if len(t) else None
        time_ps = np.asarray(run.time_ps, dtype=float)[t] if run.time_ps is not None else np.full(len(t), np.nan)
        sel = AuditedFrames(
            name, np.array([p.kind for p in picks], dtype=str), m, t, time_ps, R_sel, E_model, F_model,
            np.full(len(t), np.nan), spur_all[t, m], detector.min_nonbonded_distance(R_sel), res,
        )
        audited += [ref_frames, sel]

        m_out.update({
            "n_frames": int(T * M),
            "n_valid_frames": int(valid.sum()),
            "spurious_frame_fraction": float(spur_all.sum() / max(valid.sum(), 1)),
            "spurious_replica_fraction": float(spur_all.any(0).mean()) if M else None,
            "n_selected": {k: int((sel.kind == k).sum()) for k in KINDS},
            "n_failed": int((~sel.ok).sum()),
            "random": sel.group(sel.kind == "random", offset, pool_min),
            "lowest": sel.group(sel.kind == "lowest", offset, pool_min),
            # Every audited frame the detector flags, the lowest-energy picks included.
            "spurious": sel.group(sel.spurious, offset, pool_min),
        })
        # 3. Do the sampled frames, as DFT sees them, follow the reference energy distribution?
        rnd = (sel.kind == "random") & sel.ok
        if rnd.any() and math.isfinite(offset):
            dft_m = energy_metrics(sel.E_dft[rnd] - offset, E_pool)
            m_out["random_dft_energy_w1"] = dft_m["energy_w1"]
            m_out["random_dft_energy_mean_shift"] = dft_m["energy_mean_shift"]
            m_out["random_model_energy_w1"] = energy_metrics(sel.E_model[rnd], E_pool)["energy_w1"]
            m_out["random_energy_w1_floor"] = _w1_floor(E_pool, int(rnd.sum()), config.w1_floor_draws, config.seed)
        per_model[name] = m_out

    computed = list({id(r): r for r in all_results if not r.cached}.values())  # a duplicate geometry ran once
    timed = [r.seconds for r in all_results if r.status != "error"]
    metrics = {
        "settings": settings.key_fields(),
        "offset": offset_json,
        "reference_pool": {"n": len(E_pool), "energy_min": pool_min, "energy_mean": float(E_pool.mean()),
                           "n_offset_frames": len(ref_idx)},
        "dft": {"n_frames": len(all_results), "n_failed": int(sum(not r.ok for r in all_results))},
        "models": per_model,
    }
    timing = {
        "n_computed": len(computed),
        "n_cached": len(all_results) - len(computed),
        "seconds_per_frame": float(np.mean(timed)) if timed else None,
        "seconds_per_frame_this_run": float(np.mean([r.seconds for r in computed])) if computed else None,
    }
    rows = [row for a in audited for row in a.rows(offset, pool_min)]
    return AuditResult(metrics, rows, _stack_arrays(z, audited), timing)


def _stack_arrays(z: np.ndarray, audited: Sequence[AuditedFrames]) -> dict[str, np.ndarray]:
    """Per-frame arrays of all audited frames (for the report's drawings), in the CSV's row order."""
    n = len(z)

    def cat(get: Callable[[AuditedFrames], np.ndarray], empty: np.ndarray) -> np.ndarray:
        parts = [np.asarray(get(a)) for a in audited]
        return np.concatenate(parts) if parts else empty

    return {
        "z": np.asarray(z),
        "model": cat(lambda a: np.full(len(a.results), a.model), np.zeros(0, dtype="<U1")),
        "kind": cat(lambda a: a.kind.astype(str), np.zeros(0, dtype="<U1")),
        "replica": cat(lambda a: a.replica, np.zeros(0, int)),
        "frame": cat(lambda a: a.frame, np.zeros(0, int)),
        "R": cat(lambda a: a.R, np.zeros((0, n, 3))),
        "model_energy": cat(lambda a: a.E_model, np.zeros(0)),
        "model_forces": cat(lambda a: a.F_model, np.zeros((0, n, 3))),
        "label_energy": cat(lambda a: a.E_label, np.zeros(0)),
        "dft_energy": cat(lambda a: a.E_dft, np.zeros(0)),
        "dft_forces": cat(lambda a: a.F_dft, np.zeros((0, n, 3))),
        "status": cat(lambda a: np.array([r.status for r in a.results], dtype=str), np.zeros(0, dtype="<U1")),
    }


ROW_FIELDS = (
    "model", "kind", "replica", "frame", "time_ps", "spurious", "min_nonbonded_distance", "model_energy",
    "label_energy", "dft_energy", "dft_energy_aligned", "model_minus_dft", "model_rel_dft_min", "dft_rel_dft_min",
    "forces_mae", "status",
)


def write_rows_csv(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Per-frame table (one row per audited frame; NaN written as empty), atomically.

    Columns (:data:`ROW_FIELDS`): model; kind (reference | lowest | spurious | random); replica and
    saved-frame index (reference rows: replica −1 and the MD17 frame index); time_ps; spurious flag;
    shortest non-bonded distance (Å); model_energy, label_energy (reference rows), dft_energy (raw
    PBE/def2-SVP) and dft_energy_aligned (DFT − offset, the label scale), model_minus_dft,
    model_rel_dft_min and dft_rel_dft_min (relative to the reference pool's lowest label), all in
    kcal/mol; forces_mae (model vs DFT, kcal/mol/Å); DFT status.
    """
    import csv

    from crmse.io import atomic_path

    def fmt(v: Any) -> Any:
        if isinstance(v, float):
            return "" if not math.isfinite(v) else f"{v:.6f}"
        return v

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=ROW_FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow({k: fmt(r[k]) for k in ROW_FIELDS})
