"""Observables and metrics of docs/method.md §6: one implementation for the DFT reference pool and every sampler.

Everything here takes plain frames — positions R (..., n, 3) in Å and energies in kcal/mol — so the
DFT reference pool, the MSE model's samples and the CRMSE model's samples go through identical code.

* stability: first saved frame where a covalent bond deviates > tolerance Å from its reference mean
  (Fu et al., "Forces are not enough", TMLR 2023);
* spurious states: :class:`SpuriousDetector` (energy far below the DFT minimum, or a non-bonded pair
  closer than anything in the reference pool), reusable on numpy or torch batches;
* energy distribution: histogram, Wasserstein-1 distance and mean shift;
* h(r): Fu et al.'s MDsim ``get_hr`` (all pair distances, edges ``linspace(1e-6, 10, 501)`` Å,
  ``density=True``) and its MAE = 10·mean|Δh| = ∫|Δh| dr;
* dihedrals (IUPAC sign, degrees in (−180, 180]) and F(φ) = −k_B T ln p(φ);
* the noise floor: the same metrics between two halves of the reference pool made of contiguous
  blocks in MD17 frame order (neighbouring MD17 frames are correlated, so random halves understate it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import wasserstein_distance

from crmse.geometry import bond_graph, bond_lengths, nonbonded_pairs
from crmse.molecules import Torsion
from crmse.units import KB

#: h(r) histogram of Fu et al. (MDsim ``observable.ipynb``): 500 bins on [1e-6, 10] Å. The lower edge
#: 1e-6 drops the zero self-distances of their ``torch.cdist(traj, traj)``; counting i<j pairs only, as
#: here, gives the same normalised histogram (every pair appears twice there).
HR_RMAX = 10.0
HR_EDGES = np.linspace(1e-6, HR_RMAX, 501)

_CHUNK_FRAMES = 4096  # frames per chunk when histogramming, to bound memory


def _as_frames(R: np.ndarray) -> np.ndarray:
    R = np.asarray(R, dtype=np.float64)
    if R.ndim < 2 or R.shape[-1] != 3:
        raise ValueError(f"positions must have shape (..., n_atoms, 3), got {R.shape}")
    return R.reshape(-1, R.shape[-2], 3)


# ----------------------------------------------------------------------------------------------------
# Bonds and stability


@dataclass(frozen=True)
class BondReference:
    """Covalent bonds (n_bonds, 2) and their mean lengths (Å) over the reference pool."""

    bonds: np.ndarray
    mean_lengths: np.ndarray

    @classmethod
    def from_frames(cls, z: np.ndarray, R: np.ndarray, factor: float = 1.3) -> BondReference:
        """Bond graph of the reference frames (majority vote, ``crmse.geometry.bond_graph``) and means."""
        R = _as_frames(R)
        bonds = bond_graph(z, R, factor)
        if len(bonds) == 0:
            raise ValueError("no covalent bonds found in the reference frames (wrong units? expected Å)")
        return cls(bonds, bond_lengths(R, bonds).mean(0))

    def max_deviation(self, R: np.ndarray) -> np.ndarray:
        """Largest |bond length − reference mean| (Å) per frame of R (..., n, 3) → (...); NaN frames → inf."""
        dev = np.abs(bond_lengths(np.asarray(R, dtype=np.float64), self.bonds) - self.mean_lengths).max(-1)
        return np.where(np.isfinite(dev), dev, np.inf)


def first_unstable_frame(
    R: np.ndarray, bonds: BondReference, tolerance: float = 0.5, unstable_frame: np.ndarray | None = None
) -> np.ndarray:
    """First saved frame index per replica at which a bond deviates > ``tolerance`` Å (−1 = never).

    R has shape (T, M, n, 3) (saved frames × replicas). A non-finite frame counts as unstable, and an
    ``unstable_frame`` already recorded by the sampler (−1 = none) is honoured: the earlier one wins.
    """
    R = np.asarray(R)
    if R.ndim != 4:
        raise ValueError(f"trajectories must have shape (T, M, n_atoms, 3), got {R.shape}")
    bad = bonds.max_deviation(R) > tolerance  # (T, M)
    first = np.where(bad.any(0), bad.argmax(0), -1)
    if unstable_frame is not None:
        rec = np.asarray(unstable_frame)
        if rec.shape != first.shape:
            raise ValueError(f"unstable_frame has shape {rec.shape}, expected {first.shape}")
        both = (first >= 0) & (rec >= 0)
        first = np.where(both, np.minimum(first, rec), np.where(first >= 0, first, rec))
    return first.astype(np.int64)


def valid_mask(unstable_frame: np.ndarray, n_frames: int) -> np.ndarray:
    """(T, M) boolean mask of frames strictly before each replica's instability."""
    uf = np.asarray(unstable_frame)
    limit = np.where(uf < 0, n_frames, uf)
    return np.arange(n_frames)[:, None] < limit[None, :]


def stability_summary(unstable_frame: np.ndarray, time_ps: np.ndarray) -> dict[str, float]:
    """Fraction of replicas stable to the end and median time to instability (ps).

    A replica that never becomes unstable counts with the full trajectory length (right-censored), so
    the median is a lower bound when more than half of the replicas survive.
    """
    uf = np.asarray(unstable_frame)
    t = np.asarray(time_ps, dtype=float)
    t_fail = np.where(uf < 0, t[-1], t[np.clip(uf, 0, len(t) - 1)])
    return {
        "stable_fraction": float(np.mean(uf < 0)),
        "median_time_to_instability_ps": float(np.median(t_fail)),
        "trajectory_ps": float(t[-1]),
    }


def stable_fraction_curve(unstable_frame: np.ndarray, n_frames: int) -> np.ndarray:
    """Fraction of replicas still stable at each saved frame, shape (T,)."""
    return valid_mask(unstable_frame, n_frames).mean(1)


# ----------------------------------------------------------------------------------------------------
# Spurious states


@dataclass
class SpuriousDetector:
    """Flags configurations the DFT reference pool never visits (docs/method.md §6, "Spurious-state detector").

    A frame is spurious if its model energy is below ``energy_threshold`` (the pool's lowest DFT energy
    minus a margin) or if some non-bonded pair is closer than ``distance_threshold`` (the pool's shortest
    non-bonded distance minus a margin). Build once with :meth:`from_reference`; call on positions
    (..., n, 3) and optionally energies (...), numpy or torch (no host round-trip for torch).
    """

    pairs: np.ndarray  # (n_pairs, 2) non-bonded pairs
    energy_min: float  # lowest DFT energy of the pool, kcal/mol
    distance_min: float  # shortest non-bonded distance in the pool, Å
    energy_margin: float
    distance_margin: float
    _torch_pairs: dict[Any, torch.Tensor] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_reference(
        cls,
        z: np.ndarray,
        R: np.ndarray,
        E: np.ndarray,
        bonds: np.ndarray,
        energy_margin: float = 5.0,
        distance_margin: float = 0.25,
    ) -> SpuriousDetector:
        """Thresholds from the reference pool (R (N, n, 3) Å, DFT E (N,) kcal/mol, bonds (n_bonds, 2))."""
        R = _as_frames(R)
        E = np.asarray(E, dtype=np.float64).reshape(-1)
        if len(E) != len(R) or len(R) == 0:
            raise ValueError(f"reference pool needs matching non-empty R and E, got {len(R)} and {len(E)} frames")
        pairs = nonbonded_pairs(len(z), np.asarray(bonds))
        if len(pairs) == 0:
            raise ValueError("molecule has no non-bonded pairs")
        det = cls(pairs, float(E.min()), np.inf, float(energy_margin), float(distance_margin))
        det.distance_min = float(det.min_nonbonded_distance(R).min())
        return det

    @property
    def energy_threshold(self) -> float:
        return self.energy_min - self.energy_margin

    @property
    def distance_threshold(self) -> float:
        return self.distance_min - self.distance_margin

    def _pairs_for(self, R: Any) -> tuple[Any, Any]:
        if isinstance(R, torch.Tensor):
            key = R.device
            if key not in self._torch_pairs:
                self._torch_pairs[key] = torch.as_tensor(self.pairs, device=R.device)
            p = self._torch_pairs[key]
            return p[:, 0], p[:, 1]
        return self.pairs[:, 0], self.pairs[:, 1]

    def min_nonbonded_distance(self, R: Any) -> Any:
        """Shortest non-bonded distance (Å) per frame of R (..., n, 3) → (...)."""
        i, j = self._pairs_for(R)
        if isinstance(R, torch.Tensor):
            return torch.linalg.vector_norm(R[..., j, :] - R[..., i, :], dim=-1).amin(-1)
        R = np.asarray(R)
        flat = R.reshape(-1, *R.shape[-2:])  # chunked: (T·M, n_pairs, 3) of a long run is large
        out = np.empty(len(flat))
        for s in range(0, len(flat), _CHUNK_FRAMES):
            c = flat[s : s + _CHUNK_FRAMES]
            out[s : s + len(c)] = np.linalg.norm(c[:, j] - c[:, i], axis=-1).min(-1)
        return out.reshape(R.shape[:-2])

    def flags(self, R: Any, E: Any | None = None) -> tuple[Any, Any]:
        """(energy_flag, distance_flag) per frame; the energy flag is all-False when E is None.

        Non-finite frames (a replica frozen after blowing up) are never flagged: they compare False.
        """
        close = self.min_nonbonded_distance(R) < self.distance_threshold
        if E is None:
            low = torch.zeros_like(close) if isinstance(close, torch.Tensor) else np.zeros_like(close)
        else:
            low = E < self.energy_threshold
        return low, close

    def __call__(self, R: Any, E: Any | None = None) -> Any:
        """Boolean spurious flag per frame of R (..., n, 3) [and E (...)], same array type as R."""
        low, close = self.flags(R, E)
        return low | close

    def summary(self, R: np.ndarray, E: np.ndarray, valid: np.ndarray, time_ps: np.ndarray) -> dict[str, Any]:
        """Occupancy of spurious states in trajectories R (T, M, n, 3), E (T, M), valid (T, M) mask.

        Returns the fraction of replicas that ever enter one, the fraction of valid frames spent there,
        the median and earliest time of first entry (ps; None if no replica enters), the fraction of
        replicas entering by each criterion, and the lowest model energy relative to the DFT minimum.
        """
        R, E, valid = np.asarray(R), np.asarray(E), np.asarray(valid, dtype=bool)
        low, close = self.flags(R, E)
        low, close = low & valid, close & valid
        spur = low | close
        entered = spur.any(0)
        t = np.asarray(time_ps, dtype=float)
        first = t[spur.argmax(0)][entered]
        any_valid = bool(valid.any())
        d_min = np.where(valid, self.min_nonbonded_distance(R), np.inf).min()
        return {
            "spurious_replica_fraction": float(entered.mean()),
            "spurious_frame_fraction": float(spur.sum() / max(valid.sum(), 1)),
            "spurious_energy_replica_fraction": float(low.any(0).mean()),
            "spurious_distance_replica_fraction": float(close.any(0).mean()),
            "spurious_first_entry_median_ps": float(np.median(first)) if len(first) else None,
            "spurious_first_entry_min_ps": float(first.min()) if len(first) else None,
            "lowest_energy_rel_dft_min": float(E[valid].min() - self.energy_min) if any_valid else None,
            "min_nonbonded_distance": float(d_min) if any_valid else None,
        }


# ----------------------------------------------------------------------------------------------------
# Energy distribution


def energy_edges(reference: np.ndarray, others: Sequence[np.ndarray], bins: int) -> np.ndarray:
    """Common histogram edges (kcal/mol): the reference range widened to each other source's 1–99 % range."""
    ref = np.asarray(reference, dtype=float)
    lo, hi = float(ref.min()), float(ref.max())
    for e in others:
        e = np.asarray(e, dtype=float)
        e = e[np.isfinite(e)]
        if len(e):
            q = np.quantile(e, [0.01, 0.99])
            lo, hi = min(lo, float(q[0])), max(hi, float(q[1]))
    return np.linspace(lo, hi, bins + 1)


def energy_histogram(E: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Density of energies E on ``edges`` (normalised by ALL frames, so mass outside the range is missing)."""
    E = np.asarray(E, dtype=float)
    E = E[np.isfinite(E)]
    counts, _ = np.histogram(E, edges)
    return counts / (max(len(E), 1) * np.diff(edges))


def energy_metrics(E_sim: np.ndarray, E_ref: np.ndarray) -> dict[str, float]:
    """Wasserstein-1 distance (kcal/mol) and mean shift ⟨E_sim⟩ − ⟨E_ref⟩ between energy samples."""
    a = np.asarray(E_sim, dtype=float).reshape(-1)
    b = np.asarray(E_ref, dtype=float).reshape(-1)
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    if len(a) == 0 or len(b) == 0:
        raise ValueError("energy_metrics needs finite energies on both sides")
    return {"energy_w1": float(wasserstein_distance(a, b)), "energy_mean_shift": float(a.mean() - b.mean())}


# ----------------------------------------------------------------------------------------------------
# h(r)


def hr_histogram(R: np.ndarray, edges: np.ndarray = HR_EDGES) -> np.ndarray:
    """h(r): density histogram of all pair distances (Å) over frames R (..., n, 3), as MDsim ``get_hr``.

    Non-finite frames are skipped. Normalised to unit area over the distances inside ``edges``
    (``np.histogram(..., density=True)``).
    """
    frames = _as_frames(R)
    frames = frames[np.isfinite(frames).all((1, 2))]
    if len(frames) == 0:
        raise ValueError("h(r) needs at least one finite frame")
    iu, ju = np.triu_indices(frames.shape[1], 1)
    counts = np.zeros(len(edges) - 1)
    for s in range(0, len(frames), _CHUNK_FRAMES):
        chunk = frames[s : s + _CHUNK_FRAMES]
        d = np.linalg.norm(chunk[:, ju] - chunk[:, iu], axis=-1)
        counts += np.histogram(d, edges)[0]
    return counts / (counts.sum() * np.diff(edges))


def hr_mae(h_sim: np.ndarray, h_ref: np.ndarray, rmax: float = HR_RMAX) -> float:
    """Fu et al.'s h(r) MAE: rmax·mean|h_sim − h_ref| (= ∫|Δh| dr on the uniform 0–10 Å grid)."""
    return float(np.abs(np.asarray(h_sim) - np.asarray(h_ref)).mean() * rmax)


# ----------------------------------------------------------------------------------------------------
# Dihedrals


def dihedral(R: np.ndarray, quad: Sequence[int]) -> np.ndarray:
    """Dihedral angle i–j–k–l in degrees, IUPAC sign, in (−180, 180]; R (..., n, 3) → (...).

    Positive when, looking along j→k, the bond j–i must turn clockwise to eclipse k–l.
    """
    R = np.asarray(R, dtype=np.float64)
    i, j, k, l = quad
    b1 = R[..., j, :] - R[..., i, :]
    b2 = R[..., k, :] - R[..., j, :]
    b3 = R[..., l, :] - R[..., k, :]
    n2 = np.cross(b2, b3)
    y = np.linalg.norm(b2, axis=-1) * np.einsum("...a,...a->...", b1, n2)
    x = np.einsum("...a,...a->...", np.cross(b1, b2), n2)
    phi = np.degrees(np.arctan2(y, x))
    return np.where(phi <= -180.0, phi + 360.0, phi)


def torsion_angles(R: np.ndarray, torsion: Torsion) -> np.ndarray:
    """All angles (degrees) of a torsion's quadruples over frames R (..., n, 3), pooled and flattened."""
    return np.concatenate([dihedral(R, q).reshape(-1) for q in torsion.atoms])


def dihedral_edges(bins: int) -> np.ndarray:
    """``bins`` equal bins on [−180, 180] degrees."""
    return np.linspace(-180.0, 180.0, bins + 1)


def dihedral_free_energy(phi: np.ndarray, bins: int, temperature: float) -> np.ndarray:
    """F(φ) = −k_B T ln p(φ) (kcal/mol), min-shifted to 0; NaN in bins no angle falls into.

    ``phi`` in degrees; periodic by construction (angles live in (−180, 180], one bin set covers it).
    """
    phi = np.asarray(phi, dtype=float)
    phi = phi[np.isfinite(phi)]
    if len(phi) == 0:
        raise ValueError("F(φ) needs at least one finite angle")
    counts, _ = np.histogram(phi, dihedral_edges(bins))
    with np.errstate(divide="ignore"):
        F = -KB * temperature * np.log(counts / counts.sum())
    F[counts == 0] = np.nan
    return F - np.nanmin(F)


def dihedral_metrics(F_sim: np.ndarray, F_ref: np.ndarray) -> dict[str, float | None]:
    """RMSE (kcal/mol) over bins populated in both, and the fraction of reference bins never visited."""
    F_sim, F_ref = np.asarray(F_sim), np.asarray(F_ref)
    ref, sim = np.isfinite(F_ref), np.isfinite(F_sim)
    both = ref & sim
    rmse = float(np.sqrt(np.mean((F_sim[both] - F_ref[both]) ** 2))) if both.any() else None
    return {"rmse": rmse, "unvisited": float((ref & ~sim).sum() / max(ref.sum(), 1))}


# ----------------------------------------------------------------------------------------------------
# Whole-distribution comparison and noise floor


@dataclass
class Distributions:
    """The distribution observables of one source (reference pool, a half of it, or a sampler)."""

    energies: np.ndarray  # (N,) kcal/mol
    hr: np.ndarray  # (500,) density on HR_EDGES
    free_energy: dict[str, np.ndarray]  # torsion name → F(φ) (bins,) kcal/mol, NaN = unvisited


def distributions(
    R: np.ndarray, E: np.ndarray, torsions: Sequence[Torsion], dihedral_bins: int, temperature: float
) -> Distributions:
    """Energies, h(r) and F(φ) per torsion of frames R (N, n, 3), E (N,) (only finite frames are used)."""
    R = _as_frames(R)
    E = np.asarray(E, dtype=float).reshape(-1)
    if len(E) != len(R):
        raise ValueError(f"R has {len(R)} frames but E has {len(E)}")
    ok = np.isfinite(R).all((1, 2)) & np.isfinite(E)
    R, E = R[ok], E[ok]
    return Distributions(
        energies=E,
        hr=hr_histogram(R),
        free_energy={t.name: dihedral_free_energy(torsion_angles(R, t), dihedral_bins, temperature) for t in torsions},
    )


def compare(sim: Distributions, ref: Distributions) -> dict[str, float | None]:
    """Flat metrics of ``sim`` against ``ref``: energy W1 and shift, h(r) MAE, F(φ) RMSE/unvisited per torsion."""
    out: dict[str, float | None] = dict(energy_metrics(sim.energies, ref.energies))
    out["hr_mae"] = hr_mae(sim.hr, ref.hr)
    for name, F_ref in ref.free_energy.items():
        m = dihedral_metrics(sim.free_energy[name], F_ref)
        out[f"dihedral_{name}_rmse"] = m["rmse"]
        out[f"dihedral_{name}_unvisited"] = m["unvisited"]
    return out


def replica_bootstrap(
    R: np.ndarray,
    E: np.ndarray,
    valid: np.ndarray,
    ref: Distributions,
    torsions: Sequence[Torsion],
    dihedral_bins: int,
    temperature: float,
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, float | None]:
    """Sampling uncertainty of the :func:`compare` metrics: standard deviation over replica bootstraps.

    Replicas, not frames, are the independent units (frames of one trajectory are correlated): each
    draw resamples the M replicas of R (T, M, n, 3), E (T, M) with replacement, keeping each one's
    ``valid`` (T, M) frames, and recomputes the metrics against the fixed reference ``ref``. Per-replica
    histograms are built once, so a draw costs a weighted sum. Returns ``<metric>_boot_sd`` for energy
    W1 and mean shift, h(r) MAE and each torsion's F(φ) RMSE (None when undefined: fewer than two
    replicas with valid frames, fewer than two draws, or undefined in most draws).
    """
    names = ["energy_w1", "energy_mean_shift", "hr_mae", *(f"dihedral_{t.name}_rmse" for t in torsions)]
    R, E, valid = np.asarray(R), np.asarray(E, dtype=float), np.asarray(valid, dtype=bool)
    M = R.shape[1]
    keep = [m for m in range(M) if valid[:, m].any()]
    if len(keep) < 2 or n_boot < 2:
        return {f"{k}_boot_sd": None for k in names}
    iu, ju = np.triu_indices(R.shape[2], 1)
    hr_counts, phi_counts, energies = [], {t.name: [] for t in torsions}, []
    edges_phi = dihedral_edges(dihedral_bins)
    for m in keep:
        Rm = R[valid[:, m], m]
        d = np.linalg.norm(Rm[:, ju] - Rm[:, iu], axis=-1)
        hr_counts.append(np.histogram(d, HR_EDGES)[0])
        for t in torsions:
            phi_counts[t.name].append(np.histogram(torsion_angles(Rm, t), edges_phi)[0])
        energies.append(E[valid[:, m], m])
    hr_counts_a = np.asarray(hr_counts, dtype=float)
    lengths = np.array([len(e) for e in energies])
    E_all = np.concatenate(energies)
    rng = np.random.default_rng(seed)
    draws: dict[str, list[float]] = {k: [] for k in names}
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, len(keep), len(keep)), minlength=len(keep)).astype(float)
        fw = np.repeat(w, lengths)  # per-frame weights
        draws["energy_w1"].append(float(wasserstein_distance(E_all, ref.energies, u_weights=fw)))
        draws["energy_mean_shift"].append(float(np.average(E_all, weights=fw) - ref.energies.mean()))
        counts = w @ hr_counts_a
        draws["hr_mae"].append(hr_mae(counts / (counts.sum() * np.diff(HR_EDGES)), ref.hr))
        for t in torsions:
            c = w @ np.asarray(phi_counts[t.name], dtype=float)
            with np.errstate(divide="ignore"):
                F = -KB * temperature * np.log(c / c.sum())
            F[c == 0] = np.nan
            rmse = dihedral_metrics(F - np.nanmin(F), ref.free_energy[t.name])["rmse"]
            draws[f"dihedral_{t.name}_rmse"].append(np.nan if rmse is None else rmse)
    out: dict[str, float | None] = {}
    for key, vals in draws.items():
        v = np.asarray(vals, dtype=float)
        v = v[np.isfinite(v)]
        out[f"{key}_boot_sd"] = float(v.std(ddof=1)) if len(v) > n_boot // 2 else None
    return out


def contiguous_halves(md17_index: np.ndarray, n_blocks: int) -> tuple[np.ndarray, np.ndarray]:
    """Positions of two halves of a pool: ``n_blocks`` contiguous blocks in MD17 frame order, alternately assigned.

    Returns (a, b): indices into the pool (each sorted by md17_index). Even blocks go to a, odd to b.
    """
    idx = np.asarray(md17_index)
    if n_blocks < 2 or n_blocks > len(idx):
        raise ValueError(f"noise floor needs 2 <= n_blocks <= pool size ({len(idx)}), got {n_blocks}")
    order = np.argsort(idx, kind="stable")
    blocks = np.array_split(order, n_blocks)
    return np.concatenate(blocks[0::2]), np.concatenate(blocks[1::2])


def noise_floor(
    R: np.ndarray,
    E: np.ndarray,
    md17_index: np.ndarray,
    torsions: Sequence[Torsion],
    n_blocks: int,
    dihedral_bins: int,
    temperature: float,
) -> dict[str, float | None]:
    """The distribution metrics of :func:`compare` between the two contiguous-block halves of the pool."""
    a, b = contiguous_halves(md17_index, n_blocks)
    R, E = np.asarray(R), np.asarray(E)
    da = distributions(R[a], E[a], torsions, dihedral_bins, temperature)
    db = distributions(R[b], E[b], torsions, dihedral_bins, temperature)
    return compare(db, da)


# ----------------------------------------------------------------------------------------------------
# Temperatures


def kinetic_temperature(T_kin: np.ndarray, valid: np.ndarray) -> float | None:
    """Mean instantaneous kinetic temperature (K) over valid frames."""
    T_kin = np.asarray(T_kin, dtype=float)
    ok = np.asarray(valid) & np.isfinite(T_kin)
    return float(T_kin[ok].mean()) if ok.any() else None


def evenly_spaced(n: int, k: int) -> np.ndarray:
    """min(k, n) indices spread evenly over range(n) (deterministic subsampling, e.g. for T_conf)."""
    if n <= 0 or k <= 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n - 1, min(k, n)).round().astype(np.int64))
