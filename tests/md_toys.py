"""Toy potentials (torch) standing in for the SchNet model in the Langevin/temperature/sampling tests.

Each is frame-separable and returns E (B,) float64 and F = −∂E/∂R (B, n, 3) by autograd,
i.e. it follows the ``energy_forces`` contract of crmse.langevin.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from synthetic import bonds_of, reference_frame


class BondPotential:
    """Harmonic (E = k/2 (d − r0)²) or Morse (E = D (1 − e^{−a (d − r0)})²) bonds, kcal/mol and Å."""

    def __init__(self, bonds: np.ndarray, r0: np.ndarray, k: float = 300.0, morse_a: float | None = None) -> None:
        self.bonds = torch.as_tensor(np.asarray(bonds), dtype=torch.long)
        self.r0 = torch.as_tensor(np.asarray(r0), dtype=torch.float64)
        self.k = k
        self.morse_a = morse_a
        self.calls = 0

    @classmethod
    def for_molecule(cls, molecule: str = "ethanol", **kw) -> tuple[BondPotential, np.ndarray, np.ndarray]:
        """(potential, z, R0) with bonds and rest lengths of the checked-in MD17 frame."""
        z, R0, _ = reference_frame(molecule)
        bonds = bonds_of(z, R0)
        r0 = np.linalg.norm(R0[bonds[:, 1]] - R0[bonds[:, 0]], axis=-1)
        return cls(bonds, r0, **kw), z, R0

    def energy(self, R: torch.Tensor) -> torch.Tensor:
        d = (R[:, self.bonds[:, 1]] - R[:, self.bonds[:, 0]]).norm(dim=-1)
        x = d - self.r0.to(R.dtype)
        if self.morse_a is None:
            e = 0.5 * self.k * x * x
        else:  # same curvature k at the minimum: D = k / (2 a²)
            D = self.k / (2 * self.morse_a**2)
            e = D * (1 - torch.exp(-self.morse_a * x)) ** 2
        return e.sum(-1).to(torch.float64)

    def __call__(self, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls += 1
        with torch.enable_grad():
            x = R.detach().requires_grad_(True)
            E = self.energy(x)
            (g,) = torch.autograd.grad(E.sum(), x)
        return E.detach(), -g


class Harmonic:
    """E = Σ_a k_a/2 |r_a|² per frame (independent isotropic oscillators, k_a per atom, kcal/mol/Å²)."""

    def __init__(self, k: np.ndarray | float) -> None:
        self.k = torch.as_tensor(np.atleast_1d(np.asarray(k, dtype=float)))

    def energy(self, R: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.k.to(R.dtype)[None, :, None] * R * R).sum((1, 2)).to(torch.float64)

    def __call__(self, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.energy(R), -self.k.to(R.dtype)[None, :, None] * R


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Run a test module on one torch thread, then restore the setting.

    These tests do many small tensor ops; on the shared 2-core machine a second OpenMP thread
    only adds barrier waits (measured: up to 10× slower when another job holds the other core).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
