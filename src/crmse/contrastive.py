"""CRMSE post-training: MSE plus a contrastive term driven by persistent Langevin chains.

L = L_MSE(batch) + λ·L_C,   L_C = β·( mean_{x∈batch} E_θ(x) − mean_{x∈chains} E_θ(stopgrad x) ).

Its θ-gradient is β(⟨∇_θE⟩_data − ⟨∇_θE⟩_chains), the gradient of KL(p_data ‖ p_θ) for
p_θ ∝ exp(−βE_θ) when the chains sample p_θ: data energies go down, energies of what the
model samples (including spurious minima it drifts into) go up. The KL argument needs
β = 1/(k_B T_data), hence T_chain = ``auto`` (configurational temperature of the data).

The chains are persistent (docs/method.md §3: short-lived chains never reach the holes MD falls
into after ≥ 1 ps); they restart from a random training frame only on blow-up or with
probability ``p_reset`` per iteration.

L_C is blind to a constant energy offset, and ρ_E = 0.01 barely holds one, so the energy
accuracy would be lost to a drifting constant. A constant changes neither forces nor p_θ, so
it is re-fitted in closed form (mean residual on the training energies) before every
validation and at the end.

A run is built from parts with one concept each, every one with fixed log columns of its own:
the fit term (:class:`MSETerm`), the contrastive term (:class:`ContrastiveTerm`), for the
``crmse_memory`` arm the hole term (:class:`crmse.holes.HoleTerm`), weight averaging and checkpoint
selection (:mod:`crmse.selection`). :func:`train_crmse` builds them and runs the loop.
"""

from __future__ import annotations

import functools
import math
import operator
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from crmse.data import Frames
from crmse.holes import HoleConfig, HoleTerm
from crmse.langevin import Langevin, LangevinState, StabilityCheck
from crmse.observables import SpuriousDetector
from crmse.selection import CheckpointSelection, SelectionConfig, weight_averaging
from crmse.train import evaluate_errors, mse_loss, refit_energy_offset
from crmse.units import beta as inverse_temperature
from crmse.units import masses as atomic_masses

#: ``detector(R (M, n, 3) Å, E (M,) kcal/mol) -> bool (M,)``: chains in a spurious state.
SpuriousFn = Callable[[Tensor, Tensor], Tensor]

#: Columns of the validation log (one row per evaluation), every arm; its wall times are in ``val_wall_s``.
VAL_COLUMNS = ("iteration", "val_energy_mae", "val_force_mae", "gap", "offset_refit", "blowups", "n_spurious",
               "chain_failures")

# Seed offsets of the run's random streams (fixed: the same seed draws the same numbers). Separate streams:
# what the chains do (resets, noise) never changes which batches are drawn.
_BATCH_SEED, _CHAIN_SEED, _SCOUT_SEED, _MEMORY_SEED = 0, 7919, 15485863, 104729


@dataclass(frozen=True)
class ChainConfig:
    """Persistent Langevin chains: ``n`` chains at ``temperature`` K, ``steps_per_iter`` steps of ``dt`` fs per
    iteration, friction in 1/fs, restart probability ``p_reset`` per iteration."""

    temperature: float
    n: int = 64
    steps_per_iter: int = 20
    dt: float = 0.5
    friction: float = 0.01
    p_reset: float = 0.0

    @classmethod
    def from_params(cls, section: dict[str, Any], temperature_K: float) -> ChainConfig:
        """From the ``crmse.chains`` params section; ``temperature_K`` is its ``temperature`` resolved
        (``auto`` → the data's configurational temperature: :func:`crmse.artifacts.resolve_temperature`)."""
        return cls(float(temperature_K), int(section["n"]), int(section["steps_per_iter"]), float(section["dt"]),
                   float(section["friction"]), float(section["p_reset"]))


@dataclass(frozen=True)
class CRMSEConfig:
    """Settings of one CRMSE run (units: K, fs, 1/fs, kcal/mol). ``ema_decay`` 0 = no weight averaging."""

    chains: ChainConfig
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    lam: float = 1.0
    iterations: int = 1800
    lr: float = 1e-4
    batch_size: int = 32
    rho_energy: float = 0.01
    rho_forces: float = 0.99
    grad_clip: float = 10.0
    ema_decay: float = 0.99
    seed: int = 0

    @classmethod
    def from_params(cls, section: dict[str, Any], temperature_K: float, seed: int) -> CRMSEConfig:
        """From the ``crmse`` params section (with its ``chains`` and ``selection`` sub-sections); ``temperature_K``
        is ``chains.temperature`` resolved to K."""
        return cls(
            chains=ChainConfig.from_params(section["chains"], temperature_K),
            selection=SelectionConfig.from_params(section["selection"]),
            lam=float(section["lam"]),
            iterations=int(section["iterations"]),
            lr=float(section["lr"]),
            batch_size=int(section["batch_size"]),
            rho_energy=float(section["rho_energy"]),
            rho_forces=float(section["rho_forces"]),
            grad_clip=float(section["grad_clip"]),
            ema_decay=float(section["ema_decay"]),
            seed=int(seed),
        )


def contrastive_loss(
    E_data: Tensor, model: Any, R_chains: Tensor, beta: float, weights: Tensor | None = None, prune: bool = False
) -> tuple[Tensor, Tensor]:
    """L_C = β(mean E_data − weighted mean E_θ(stopgrad R_chains)); also returns the chains' energies (B,).

    ``E_data`` (B_data,) kcal/mol must carry the θ-graph; ``beta`` in mol/kcal; chain positions are detached so
    no gradient ever flows into them. ``weights`` (B,) ≥ 0 weight the chain mean (0 = left out).
    """
    E_chains = model.energy(R_chains.detach(), prune=prune)
    if weights is not None:
        weights = weights.to(E_chains.dtype)
        chain_mean = (E_chains * weights).sum() / weights.sum().clamp_min(1e-12)
    else:
        chain_mean = E_chains.mean()
    return beta * (E_data.mean() - chain_mean), E_chains


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
        cfg: ChainConfig,
        stability: StabilityCheck | None,
        generator: torch.Generator,
    ) -> None:
        self.model, self.train_R, self.masses, self.cfg, self.stability = model, train_R, masses, cfg, stability
        # Dropping pairs beyond the cutoff costs a host sync per step: worth it on a CPU only.
        self.prune = train_R.device.type == "cpu"
        self.generator = generator
        self.engine = Langevin(self._energy_forces, masses, cfg.dt, cfg.temperature, cfg.friction, stability,
                               device=train_R.device, dtype=train_R.dtype)
        self.state: LangevinState = self.engine.init_state(self._random_frames(cfg.n), generator)
        self.age = torch.zeros(cfg.n, dtype=torch.long, device=train_R.device)

    def sibling(self, n: int, temperature: float, generator: torch.Generator) -> PersistentChains:
        """``n`` more chains like these (same model, frames, step and stability check) at ``temperature`` K."""
        cfg = replace(self.cfg, n=n, temperature=temperature)
        return PersistentChains(self.model, self.train_R, self.masses, cfg, self.stability, generator)

    def _energy_forces(self, R: Tensor) -> tuple[Tensor, Tensor]:
        return self.model.energy_and_forces(R, create_graph=False, prune=self.prune)

    def _random_frames(self, n: int) -> Tensor:
        idx = torch.randint(len(self.train_R), (n,), generator=self.generator, device=self.train_R.device)
        return self.train_R[idx]

    def advance(self, n_steps: int) -> dict[str, Tensor]:
        """``n_steps`` Langevin steps, then restarts; returns device scalars (blow-ups, random resets, mean age
        in steps)."""
        self.engine.step(self.state, n_steps)
        self.age += n_steps
        dead = ~self.state.alive
        rand = torch.rand(len(dead), generator=self.generator, device=dead.device) < self.cfg.p_reset
        reset = dead | rand
        # One host sync per iteration (not per step): skip the extra model evaluation when nothing restarts.
        if bool(reset.any()):
            self.engine.reset(self.state, reset, self._random_frames(len(reset)))
            self.age = torch.where(reset, 0, self.age)
        return {"blowups": dead.sum(), "random_resets": (rand & ~dead).sum(), "chain_age": self.age.double().mean()}


@dataclass
class Step:
    """What one iteration's terms share. Terms run in order and read what the terms before them set."""

    E_data: Tensor | None = None  # (B,) kcal/mol of the batch, with the θ-graph (fit term)
    energy_mse: Tensor | None = None  # the batch's energy MSE, (kcal/mol)² (fit term)
    flagged: Tensor | None = None  # (M,) bool: chains alive and in a spurious state (contrastive term)


class Term(Protocol):
    """One part of a CRMSE run, in the spirit of schnetpack's simulation hooks.

    Per iteration the loop calls ``advance()`` on every term (samplers move, before the batch is drawn), then
    ``loss(step)`` on every term (the fit loss is the sum of the tensors returned, in order), then ``log()``.
    """

    columns: tuple[str, ...]  # fixed: log() returns exactly these keys every iteration

    def advance(self) -> None: ...

    def loss(self, step: Step) -> Tensor | None: ...

    def log(self) -> dict[str, Tensor | float]: ...


class MSETerm:
    """The fit term ρ_E·MSE_E + ρ_F·MSE_F on a random training batch (drawn from its own stream)."""

    columns = ("l_mse",)

    def __init__(self, model: Any, train: Frames, train_R: Tensor, cfg: CRMSEConfig, generator: torch.Generator
                 ) -> None:
        device = train_R.device
        self.model, self.R, self.cfg, self.generator = model, train_R, cfg, generator
        self.E = torch.as_tensor(train.E, device=device, dtype=torch.float64)
        self.F = torch.as_tensor(train.F, device=device, dtype=train_R.dtype)
        self.prune = device.type == "cpu"

    def advance(self) -> None:
        pass

    def loss(self, step: Step) -> Tensor:
        n = len(self.R)
        idx = torch.randint(n, (min(self.cfg.batch_size, n),), generator=self.generator, device=self.R.device)
        step.E_data, F = self.model.energy_and_forces(self.R[idx], create_graph=True, prune=self.prune)
        self._loss, step.energy_mse, _ = mse_loss(step.E_data, F, self.E[idx], self.F[idx], self.cfg.rho_energy,
                                                  self.cfg.rho_forces)
        return self._loss

    def log(self) -> dict[str, Tensor]:
        return {"l_mse": self._loss.detach()}


class ContrastiveTerm:
    """λ·L_C with persistent chains; flags the chains in a spurious state (for the log and the hole term)."""

    columns = ("l_c", "gap", "e_data", "e_chain", "e_chain_min", "blowups", "random_resets", "chain_age",
               "n_spurious", "d_chain_min")

    def __init__(self, chains: PersistentChains, detector: SpuriousFn, lam: float) -> None:
        self.chains, self.detector, self.lam = chains, detector, lam
        self.beta = inverse_temperature(chains.cfg.temperature)
        self.dtype = next(chains.model.parameters()).dtype
        # A SpuriousDetector also reports how close the closest non-bonded pair gets (Å); other detectors: NaN.
        self._distance = getattr(detector, "min_nonbonded_distance", None)

    def advance(self) -> None:
        self._stats = self.chains.advance(self.chains.cfg.steps_per_iter)

    def loss(self, step: Step) -> Tensor:
        s, model = self.chains.state, self.chains.model
        step.flagged = self.detector(s.R, s.E) & s.alive
        weights = s.alive.to(self.dtype)
        l_c, E_chain = contrastive_loss(step.E_data, model, s.R, self.beta, weights, self.chains.prune)
        E_data, E_chain = step.E_data.detach(), E_chain.detach()
        self._row = {
            "l_c": l_c.detach(),
            "gap": E_data.mean() - s.E[s.alive].mean(),
            "e_data": E_data.mean(),
            "e_chain": E_chain.mean(),
            "e_chain_min": E_chain.min(),
            **self._stats,
            "n_spurious": step.flagged.sum(),
            "d_chain_min": math.nan if self._distance is None else self._distance(s.R).min(),
        }
        return self.lam * l_c

    def log(self) -> dict[str, Tensor | float]:
        return self._row

    @staticmethod
    def summarize(window: list[dict[str, float]]) -> dict[str, float]:
        """Validation-log values of a window of log rows: mean gap, blow-ups, chains spurious at its end, and
        chain failures (chain-iterations spent in a spurious state + blow-ups)."""
        blowups = float(sum(r["blowups"] for r in window))
        return {
            "gap": float(np.mean([r["gap"] for r in window])),
            "blowups": blowups,
            "n_spurious": float(window[-1]["n_spurious"]),
            "chain_failures": blowups + float(sum(r["n_spurious"] for r in window)),
        }


class Gradient(Protocol):
    """Sets ``p.grad`` of ``params`` from the iteration's fit loss (the sum of the terms' losses)."""

    def backward(self, loss: Tensor, step: Step, params: list[Tensor]) -> None: ...


class PlainGradient:
    """``p.grad`` = ∇(fit loss): a run without a hole term (the hole term is the other :class:`Gradient`)."""

    def backward(self, loss: Tensor, step: Step, params: list[Tensor]) -> None:
        loss.backward()


@dataclass
class CRMSEResult:
    """Selected weights, logs (columns ``log_columns`` and :data:`VAL_COLUMNS`) and the selection record."""

    state_dict: dict[str, Tensor]
    selected_iteration: int
    selection_note: str
    log: list[dict[str, float]] = field(default_factory=list)
    val_log: list[dict[str, float]] = field(default_factory=list)
    temperature: float = 0.0
    wall_s: float = 0.0
    log_columns: tuple[str, ...] = ()
    val_wall_s: list[float] = field(default_factory=list)  # s since the start, one per validation row


def log_columns(holes: HoleConfig | None) -> tuple[str, ...]:
    """Columns of the per-iteration log of a run with (``holes``) or without the hole term."""
    terms = [MSETerm, ContrastiveTerm] + ([HoleTerm] if holes is not None else [])
    return _columns(terms)


def _columns(terms: list[Any]) -> tuple[str, ...]:
    return ("iteration", *(c for t in terms for c in t.columns), "grad_norm")


def train_crmse(
    model: torch.nn.Module,
    train: Frames,
    val: Frames,
    cfg: CRMSEConfig,
    holes: HoleConfig | None,
    stability: StabilityCheck | None,
    detector: SpuriousFn,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> CRMSEResult:
    """Run CRMSE post-training on ``model`` (modified in place; it ends with the selected weights, which are
    also returned): the fit and contrastive terms, plus the hole term given ``holes`` (arm ``crmse_memory``).

    ``stability`` flags blown-up chains (None: non-finite only); ``detector`` flags chains in a spurious state
    (see :func:`chain_monitors`). Validation, averaging and selection as in :mod:`crmse.selection`.
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    model.to(device).train()
    train_R = torch.as_tensor(train.R, device=device, dtype=next(model.parameters()).dtype)
    chains = PersistentChains(model, train_R, atomic_masses(train.z), cfg.chains, stability,
                              _generator(device, cfg.seed + _CHAIN_SEED))
    selection = CheckpointSelection.start(cfg.selection, cfg.iterations, model, train, val)
    contrastive = ContrastiveTerm(chains, detector, cfg.lam)
    terms: list[Term] = [MSETerm(model, train, train_R, cfg, _generator(device, cfg.seed + _BATCH_SEED)), contrastive]
    gradient: Gradient = PlainGradient()
    if holes is not None:
        # The hinge's target: no configuration outside the data's support may be lower than the highest
        # training energy (the DFT audit puts such frames far above the DFT minimum).
        hole = HoleTerm(holes, contrastive, float(np.max(train.E)), cfg.rho_energy,
                        _generator(device, cfg.seed + _MEMORY_SEED), _generator(device, cfg.seed + _SCOUT_SEED))
        terms.append(hole)
        gradient = hole  # the hinge's gradient is combined with the fit's, not added to the loss
    return _Run(model, train, val, cfg, terms, gradient, contrastive, selection, progress).run()


class _Run:
    """The training loop: no options, only the terms, averaging and selection it was given."""

    def __init__(self, model: torch.nn.Module, train: Frames, val: Frames, cfg: CRMSEConfig, terms: list[Term],
                 gradient: Gradient, contrastive: ContrastiveTerm, selection: CheckpointSelection,
                 progress: bool) -> None:
        self.model, self.train, self.val, self.cfg = model, train, val, cfg
        self.terms, self.gradient, self.contrastive, self.selection = terms, gradient, contrastive, selection
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.Adam(self.params, lr=cfg.lr)
        self.averaging = weight_averaging(model, cfg.ema_decay)
        self.columns = _columns(terms)
        self.progress = progress
        self.log: list[dict[str, float]] = []
        self.val_log: list[dict[str, float]] = []
        self.val_wall_s: list[float] = []

    def run(self) -> CRMSEResult:
        start = time.perf_counter()
        pending: list[dict[str, Tensor | float]] = []
        bar = tqdm(range(1, self.cfg.iterations + 1), desc="CRMSE", unit="it", disable=not self.progress)
        for it in bar:
            pending.append(self._iteration())
            if self.selection.due(it):
                entry = self._validate(it, pending, start)
                pending = []
                bar.set_postfix(gap=f"{entry['gap']:.2f}", fmae=f"{entry['val_force_mae']:.3f}",
                                fail=f"{entry['chain_failures']:.0f}")
        bar.close()
        state, selected, note = self.selection.choose(self.averaging.state)
        self.model.load_state_dict(state)
        # The energy shift is not part of the state dict: refit it for the weights just loaded.
        refit_energy_offset(self.model, self.train)
        self.model.eval()
        return CRMSEResult(state, selected, note + self.averaging.note, self.log, self.val_log,
                           self.cfg.chains.temperature, time.perf_counter() - start, self.columns, self.val_wall_s)

    def _iteration(self) -> dict[str, Tensor | float]:
        """One optimiser step; returns the log row (device scalars, no host sync)."""
        for term in self.terms:
            term.advance()
        self.opt.zero_grad(set_to_none=True)
        step = Step()
        losses = [loss for term in self.terms if (loss := term.loss(step)) is not None]
        self.gradient.backward(functools.reduce(operator.add, losses), step, self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        self.averaging.update()
        return {k: v for term in self.terms for k, v in term.log().items()} | {"grad_norm": grad_norm.detach()}

    def _validate(self, it: int, pending: list[dict[str, Tensor | float]], start: float) -> dict[str, float]:
        """Flush the window's rows into the log (the only host sync), validate, offer the checkpoint."""
        window = [{k: float(v) for k, v in r.items()} for r in pending]
        for j, r in enumerate(window):
            self.log.append({"iteration": it - len(window) + 1 + j, **r})
        bad = [r["iteration"] for r in self.log[-len(window):] if not math.isfinite(r["l_mse"] + r["l_c"])]
        if bad:
            raise FloatingPointError(f"CRMSE: non-finite loss at iteration {int(bad[0])}; no checkpoint written")
        summary = self.contrastive.summarize(window)
        with self.averaging.applied(self.train):
            offset = refit_energy_offset(self.model, self.train)
            errors = evaluate_errors(self.model, self.val, batch_size=64)
        self.model.train()
        entry = {"iteration": it, "val_energy_mae": errors["energy_mae"], "val_force_mae": errors["force_mae"],
                 "gap": summary["gap"], "offset_refit": offset, "blowups": summary["blowups"],
                 "n_spurious": summary["n_spurious"], "chain_failures": summary["chain_failures"]}
        self.val_log.append(entry)
        self.val_wall_s.append(time.perf_counter() - start)
        self.selection.consider(entry, self.averaging.state)
        return entry


def _generator(device: torch.device, seed: int) -> torch.Generator:
    """A seeded random stream on ``device``."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


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
