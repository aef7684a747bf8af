"""CRMSE post-training: MSE plus a contrastive term driven by persistent Langevin chains.

L = L_MSE(batch) + λ·L_C,   L_C = β·( mean_{x∈batch} E_θ(x) − mean_{x∈chains} E_θ(stopgrad x) ).

Its θ-gradient is β(⟨∇_θE⟩_data − ⟨∇_θE⟩_chains), the gradient of KL(p_data ‖ p_θ) for
p_θ ∝ exp(−βE_θ) when the chains sample p_θ: data energies go down, energies of what the
model samples (including spurious minima it drifts into) go up. The KL argument needs
β = 1/(k_B T_data), hence T_chain = ``auto`` (configurational temperature of the data).

The chains are persistent (DESIGN.md §3: chains that live ~250 fs never reach the holes
MD falls into after ≥ 1 ps); they restart from a random training frame only on blow-up
or with probability ``p_reset`` per iteration.

A chain pushes on its hole with weight 1/M in L_C and only while it sits there (with plain
CRMSE one ethanol chain sat in one hole for ~1,000 iterations), and a raised hole that no chain
visits has nothing holding it up. With ``hole_memory`` > 0 every chain configuration the
spurious detector flags is kept (:class:`HoleMemory`, a ring buffer on the device), and a hinge
holds each remembered configuration at or above the highest training energy:
L_H = β·mean_{x∈memory sample} max(0, E_train,max − E_θ(x)), L = L_MSE + λ·L_C + μ·L_H.
It is zero once every remembered hole is above the data's energy range, so it does not keep
raising them, and it uses no new data: the detector's thresholds come from train + val frames.
Holes the chains never visit stay: with the memory fed by the 64 chains alone, MD still found a
rare one (an H moving from C onto O, 40 kcal/mol below the DFT minimum) that the chains had not
met in ~10 ps. ``scout_chains`` > 0 adds chains at ``scout_temperature_ratio``·T_chain that only
feed the memory: hotter chains cross the barriers into holes far sooner, and since they never
enter L_C they do not change the temperature the KL term is taken at.

Raising holes fights the fit: on ethanol the hinge's θ-gradient pointed against that of L_MSE + λ·L_C
(cosine −0.8 while the memory filled, −0.2 late in the run), and the validation force MAE rose by 15 %
before it recovered. ``hole_projection`` removes the hinge gradient's component along the fit gradient
when the two conflict (PCGrad, Yu et al. 2020): the hole is raised only in directions that do not
undo the fit to first order. The fit's gradient is mostly the force term's (ρ_F = 0.99), so a projected hinge
can still bend relative energies inside the data's range (aspirin s3: validation energy MAE 1.23 → 2.07 kcal/mol
while the hinge was large); ``energy_projection`` then also removes its component against the energy term's
gradient ρ_E·∇MSE_E. ``remember_blowups`` also stores where chains blew up (their last good
positions): a bond 0.5 Å off its mean lies far above the data's energy range on the true surface.

L_C is blind to a constant energy offset, and ρ_E = 0.01 barely holds one, so the
prototype lost energy accuracy to a drifting constant. A constant changes neither forces
nor p_θ, so it is re-fitted in closed form (mean residual on the training energies)
before every validation and at the end.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from crmse.data import Frames
from crmse.langevin import Langevin, LangevinState, StabilityCheck
from crmse.observables import SpuriousDetector
from crmse.params import SELECTION_RULES
from crmse.train import evaluate_errors, mse_loss, refit_energy_offset
from crmse.units import beta as inverse_temperature
from crmse.units import masses as atomic_masses

SpuriousFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class CRMSEConfig:
    """Settings of one CRMSE run (units: K, fs, 1/fs, kcal/mol)."""

    lam: float = 1.0
    n_chains: int = 64
    steps_per_iter: int = 20
    temperature: float = 500.0
    dt: float = 0.5
    friction: float = 0.01
    p_reset: float = 0.0
    iterations: int = 1000
    lr: float = 1e-4
    batch_size: int = 32
    rho_energy: float = 0.01
    rho_forces: float = 0.99
    eval_every: int = 100
    grad_clip: float = 10.0
    max_gap: float = 3.0
    max_energy_rise: float = math.inf
    selection: str = "best_val_forces"
    select_after: float = 0.5
    spurious_weight: float = 1.0
    ema_decay: float = 0.0
    hole_memory: int = 0
    hole_weight: float = 1.0
    scout_chains: int = 0
    scout_temperature_ratio: float = 1.5
    hole_projection: bool = False
    energy_projection: bool = False
    remember_blowups: bool = False
    seed: int = 0

    @classmethod
    def from_params(cls, section: dict[str, Any], temperature: float, seed: int) -> CRMSEConfig:
        fields = {k: v for k, v in section.items() if k in cls.__dataclass_fields__ and k != "temperature"}
        return cls(**fields, temperature=float(temperature), seed=int(seed))


def contrastive_loss(
    E_data: Tensor, model: Any, R_chains: Tensor, beta: float, weights: Tensor | None = None, prune: bool = False
) -> tuple[Tensor, Tensor]:
    """L_C = β(mean E_data − weighted mean E_θ(stopgrad R_chains)); also returns the chains' energies (B,).

    ``E_data`` (B_data,) must carry the θ-graph; chain positions are detached so no
    gradient ever flows into them. ``weights`` (B,) ≥ 0 weight the chain mean (0 = left out).
    """
    E_chains = model.energy(R_chains.detach(), prune=prune)
    if weights is not None:
        weights = weights.to(E_chains.dtype)
        chain_mean = (E_chains * weights).sum() / weights.sum().clamp_min(1e-12)
    else:
        chain_mean = E_chains.mean()
    return beta * (E_data.mean() - chain_mean), E_chains


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

    Also returns the fraction of the sampled holes still below ``ceiling`` (kcal/mol).
    """
    E = model.energy(memory.sample(n, generator), prune=prune)
    below = (ceiling - E).clamp_min(0.0)
    filled = (memory.count > 0).to(E.dtype)
    return beta * below.mean() * filled, (below > 0).to(E.dtype).mean() * filled


class PersistentChains:
    """M Langevin chains on the current model's surface, carried across iterations.

    Chains start from random training frames; a chain that blows up (non-finite, or a bond
    beyond the stability tolerance) restarts from a random training frame and is counted,
    and every chain restarts with probability ``p_reset`` per iteration.
    """

    def __init__(
        self,
        model: Any,
        train_R: Tensor,
        masses: np.ndarray,
        cfg: CRMSEConfig,
        stability: StabilityCheck | None,
        generator: torch.Generator,
    ) -> None:
        self.model = model
        self.train_R = train_R
        # Dropping pairs beyond the cutoff costs a host sync per step: worth it on a CPU only.
        self.prune = train_R.device.type == "cpu"
        self.p_reset = cfg.p_reset
        self.remember_blowups = cfg.remember_blowups
        self.generator = generator
        self.engine = Langevin(
            self._energy_forces,
            masses,
            cfg.dt,
            cfg.temperature,
            cfg.friction,
            stability,
            device=train_R.device,
            dtype=train_R.dtype,
        )
        self.state: LangevinState = self.engine.init_state(self._random_frames(cfg.n_chains), generator)
        self.age = torch.zeros(cfg.n_chains, dtype=torch.long, device=train_R.device)

    def _energy_forces(self, R: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.energy_and_forces(R, create_graph=False, prune=self.prune)

    def _random_frames(self, n: int) -> Tensor:
        idx = torch.randint(len(self.train_R), (n,), generator=self.generator, device=self.train_R.device)
        return self.train_R[idx]

    def advance(self, n_steps: int) -> dict[str, Tensor]:
        """K Langevin steps, then restarts; returns device scalars (blow-ups, random resets, mean age in steps).

        With ``remember_blowups``, ``self.blown`` (M,) and ``self.blown_R`` (M, n, 3) keep which chains blew up
        in this call and their last good positions (the engine freezes a failing chain one step before the
        failure), for the hole memory.
        """
        self.engine.step(self.state, n_steps)
        self.age += n_steps
        dead = ~self.state.alive
        if self.remember_blowups:  # the reset below overwrites the positions
            self.blown, self.blown_R = dead, self.state.R.clone()
        rand = torch.rand(len(dead), generator=self.generator, device=dead.device) < self.p_reset
        reset = dead | rand
        # One host sync per iteration (not per step): skip the extra model evaluation when nothing restarts.
        if bool(reset.any()):
            self.engine.reset(self.state, reset, self._random_frames(len(reset)))
            self.age = torch.where(reset, 0, self.age)
        return {"blowups": dead.sum(), "random_resets": (rand & ~dead).sum(), "chain_age": self.age.double().mean()}


@dataclass
class CRMSEResult:
    """Selected weights, logs and the selection record of one CRMSE run."""

    state_dict: dict[str, Tensor]
    selected_iteration: int
    selection_note: str
    log: list[dict[str, float]] = field(default_factory=list)
    val_log: list[dict[str, float]] = field(default_factory=list)
    temperature: float = 0.0
    wall_s: float = 0.0


def train_crmse(
    model: torch.nn.Module,
    train: Frames,
    val: Frames,
    cfg: CRMSEConfig,
    stability: StabilityCheck | None = None,
    spurious: SpuriousFn | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> CRMSEResult:
    """Run CRMSE post-training on ``model`` (modified in place; the selected weights are returned).

    ``spurious(R (M, n, 3), E (M,)) -> bool (M,)`` flags chains in a spurious state.
    Selection, among evaluations after ``select_after``·iterations whose mean contrastive gap over
    the preceding window is within ``max_gap`` kcal/mol and whose validation energy MAE is at most
    ``max_energy_rise`` kcal/mol above the starting model's (both with the offset refitted; else the last evaluation):
    ``best_val_forces`` = lowest validation force MAE; ``fewest_chain_failures`` = fewest chain
    failures in the preceding window (chain-iterations spent in a spurious state + blow-ups: the
    model's own sampler still finding holes), ties broken by validation force MAE; ``last`` = final
    weights. None of them looks at test data.
    """
    if cfg.selection not in SELECTION_RULES:
        raise ValueError(f"unknown selection rule {cfg.selection!r}; allowed: {', '.join(map(repr, SELECTION_RULES))}")
    if cfg.hole_memory > 0 and spurious is None:
        raise ValueError("hole_memory > 0 needs a spurious-state detector (crmse.contrastive.chain_monitors)")
    if cfg.energy_projection and not cfg.hole_projection:
        raise ValueError("energy_projection needs hole_projection: it is a second projection of the hinge gradient")
    for feeds_memory, what in ((cfg.scout_chains > 0, "scout_chains > 0"), (cfg.remember_blowups, "remember_blowups")):
        if feeds_memory and cfg.hole_memory == 0:
            raise ValueError(f"{what} needs hole_memory > 0: it only feeds the hole memory")
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    # Separate streams: what the chains do (resets, noise) never changes which batches are drawn.
    gen = _generator(device, cfg.seed)
    chain_gen = _generator(device, cfg.seed + 7919)
    dtype = next(model.parameters()).dtype
    model.to(device).train()
    beta = inverse_temperature(cfg.temperature)
    train_R = torch.as_tensor(train.R, device=device, dtype=dtype)
    train_E = torch.as_tensor(train.E, device=device, dtype=torch.float64)
    train_F = torch.as_tensor(train.F, device=device, dtype=dtype)
    chains = PersistentChains(model, train_R, atomic_masses(train.z), cfg, stability, chain_gen)
    energy_limit = math.inf
    if math.isfinite(cfg.max_energy_rise):
        # The holes the hinge holds up can bend the surface inside the data's range (a non-constant error
        # the offset refit cannot remove; aspirin s2: validation energy MAE +0.13 kcal/mol by iteration 600).
        # A copy is refitted so that the run itself starts from the model exactly as given.
        start_model = copy.deepcopy(model)
        refit_energy_offset(start_model, train)
        energy_limit = evaluate_errors(start_model, val, batch_size=64)["energy_mae"] + cfg.max_energy_rise
        del start_model
    scouts = None
    if cfg.scout_chains > 0:
        scout_cfg = replace(cfg, n_chains=cfg.scout_chains, temperature=cfg.temperature * cfg.scout_temperature_ratio)
        scouts = PersistentChains(
            model, train_R, atomic_masses(train.z), scout_cfg, stability, _generator(device, cfg.seed + 15485863)
        )
    chain_sets = [chains] if scouts is None else [chains, scouts]  # what feeds the hole memory
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    # Polyak average of the weights (ema_decay > 0): L_C's sampling noise jitters relative energies
    # from step to step; the average is what is validated and selected, the chains follow the live weights.
    ema = _clone_state(model.state_dict()) if cfg.ema_decay > 0 else None
    memory = HoleMemory(cfg.hole_memory, train_R[0]) if cfg.hole_memory > 0 else None
    memory_gen = _generator(device, cfg.seed + 104729)
    # The hinge's target: no configuration outside the data's support may be lower than the highest
    # training energy (the DFT audit puts such frames 70-280 kcal/mol above the DFT minimum).
    ceiling = float(np.max(train.E))

    log: list[dict[str, float]] = []
    val_log: list[dict[str, float]] = []
    pending: list[dict[str, Tensor]] = []
    best: tuple[tuple[float, float], int, dict[str, Tensor]] | None = None
    start = time.perf_counter()
    bar = tqdm(range(1, cfg.iterations + 1), desc="CRMSE", unit="it", disable=not progress)
    for it in bar:
        stats = chains.advance(cfg.steps_per_iter)
        if scouts is not None:
            scout_stats = scouts.advance(cfg.steps_per_iter)
        idx = torch.randint(len(train_R), (min(cfg.batch_size, len(train_R)),), generator=gen, device=device)
        opt.zero_grad(set_to_none=True)
        E_data, F_data = model.energy_and_forces(train_R[idx], create_graph=True, prune=chains.prune)
        l_mse, e_mse, _ = mse_loss(E_data, F_data, train_E[idx], train_F[idx], cfg.rho_energy, cfg.rho_forces)
        weights = chains.state.alive.to(dtype)
        flagged = None
        if spurious is not None:
            flagged = spurious(chains.state.R, chains.state.E) & chains.state.alive
            # A chain that fell into a hole stands for far more than 1/M of p_θ's mass there (the
            # chains are not mixed), so its push on the hole is scaled up (1 = plain CRMSE).
            weights = torch.where(flagged, cfg.spurious_weight, weights)
        l_c, E_chain = contrastive_loss(E_data, model, chains.state.R, beta, weights, chains.prune)
        loss = l_mse + cfg.lam * l_c
        if memory is None:
            loss.backward()
        else:
            memory.add(chains.state.R, flagged)
            if scouts is not None:
                scout_flagged = spurious(scouts.state.R, scouts.state.E) & scouts.state.alive
                memory.add(scouts.state.R, scout_flagged)
            if cfg.remember_blowups:
                # A bond 0.5 Å off its mean is twice the largest deviation in any DFT frame: far above the
                # data's energy range on the true surface, so the hinge may hold it there too.
                for c in chain_sets:
                    memory.add(c.blown_R, c.blown)
            l_h, holes_below = hole_loss(model, memory, ceiling, beta, cfg.n_chains, memory_gen, chains.prune)
            protect = cfg.rho_energy * e_mse if cfg.energy_projection else None
            grad_stats = _combine_hole_gradient(params, loss, cfg.hole_weight * l_h, cfg.hole_projection, protect)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                for k, v in model.state_dict().items():
                    if v.dtype.is_floating_point:
                        ema[k].lerp_(v, 1.0 - cfg.ema_decay)
                    else:
                        ema[k].copy_(v)
        row = {
            "l_mse": l_mse.detach(),
            "l_c": l_c.detach(),
            "gap": (E_data.detach().mean() - chains.state.E[chains.state.alive].mean()),
            "e_data": E_data.detach().mean(),
            "e_chain": E_chain.detach().mean(),
            "e_chain_min": E_chain.detach().min(),
            **stats,
        }
        if flagged is not None:
            row["n_spurious"] = flagged.sum()
        row["grad_norm"] = grad_norm.detach()
        if memory is not None:
            row.update(l_hole=l_h.detach(), holes_stored=memory.count, holes_below_ceiling=holes_below.detach(),
                       **grad_stats)
        if scouts is not None:
            row.update(scout_spurious=scout_flagged.sum(), scout_blowups=scout_stats["blowups"])
        if hasattr(spurious, "min_nonbonded_distance"):  # a SpuriousDetector: how close the closest pair gets
            row["d_chain_min"] = spurious.min_nonbonded_distance(chains.state.R).min()
        pending.append(row)

        if it % cfg.eval_every == 0 or it == cfg.iterations:
            # Host sync only here: flush the window's device scalars into the log.
            window = [{k: float(v) for k, v in r.items()} for r in pending]
            for j, r in enumerate(window):
                log.append({"iteration": it - len(window) + 1 + j, **r})
            pending = []
            if not all(math.isfinite(r["l_mse"]) and math.isfinite(r["l_c"]) for r in window):
                bad = next(r["iteration"] for r in log[-len(window) :] if not math.isfinite(r["l_mse"] + r["l_c"]))
                raise FloatingPointError(f"CRMSE: non-finite loss at iteration {int(bad)}; no checkpoint written")
            gap = float(np.mean([r["gap"] for r in window]))
            live = None
            if ema is not None:
                live = _clone_state(model.state_dict())
                model.load_state_dict(ema)
            offset = refit_energy_offset(model, train)
            errors = evaluate_errors(model, val, batch_size=64)
            if live is not None:
                # Refit the live weights' offset too, as a run without averaging does: the chains then see
                # exactly the surface they would see with ema_decay 0.
                model.load_state_dict(live)
                refit_energy_offset(model, train)
            model.train()
            blowups = float(sum(r["blowups"] for r in window))
            spurious_its = float(sum(r.get("n_spurious", 0.0) for r in window))
            entry = {
                "iteration": it,
                "val_energy_mae": errors["energy_mae"],
                "val_force_mae": errors["force_mae"],
                "gap": gap,
                "offset_refit": offset,
                "blowups": blowups,
                "n_spurious": float(window[-1].get("n_spurious", float("nan"))),
                "chain_failures": blowups + spurious_its,
                "wall_s": time.perf_counter() - start,
            }
            val_log.append(entry)
            bar.set_postfix(gap=f"{gap:.2f}", fmae=f"{errors['force_mae']:.3f}", fail=f"{entry['chain_failures']:.0f}")
            eligible = (it >= cfg.select_after * cfg.iterations and abs(gap) <= cfg.max_gap
                        and errors["energy_mae"] <= energy_limit)
            score = (entry["chain_failures"] if cfg.selection == "fewest_chain_failures" else 0.0, errors["force_mae"])
            if cfg.selection != "last" and eligible and (best is None or score < best[0]):
                best = (score, it, _clone_state(ema if ema is not None else model.state_dict()))
    bar.close()

    guard = "" if not math.isfinite(energy_limit) else f" and validation energy MAE <= {energy_limit:.3f} kcal/mol"
    if best is not None:
        what = {
            "fewest_chain_failures": "fewest chain failures in the preceding window, then best validation force MAE",
            "best_val_forces": "best validation force MAE",
        }[cfg.selection]
        state, selected, note = best[2], best[1], (
            f"{what} after {cfg.select_after:.0%} of the iterations with |gap| <= {cfg.max_gap}{guard}"
        )
    else:
        state, selected = _clone_state(ema if ema is not None else model.state_dict()), cfg.iterations
        note = "last iteration" if cfg.selection == "last" else (
            f"last iteration: no evaluation after {cfg.select_after:.0%} had |gap| <= {cfg.max_gap} kcal/mol{guard}"
        )
    if ema is not None:
        note += f"; weights: moving average, decay {cfg.ema_decay}"
    model.load_state_dict(state)
    # The energy shift is not part of the state dict: refit it for the weights just loaded.
    refit_energy_offset(model, train)
    model.eval()
    return CRMSEResult(state, selected, note, log, val_log, cfg.temperature, time.perf_counter() - start)


def _combine_hole_gradient(
    params: list[Tensor], loss: Tensor, hole_term: Tensor, project: bool, protect: Tensor | None = None
) -> dict[str, Tensor]:
    """Set ``p.grad`` to ∇(loss) + ∇(hole_term); with ``project`` the hole gradient's component against
    ∇(loss) is removed first (PCGrad, Yu et al. 2020), so raising holes never raises the fit's loss to first order.

    ``protect`` (a part of ``loss``, e.g. its energy term) adds a second projection, applied after the first as
    PCGrad does: the hole part left never opposes ∇(protect); it can oppose ∇(loss) again only through the overlap
    of the two gradients. Returns device scalars: the gradient norms and cosines (before any projection).
    """
    def grads(term: Tensor, retain: bool = False) -> list[Tensor]:
        g = torch.autograd.grad(term, params, allow_unused=True, retain_graph=retain)
        return [torch.zeros_like(p) if x is None else x for p, x in zip(params, g, strict=True)]

    def dot(u: list[Tensor], v: list[Tensor]) -> Tensor:
        return sum((a * b).sum() for a, b in zip(u, v, strict=True))

    g_protect = grads(protect, retain=True) if project and protect is not None else None  # shares the fit's graph
    g_fit, g_hole = grads(loss), grads(hole_term)
    fit_sq, hole_sq, fit_hole = dot(g_fit, g_fit), dot(g_hole, g_hole), dot(g_fit, g_hole)
    stats = {
        "grad_fit_norm": fit_sq.sqrt(),
        "grad_hole_norm": hole_sq.sqrt(),
        "grad_cos": fit_hole / (fit_sq.sqrt() * hole_sq.sqrt()).clamp_min(1e-30),
    }
    if g_protect is None:
        # Only a conflicting hole gradient (dot < 0) is projected; computed on the device, no host sync.
        # (This expression, not the loop below, so that runs without energy_projection keep their numbers to the bit.)
        coef = fit_hole.clamp(max=0.0) / fit_sq.clamp_min(1e-30) if project else torch.zeros_like(fit_hole)
        for p, a, b in zip(params, g_fit, g_hole, strict=True):
            p.grad = a + b - coef * a
        return stats
    protect_sq = dot(g_protect, g_protect)
    stats["grad_cos_energy"] = dot(g_protect, g_hole) / (protect_sq.sqrt() * hole_sq.sqrt()).clamp_min(1e-30)
    # The same conflict-only projection twice: off the fit's gradient, then off the energy term's.
    coef = fit_hole.clamp(max=0.0) / fit_sq.clamp_min(1e-30)
    h = [b - coef * a for a, b in zip(g_fit, g_hole, strict=True)]
    coef = dot(g_protect, h).clamp(max=0.0) / protect_sq.clamp_min(1e-30)
    h = [b - coef * a for a, b in zip(g_protect, h, strict=True)]
    for p, a, b in zip(params, g_fit, h, strict=True):
        p.grad = a + b
    return stats


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded random stream on ``device``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _clone_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A detached copy of a state dict (the live weights keep changing)."""
    return {k: v.detach().clone() for k, v in state.items()}


def chain_monitors(train: Frames, val: Frames, ev: dict[str, Any]) -> tuple[StabilityCheck, SpuriousDetector]:
    """Blow-up check and spurious-state detector of the chains, from the frames CRMSE may use (train + val).

    Never the reference pool: the pool is what the samplers are judged against. Settings from the
    ``evaluate`` params section (bond factor and tolerance, spurious margins), so chains and samples
    use the same criteria; only the thresholds' source frames differ.
    """
    z = train.z
    R = np.concatenate([train.R, val.R])
    E = np.concatenate([np.reshape(train.E, -1), np.reshape(val.E, -1)])
    stability = StabilityCheck.from_reference(z, R, ev["bond_tolerance"], ev["bond_factor"])
    detector = SpuriousDetector.from_reference(
        z, R, E, stability.bonds.numpy(), ev["spurious_energy_margin"], ev["spurious_distance_margin"]
    )
    return stability, detector
