"""Optional Verlet pair list for MD with a :class:`crmse.model.Potential` (params ``md.skin``).

The model's own evaluation uses every atom pair of the molecule and lets the cosine cutoff
zero the far ones. For a molecule larger than the cutoff sphere (aspirin: ~30% of pairs
beyond 5 Å) that filter-network work is wasted. :class:`VerletPotential` is an
``energy_forces`` callable for :class:`crmse.langevin.Langevin` that evaluates only pairs
closer than the cutoff:

* a Verlet list of pairs within ``cutoff + skin`` is built per replica and rebuilt when any
  atom has moved more than ``skin / 2`` since the last build (a reset replica counts as moved);
* each step keeps only list pairs within the cutoff (``prune=True``), or all list pairs.

Energies and forces equal the all-pairs model's up to float summation order: a pair at
d ≥ cutoff contributes exactly zero energy and zero force through the cosine cutoff.
The rebuild test and the per-step pruning read a value back to the host once per step
(free on a CPU; on a GPU the all-pairs model, which never syncs, may be the better choice).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class VerletPotential:
    """``energy_forces(R) -> (E (B,) float64 kcal/mol, F (B, n, 3) kcal/mol/Å)`` on a pruned pair list.

    Args:
        model: a :class:`crmse.model.Potential` (uses its ``representation``, ``head``, scaling
            and all-pairs ``pair_i``/``pair_j``).
        skin: Verlet skin, Å (> 0).
        prune: also drop list pairs beyond the cutoff at every step.
    """

    def __init__(self, model: Any, skin: float = 1.0, prune: bool = True) -> None:
        if not skin > 0:
            raise ValueError(f"Verlet skin must be > 0 Å, got {skin} (use the model directly for all pairs)")
        self.model = model
        self.cutoff = float(model.config["cutoff"])
        self.skin = float(skin)
        self.prune = prune
        self.rebuilds = 0
        self._R_built: Tensor | None = None
        self._ii: Tensor | None = None
        self._jj: Tensor | None = None

    def _build(self, R: Tensor) -> None:
        B, n = R.shape[:2]
        pi, pj = self.model.pair_i, self.model.pair_j
        d = (R[:, pj] - R[:, pi]).norm(dim=-1)
        # Non-finite replicas keep all pairs: their result is discarded by the engine anyway.
        keep = (d < self.cutoff + self.skin) | ~torch.isfinite(d)
        b, p = torch.nonzero(keep, as_tuple=True)
        self._ii = pi[p] + b * n
        self._jj = pj[p] + b * n
        self._R_built = R.detach().clone()
        self.rebuilds += 1

    def _needs_rebuild(self, R: Tensor) -> bool:
        if self._R_built is None or self._R_built.shape != R.shape:
            return True
        disp = (R - self._R_built).norm(dim=-1)
        disp = torch.where(torch.isfinite(disp), disp, 0.0)  # a NaN must not hide the others' motion
        return bool(disp.amax() > 0.5 * self.skin)

    def energy(self, R: Tensor) -> Tensor:
        """Energies (B,) float64 kcal/mol, differentiable in R (pairs of the current list)."""
        m = self.model
        m._check(R)
        if self._needs_rebuild(R.detach()):
            self._build(R.detach())
        Rf = R.reshape(-1, 3)
        ii, jj = self._ii, self._jj
        Rij = Rf[jj] - Rf[ii]
        if self.prune:
            near = torch.nonzero(Rij.detach().norm(dim=-1) < self.cutoff, as_tuple=True)[0]
            ii, jj, Rij = ii[near], jj[near], Rij[near]
        return m.energy_with_pairs(R, ii, jj, Rij)

    def __call__(self, R: Tensor) -> tuple[Tensor, Tensor]:
        with torch.enable_grad():
            Rg = R.detach().requires_grad_(True)
            E = self.energy(Rg)
            (dE,) = torch.autograd.grad(E.sum(), Rg)
        return E.detach(), -dE
