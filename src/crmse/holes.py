"""The hole term of the ``crmse_memory`` arm: remembered holes held above the data's energy range.

A chain pushes on its hole with weight 1/M in L_C and only while it sits there, and a raised hole
that no chain visits has nothing holding it up. The hole term keeps every chain configuration the
spurious detector flags (:class:`HoleMemory`, a ring buffer on the device) and a hinge holds each
remembered configuration at or above the highest training energy:

    L_H = β·mean_{x∈memory sample} max(0, E_train,max − E_θ(x)),   L = L_MSE + λ·L_C + μ·L_H.

It is zero once every remembered hole is above the data's energy range, so it does not keep raising
them, and it uses no new data: the detector's thresholds come from train + val frames.

Scouts: the chains alone can miss rare holes that MD finds. Extra chains at
``temperature_ratio``·T_chain cross barriers into holes far sooner; they only feed the memory and
never enter L_C, so the temperature the KL term is taken at is unchanged.

Projection: raising holes fights the fit (the hinge's θ-gradient can point against that of
L_MSE + λ·L_C). ``fit`` removes the hinge gradient's component along the fit gradient when the two
conflict (PCGrad, Yu et al. 2020), so the hole is raised only in directions that do not undo the fit
to first order. The fit's gradient is mostly the force term's (ρ_F = 0.99), so a projected hinge can
still bend relative energies inside the data's range; ``fit_and_energy`` then also removes its
component against the energy term's gradient ρ_E·∇MSE_E. See docs/method.md §4.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:  # crmse.contrastive builds this term; no import at run time (it imports this module)
    from crmse.contrastive import ContrastiveTerm, Step


class Projection(StrEnum):
    """What the hinge gradient is projected off when it conflicts (crmse.params.PROJECTIONS)."""

    OFF = "off"
    FIT = "fit"  # the fit gradient ∇(L_MSE + λ·L_C)
    FIT_AND_ENERGY = "fit_and_energy"  # the fit gradient, then the energy term's ∇(ρ_E·MSE_E)


@dataclass(frozen=True)
class ScoutConfig:
    """Chains that only feed the hole memory: ``n`` of them (0 = none) at ``temperature_ratio``·T_chain."""

    n: int = 64
    temperature_ratio: float = 1.5


@dataclass(frozen=True)
class HoleConfig:
    """The hole term: memory ``slots``, hinge weight μ, scouts and the gradient projection."""

    slots: int = 2048
    weight: float = 1.0
    scouts: ScoutConfig = field(default_factory=ScoutConfig)
    projection: Projection = Projection.FIT

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> HoleConfig:
        """From the ``crmse_memory`` params section."""
        scouts = section["scouts"]
        return cls(
            slots=int(section["slots"]),
            weight=float(section["weight"]),
            scouts=ScoutConfig(int(scouts["n"]), float(scouts["temperature_ratio"])),
            projection=Projection(section["projection"]),
        )


class HoleMemory:
    """Ring buffer of up to ``size`` configurations (n, 3) Å in which chains were flagged spurious.

    Everything stays on the device: :meth:`add` and :meth:`sample` do no host round-trip.
    """

    def __init__(self, size: int, template: Tensor) -> None:
        if size < 1:
            raise ValueError(f"hole memory size must be >= 1, got {size}")
        self.size = size
        # Slot ``size`` is a scratch slot that unflagged chains are written to. Slots start as copies
        # of a real frame so that a sample drawn before anything is stored evaluates to finite values.
        self.R = template.detach().expand(size + 1, *template.shape).clone()
        self.count = torch.zeros((), dtype=torch.long, device=template.device)
        self.next = torch.zeros((), dtype=torch.long, device=template.device)

    def add(self, R: Tensor, flagged: Tensor) -> None:
        """Store the configurations R (M, n, 3) where ``flagged`` (M,) is True (at most ``size`` per call)."""
        rank = torch.cumsum(flagged.long(), 0) - 1
        keep = flagged & (rank < self.size)
        slot = torch.where(keep, (self.next + rank) % self.size, torch.full_like(rank, self.size))
        self.R.index_copy_(0, slot, R.detach().to(self.R.dtype))
        n_new = keep.sum()
        self.next = (self.next + n_new) % self.size
        self.count = torch.clamp(self.count + n_new, max=self.size)

    def sample(self, n: int, generator: torch.Generator) -> Tensor:
        """n stored configurations drawn uniformly with replacement (slot 0 repeated while empty)."""
        u = torch.rand(n, generator=generator, device=self.R.device, dtype=torch.float64)
        return self.R[(u * self.count).long()]


def hole_loss(model: Any, memory: HoleMemory, ceiling: float, beta: float, n: int, generator: torch.Generator,
              prune: bool = False) -> tuple[Tensor, Tensor]:
    """L_H = β·mean max(0, ceiling − E_θ(x)) over n remembered holes x (0 while the memory is empty).

    ``ceiling`` in kcal/mol, ``beta`` in mol/kcal. Also returns the fraction of the sampled holes still below it.
    """
    E = model.energy(memory.sample(n, generator), prune=prune)
    below = (ceiling - E).clamp_min(0.0)
    filled = (memory.count > 0).to(E.dtype)
    return beta * below.mean() * filled, (below > 0).to(E.dtype).mean() * filled


def combine_hole_gradient(
    params: list[Tensor], fit: Tensor, hole: Tensor, projection: Projection, energy: Tensor | None = None
) -> dict[str, Tensor]:
    """Set ``p.grad`` to ∇(fit) + ∇(hole), the hole part projected as ``projection`` says.

    ``fit``: projects off the hole gradient's component against ∇(fit) when they conflict (PCGrad), so
    raising holes never raises the fit's loss to first order. ``fit_and_energy``: then the same off ∇(energy)
    (``energy``, the energy term that is part of ``fit``, is needed by this mode only); the hole part left never
    opposes ∇(energy) and can oppose ∇(fit) again only through the overlap of the two gradients.
    Returns device scalars: gradient norms and cosines before any projection (grad_cos_energy NaN unless
    ``fit_and_energy``).
    """
    def grads(term: Tensor, retain: bool = False) -> list[Tensor]:
        g = torch.autograd.grad(term, params, allow_unused=True, retain_graph=retain)
        return [torch.zeros_like(p) if x is None else x for p, x in zip(params, g, strict=True)]

    def dot(u: list[Tensor], v: list[Tensor]) -> Tensor:
        return sum((a * b).sum() for a, b in zip(u, v, strict=True))

    with_energy = projection is Projection.FIT_AND_ENERGY
    if with_energy and energy is None:
        raise ValueError("projection fit_and_energy needs the energy term")
    g_energy = grads(energy, retain=True) if with_energy else None  # shares the fit's graph
    g_fit, g_hole = grads(fit), grads(hole)
    fit_sq, hole_sq, fit_hole = dot(g_fit, g_fit), dot(g_hole, g_hole), dot(g_fit, g_hole)
    stats = {
        "grad_fit_norm": fit_sq.sqrt(),
        "grad_hole_norm": hole_sq.sqrt(),
        "grad_cos": fit_hole / (fit_sq.sqrt() * hole_sq.sqrt()).clamp_min(1e-30),
        "grad_cos_energy": torch.full_like(fit_hole, math.nan),
    }
    if g_energy is None:
        # Only a conflicting hole gradient (dot < 0) is projected; computed on the device, no host sync.
        # (This expression, not the two-step one below, keeps the off and fit modes' arithmetic to the bit.)
        project = projection is Projection.FIT
        coef = fit_hole.clamp(max=0.0) / fit_sq.clamp_min(1e-30) if project else torch.zeros_like(fit_hole)
        for p, a, b in zip(params, g_fit, g_hole, strict=True):
            p.grad = a + b - coef * a
        return stats
    energy_sq = dot(g_energy, g_energy)
    stats["grad_cos_energy"] = dot(g_energy, g_hole) / (energy_sq.sqrt() * hole_sq.sqrt()).clamp_min(1e-30)
    # The same conflict-only projection twice: off the fit's gradient, then off the energy term's.
    coef = fit_hole.clamp(max=0.0) / fit_sq.clamp_min(1e-30)
    h = [b - coef * a for a, b in zip(g_fit, g_hole, strict=True)]
    coef = dot(g_energy, h).clamp(max=0.0) / energy_sq.clamp_min(1e-30)
    h = [b - coef * a for a, b in zip(g_energy, h, strict=True)]
    for p, a, b in zip(params, g_fit, h, strict=True):
        p.grad = a + b
    return stats


class HoleTerm:
    """The hole term (a :class:`crmse.contrastive.Term` that also sets the gradient): memory, scouts, hinge.

    Reads the flagged chains and the batch's energy MSE from the iteration's :class:`~crmse.contrastive.Step`
    (set by the contrastive and fit terms before it).
    """

    columns = ("l_hole", "holes_stored", "holes_below_ceiling", "grad_fit_norm", "grad_hole_norm", "grad_cos",
               "grad_cos_energy", "scout_spurious", "scout_blowups")

    def __init__(self, cfg: HoleConfig, contrastive: ContrastiveTerm, ceiling: float, rho_energy: float,
                 memory_generator: torch.Generator, scout_generator: torch.Generator) -> None:
        """``ceiling``: the hinge's target in kcal/mol (the highest training energy)."""
        chains = contrastive.chains
        self.cfg, self.contrastive, self.ceiling, self.rho_energy = cfg, contrastive, ceiling, rho_energy
        self.memory = HoleMemory(cfg.slots, chains.train_R[0])
        self.generator = memory_generator
        scouts = cfg.scouts
        self.scouts = None if scouts.n == 0 else chains.sibling(
            scouts.n, chains.cfg.temperature * scouts.temperature_ratio, scout_generator
        )
        nan = torch.full((), math.nan, dtype=torch.float64, device=chains.train_R.device)
        self._scout_row: dict[str, Tensor] = {"scout_spurious": nan, "scout_blowups": nan}
        self._row: dict[str, Tensor] = {}

    def advance(self) -> None:
        """Move the scouts (after the chains, before the batch is drawn)."""
        if self.scouts is not None:
            self._scout_blowups = self.scouts.advance(self.scouts.cfg.steps_per_iter)["blowups"]

    def loss(self, step: Step) -> None:
        """Not part of the fit loss: its gradient is combined with the fit's in :meth:`backward`."""
        return None

    def backward(self, loss: Tensor, step: Step, params: list[Tensor]) -> None:
        """Store the flagged chains and scouts, then set ``p.grad`` to ∇loss + the (projected) ∇(μ·L_H)."""
        contrastive, chains = self.contrastive, self.contrastive.chains
        self.memory.add(chains.state.R, step.flagged)
        if self.scouts is not None:
            s = self.scouts.state
            flagged = contrastive.detector(s.R, s.E) & s.alive
            self.memory.add(s.R, flagged)
            self._scout_row = {"scout_spurious": flagged.sum(), "scout_blowups": self._scout_blowups}
        l_h, below = hole_loss(chains.model, self.memory, self.ceiling, contrastive.beta, chains.cfg.n,
                               self.generator, chains.prune)
        energy = self.rho_energy * step.energy_mse if self.cfg.projection is Projection.FIT_AND_ENERGY else None
        stats = combine_hole_gradient(params, loss, self.cfg.weight * l_h, self.cfg.projection, energy)
        self._row = {"l_hole": l_h.detach(), "holes_stored": self.memory.count,
                     "holes_below_ceiling": below.detach(), **stats, **self._scout_row}

    def log(self) -> dict[str, Tensor]:
        """This iteration's values of :attr:`columns` (device scalars)."""
        return self._row
