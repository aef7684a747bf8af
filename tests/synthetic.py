"""Tiny synthetic MD17-like data for tests: never the network, never the real data set.

Geometries are the checked-in first MD17 frame (one per molecule) with Gaussian
noise; energies and forces come from a harmonic potential on the covalent bonds,
offset to the molecule's real total-energy scale so that unit checks pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"


def reference_frame(molecule: str) -> tuple[np.ndarray, np.ndarray, float]:
    """(z, R [Å], E [kcal/mol]) of the checked-in first MD17 frame."""
    d = json.loads((FIXTURES / f"{molecule}_frame.json").read_text())
    return np.array(d["z"]), np.array(d["R"]), float(d["E"])


def bonds_of(z: np.ndarray, R: np.ndarray, factor: float = 1.3) -> np.ndarray:
    from ase.data import covalent_radii

    r = covalent_radii[z]
    d = np.linalg.norm(R[:, None] - R[None], axis=-1)
    i, j = np.nonzero(np.triu(d < factor * (r[:, None] + r[None]), 1))
    return np.stack([i, j], 1)


def harmonic_bond_energy(R: np.ndarray, bonds: np.ndarray, r0: np.ndarray, k: float) -> tuple[np.ndarray, np.ndarray]:
    """E = Σ k/2 (|r_ij| − r0)² and F = −∂E/∂R for frames R (N, n, 3)."""
    vec = R[:, bonds[:, 1]] - R[:, bonds[:, 0]]
    d = np.linalg.norm(vec, axis=-1)
    E = 0.5 * k * ((d - r0) ** 2).sum(-1)
    g = (k * (d - r0) / d)[..., None] * vec  # dE/d(R_j) for each bond
    F = np.zeros_like(R)
    np.add.at(F, (slice(None), bonds[:, 1]), -g)
    np.add.at(F, (slice(None), bonds[:, 0]), g)
    return E, F


def synthetic_arrays(molecule: str = "ethanol", n: int = 120, seed: int = 0, noise: float = 0.04) -> dict:
    """sGDML-layout arrays (z, R, E (N, 1), F, md17_index) of ``n`` noisy frames."""
    z, R0, E0 = reference_frame(molecule)
    rng = np.random.default_rng(seed)
    R = R0[None] + noise * rng.standard_normal((n, len(z), 3))
    bonds = bonds_of(z, R0)
    r0 = np.linalg.norm(R0[bonds[:, 1]] - R0[bonds[:, 0]], axis=-1)
    E, F = harmonic_bond_energy(R, bonds, r0, k=300.0)
    return {
        "z": z.astype(np.uint8),
        "R": R,
        "E": (E0 + E)[:, None],
        "F": F,
        "md17_index": np.arange(n) * 40 + 7,
    }


def write_synthetic_npz(path: Path, molecule: str = "ethanol", n: int = 120, seed: int = 0, **override) -> Path:
    arrays = synthetic_arrays(molecule, n, seed)
    arrays.update(override)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)
    return path


def collapse_methyl_h(R: np.ndarray, d: float = 0.8) -> np.ndarray:
    """Swing ethanol's methyl H 6 about its carbon (C 1, bond length kept) to ``d`` Å from methyl H 5.

    This is the spurious state of docs/method.md §1 and §6: two methyl H collapse while every bond keeps its
    length, so the bond criterion calls it stable.
    """
    R = R.copy()
    a, b = R[..., 5, :] - R[..., 1, :], R[..., 6, :] - R[..., 1, :]
    ra, rb = np.linalg.norm(a, axis=-1, keepdims=True), np.linalg.norm(b, axis=-1, keepdims=True)
    e1 = a / ra
    e2 = b - (b * e1).sum(-1, keepdims=True) * e1
    e2 /= np.linalg.norm(e2, axis=-1, keepdims=True)
    cos = (ra**2 + rb**2 - d**2) / (2 * ra * rb)
    R[..., 6, :] = R[..., 1, :] + rb * (cos * e1 + np.sqrt(1 - cos**2) * e2)
    return R
