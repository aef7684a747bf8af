"""Geometry shared by the engine, the chains and the observables: bond graph and distances.

Works on numpy arrays and on torch tensors (same code path where possible).
"""

from __future__ import annotations

import numpy as np
from ase.data import covalent_radii


def pair_distances(R: np.ndarray) -> np.ndarray:
    """All pair distances |R_i − R_j| (Å), shape (..., n, n)."""
    return np.linalg.norm(R[..., :, None, :] - R[..., None, :, :], axis=-1)


def bond_graph(z: np.ndarray, R: np.ndarray, factor: float = 1.3) -> np.ndarray:
    """Covalent bonds (i < j) of a reference frame: d_ij < factor·(r_cov,i + r_cov,j) (ASE radii).

    ``R`` may be one frame (n, 3) or several (N, n, 3); then a pair is bonded when it
    is bonded in the mean over frames of the per-frame test (majority vote), which
    keeps the graph stable across a hot trajectory. Returns (n_bonds, 2) int array.
    """
    R = np.asarray(R, dtype=float)
    frames = R[None] if R.ndim == 2 else R
    r = covalent_radii[np.asarray(z, dtype=int)]
    bonded = (pair_distances(frames) < factor * (r[:, None] + r[None, :])).mean(0) > 0.5
    i, j = np.nonzero(np.triu(bonded, 1))
    return np.stack([i, j], axis=1).astype(np.int64)


def bond_lengths(R: np.ndarray, bonds: np.ndarray) -> np.ndarray:
    """Lengths (Å) of ``bonds`` in frames R (..., n, 3) → (..., n_bonds)."""
    return np.linalg.norm(R[..., bonds[:, 1], :] - R[..., bonds[:, 0], :], axis=-1)


def nonbonded_pairs(n_atoms: int, bonds: np.ndarray) -> np.ndarray:
    """All pairs (i < j) that are not bonds, shape (n_pairs, 2)."""
    mask = np.triu(np.ones((n_atoms, n_atoms), dtype=bool), 1)
    mask[bonds[:, 0], bonds[:, 1]] = False
    i, j = np.nonzero(mask)
    return np.stack([i, j], axis=1).astype(np.int64)
