"""Batched BAOAB Langevin dynamics (Leimkuhler–Matthews) on B replicas of one molecule.

One engine serves the sampling stage and the CRMSE chains (docs/method.md §5).
Units: Å, fs, amu, kcal/mol, K; friction γ in 1/fs (γ = 0 gives velocity Verlet).

* The energy model is any callable ``energy_forces(R (B, n, 3)) -> (E (B,), F (B, n, 3))``
  (kcal/mol, kcal/mol/Å), frame-separable (row b depends on R[b] only, not on its row index or
  the batch); it is evaluated exactly once per step (the forces of the new positions are kept
  in the state and reused by the next step's first half-kick).
* Everything lives on the state's device; a step does no host round-trip (no ``.item()``,
  no ``.cpu()``), so many steps queue up on a GPU and run back to back (one round-trip per
  :meth:`Langevin.step` call decides which replicas the model sees).
* A replica whose positions, energy or forces go non-finite, or whose bonds deviate from
  the reference means by more than the tolerance (:class:`StabilityCheck`), is frozen at
  its last good state (``alive`` False, ``unstable_step`` = the step that failed). Its
  positions stop changing and nothing non-finite ever enters the state, so one exploding
  replica cannot poison the others or crash the run.
* Frozen replicas are taken out of the model evaluation (``compact``): the integrator still
  updates the whole batch (its elementwise arithmetic is then the same to the bit) and only the
  alive rows go through the model. That leaves every survivor's trajectory bit-identical only if
  the model's result for a frame does not depend on the batch it is in; MKL's gemm breaks that
  for some batch sizes in float64, and so do torch's atomic CPU adds on several threads unless its
  deterministic kernels are on (:func:`crmse.stage.configure_torch`), so the first evaluation of each
  new set of alive replicas is checked against the full batch and, at the first difference,
  compaction is switched off for good (:attr:`Langevin.compaction`).
* Randomness comes from one seeded :class:`torch.Generator` carried in the state, and the
  noise is drawn for every replica every step whatever the alive pattern: same seed, same
  device → the same trajectory, and a state saved with :meth:`LangevinState.state_dict`
  resumes bit-identically.

Degrees of freedom: initial velocities have zero net momentum per replica; the kinetic
temperature reported here uses the internal kinetic energy (centre-of-mass motion
removed) over 3n − 3 degrees of freedom, which is unbiased both with friction (where the
centre of mass is thermalised separately) and without (where it stays at rest).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crmse.observables import BondReference
from crmse.units import ACCEL, KB, KINETIC

EnergyForces = Callable[[Tensor], tuple[Tensor, Tensor]]


def _as_tensor(x: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device=device, dtype=dtype)
    return torch.as_tensor(np.asarray(x), device=device, dtype=dtype)


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """True when two float tensors are identical bit for bit (NaN included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    as_int = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
              torch.bfloat16: torch.int16}
    return torch.equal(a.view(as_int[a.dtype]), b.view(as_int[b.dtype]))


class StabilityCheck:
    """Stability criterion of docs/method.md §5: finite positions, and every bond within ``tolerance`` Å of its mean.

    ``bonds`` (n_bonds, 2) and ``mean_lengths`` (n_bonds,) come from reference frames
    (:meth:`from_reference`): the covalent-radius graph of :func:`crmse.geometry.bond_graph`
    and the mean length of each bond over those frames.
    """

    def __init__(self, bonds: Any, mean_lengths: Any, tolerance: float = 0.5) -> None:
        if not tolerance > 0:
            raise ValueError(f"stability tolerance must be positive, got {tolerance} Å")
        self.bonds = _as_tensor(bonds, dtype=torch.long).reshape(-1, 2)
        self.mean_lengths = _as_tensor(mean_lengths, dtype=torch.float64).reshape(-1)
        if len(self.bonds) != len(self.mean_lengths):
            raise ValueError(f"{len(self.bonds)} bonds but {len(self.mean_lengths)} mean lengths")
        if len(self.bonds) == 0:
            raise ValueError("stability check needs at least one bond")
        self.tolerance = float(tolerance)

    @classmethod
    def from_reference(cls, z: Any, R: Any, tolerance: float = 0.5, factor: float = 1.3) -> StabilityCheck:
        """Bond graph (covalent radii × ``factor``) and mean bond lengths of reference frames R (N, n, 3) Å."""
        ref = BondReference.from_frames(np.asarray(z), R, factor)
        return cls(ref.bonds, ref.mean_lengths, tolerance)

    def to(self, device: torch.device | str) -> StabilityCheck:
        return StabilityCheck(self.bonds.to(device), self.mean_lengths.to(device), self.tolerance)

    def _on(self, R: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Bond endpoints and mean lengths on R's device and dtype (cached: no copies per step)."""
        key = (R.device, R.dtype)
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            b = self.bonds.to(R.device)
            cache[key] = (b[:, 0].contiguous(), b[:, 1].contiguous(), self.mean_lengths.to(R.device, R.dtype))
        return cache[key]

    def deviation(self, R: Any) -> Tensor:
        """Largest |bond length − reference mean| (Å) per frame of R (..., n, 3); NaN for non-finite frames."""
        R = _as_tensor(R)
        i, j, mean = self._on(R)
        d = (R.index_select(-2, j) - R.index_select(-2, i)).norm(dim=-1)
        # amax propagates NaN: a non-finite frame gets a NaN deviation, which fails `<= tolerance`.
        return (d - mean).abs().amax(-1)

    def __call__(self, R: Any) -> Tensor:
        """True where a frame of R (..., n, 3) is stable (finite and every bond within tolerance)."""
        R = _as_tensor(R)
        return torch.isfinite(R.sum((-2, -1))) & (self.deviation(R) <= self.tolerance)


@dataclass
class LangevinState:
    """Per-replica dynamical state, carried between calls (device tensors).

    R, V (B, n, 3) Å and Å/fs; F (B, n, 3) kcal/mol/Å and E (B,) kcal/mol of the current R;
    alive (B,) bool; unstable_step (B,) long, the step at which the replica failed (−1 =
    never; 0 = already unstable when (re)initialised); step, steps taken since the state was
    created; generator, the RNG of the thermostat noise and of velocity draws.
    """

    R: Tensor
    V: Tensor
    F: Tensor
    E: Tensor
    alive: Tensor
    unstable_step: Tensor
    step: int
    generator: torch.Generator

    @property
    def batch_size(self) -> int:
        return self.R.shape[0]

    @property
    def device(self) -> torch.device:
        return self.R.device

    def state_dict(self) -> dict[str, np.ndarray]:
        """Host copy of everything needed to resume bit-identically (numpy arrays, npz-able)."""
        out = {k: getattr(self, k).detach().cpu().numpy() for k in ("R", "V", "F", "E", "alive", "unstable_step")}
        out["step"] = np.array(self.step, dtype=np.int64)
        out["rng_state"] = self.generator.get_state().numpy()
        return out

    @classmethod
    def from_state_dict(cls, d: dict[str, Any], device: torch.device | str = "cpu") -> LangevinState:
        """Inverse of :meth:`state_dict` (the RNG continues where it stopped)."""
        device = torch.device(device)
        gen = torch.Generator(device=device)
        gen.set_state(torch.as_tensor(np.asarray(d["rng_state"]), dtype=torch.uint8))
        t = {k: torch.as_tensor(np.asarray(d[k])).to(device) for k in ("R", "V", "F", "E", "alive", "unstable_step")}
        return cls(**t, step=int(np.asarray(d["step"])), generator=gen)


class Langevin:
    """BAOAB Langevin integrator for B replicas of one molecule.

    Args:
        energy_forces: ``R (B, n, 3) -> (E (B,) kcal/mol, F (B, n, 3) kcal/mol/Å)``.
        masses: (n,) amu (e.g. :func:`crmse.units.masses`).
        dt: time step, fs.
        temperature: bath temperature, K (also the temperature of velocity draws).
        friction: γ, 1/fs (0 = velocity Verlet, energy-conserving).
        stability: optional bond criterion; non-finite values always freeze a replica.
        device, dtype: where and in what precision R, V, F live (use the model's dtype).
        compact: evaluate only the alive replicas (frozen ones cost nothing), checked to change no bit.
    """

    def __init__(
        self,
        energy_forces: EnergyForces,
        masses: Any,
        dt: float,
        temperature: float,
        friction: float = 0.01,
        stability: StabilityCheck | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        compact: bool = True,
    ) -> None:
        if not (dt > 0 and math.isfinite(dt)):
            raise ValueError(f"dt must be a positive number of fs, got {dt}")
        if not (friction >= 0 and math.isfinite(friction)):
            raise ValueError(f"friction must be >= 0 (1/fs), got {friction}")
        self.energy_forces = energy_forces
        self.device = torch.device(device)
        self.dtype = dtype
        m = _as_tensor(masses, self.device, torch.float64).reshape(-1)
        if not bool((m > 0).all()):
            raise ValueError("masses must be positive (amu)")
        self.masses = m
        self.n_atoms = len(m)
        # ACCEL converts kcal/mol/Å per amu into Å/fs².
        self._kick = (ACCEL / m).to(dtype).reshape(1, -1, 1)
        self.dt = float(dt)
        self.friction = float(friction)
        self.stability = stability.to(self.device) if stability is not None else None
        self.temperature = temperature  # sets the noise amplitudes
        self.compact = bool(compact)
        #: How compaction went: model rows evaluated and skipped, checks made, and why it was switched off.
        self.compaction: dict[str, Any] = {"rows_evaluated": 0, "rows_skipped": 0, "checks": 0, "off_reason": None}
        self._checked: Tensor | None = None  # the alive set whose compacted evaluation was last checked

    # -- parameters ---------------------------------------------------------------------
    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"temperature must be a positive number of K, got {value}")
        self._temperature = float(value)
        # Thermal velocity scale per atom: <v_x²> = k_B T / m in Å²/fs² (KINETIC converts amu Å²/fs²).
        self._v_thermal = torch.sqrt(KB * value / (self.masses * KINETIC)).to(self.dtype).reshape(1, -1, 1)

    @property
    def dof(self) -> int:
        """Degrees of freedom of the kinetic temperature: 3n − 3 (net momentum removed)."""
        return 3 * self.n_atoms - 3 if self.n_atoms > 1 else 3

    # -- model --------------------------------------------------------------------------
    def _evaluate(self, R: Tensor) -> tuple[Tensor, Tensor]:
        E, F = self.energy_forces(R)
        return E.detach().to(torch.float64).reshape(R.shape[0]), F.detach().to(self.dtype).reshape(R.shape)

    def _active_rows(self, state: LangevinState) -> Tensor | None:
        """Indices of the alive replicas when some are frozen, else None (whole batch); one host sync."""
        if not self.compact or self.compaction["off_reason"] is not None:
            return None
        if bool(state.alive.all()):
            return None
        return torch.nonzero(state.alive).reshape(-1)

    def _evaluate_rows(self, R: Tensor, state: LangevinState, rows: Tensor | None) -> tuple[Tensor, Tensor]:
        """(E, F) of the whole batch R, the model run on ``rows`` only (others keep the frozen state's E, F).

        The first time a set of rows is used, the result is compared bit for bit with the full batch's;
        a difference switches compaction off (this step then uses the full batch's result).
        """
        B = R.shape[0]
        if rows is None or self.compaction["off_reason"] is not None:
            self.compaction["rows_evaluated"] += B
            return self._evaluate(R)
        self.compaction["rows_skipped"] += B - len(rows)
        self.compaction["rows_evaluated"] += len(rows)
        if len(rows) == 0:  # every replica frozen: nothing to evaluate, nothing will be kept
            return state.E, state.F
        E_rows, F_rows = self._evaluate(R.index_select(0, rows))
        if self._checked is None or not torch.equal(self._checked, rows):
            self.compaction["checks"] += 1
            self.compaction["rows_evaluated"] += B
            E_full, F_full = self._evaluate(R)
            same = _same_bits(E_full.index_select(0, rows), E_rows) and _same_bits(F_full.index_select(0, rows), F_rows)
            if not same:
                self.compaction["off_reason"] = (
                    f"the model's result for a frame depends on the batch size ({B} vs {len(rows)} replicas; "
                    "e.g. BLAS rounding in float64, or atomic adds on several threads without torch's deterministic "
                    "kernels): frozen replicas stay in the batch"
                )
                print(f"langevin: compaction off: {self.compaction['off_reason']}")
                return E_full, F_full
            self._checked = rows
        return state.E.index_copy(0, rows, E_rows), state.F.index_copy(0, rows, F_rows)

    def _ok(self, R: Tensor, E: Tensor, F: Tensor, V: Tensor | None = None) -> Tensor:
        """Per-replica health: finite E, F (and V), and R passing the stability check (or finite R).

        A per-replica sum is non-finite exactly when some element is NaN/±inf (or the sum
        overflows, which only an already exploded replica does): one reduction per tensor.
        """
        ok = torch.isfinite(E) & torch.isfinite(F.sum((1, 2)))
        if V is not None:
            ok = ok & torch.isfinite(V.sum((1, 2)))
        if self.stability is not None:
            return ok & self.stability(R)  # a NaN position gives a NaN bond length, which fails
        return ok & torch.isfinite(R.sum((1, 2)))

    # -- velocities ---------------------------------------------------------------------
    def maxwell_boltzmann(self, batch: int, generator: torch.Generator) -> Tensor:
        """Velocities (batch, n, 3) Å/fs from Maxwell–Boltzmann at the bath temperature, zero net momentum."""
        xi = torch.randn((batch, self.n_atoms, 3), generator=generator, device=self.device, dtype=self.dtype)
        return self.remove_net_momentum(xi * self._v_thermal)

    def remove_net_momentum(self, V: Tensor) -> Tensor:
        """V with each replica's centre-of-mass velocity subtracted (a single atom is left as is)."""
        if self.n_atoms == 1:
            return V
        m = self.masses.to(V.dtype).reshape(1, -1, 1)
        v_com = (m * V).sum(1, keepdim=True) / m.sum()
        return V - v_com

    # -- state --------------------------------------------------------------------------
    def init_state(self, R: Any, seed: int | torch.Generator = 0) -> LangevinState:
        """New state from positions R (B, n, 3) Å with fresh Maxwell–Boltzmann velocities (one model evaluation)."""
        R = _as_tensor(R, self.device, self.dtype)
        if R.ndim != 3 or R.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"positions must have shape (B, {self.n_atoms}, 3), got {tuple(R.shape)}")
        if isinstance(seed, torch.Generator):
            gen = seed
        else:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(seed))
        V = self.maxwell_boltzmann(R.shape[0], gen)
        E, F = self._evaluate(R)
        ok = self._ok(R, E, F)
        unstable = torch.where(ok, -1, 0).to(torch.long)
        # Never let non-finite values into the state, even for a replica that starts dead.
        m = ok[:, None, None]
        state = LangevinState(
            R=torch.where(torch.isfinite(R), R, 0.0),
            V=V,
            F=torch.where(m, F, 0.0),
            E=torch.where(ok, E, 0.0),
            alive=ok,
            unstable_step=unstable,
            step=0,
            generator=gen,
        )
        return state

    def reset(self, state: LangevinState, mask: Tensor, R: Any) -> None:
        """Restart the replicas selected by ``mask`` (B,) bool from positions R (B, n, 3) with fresh MB velocities.

        Rows of R outside the mask are ignored. Reset replicas become alive (unless R itself
        fails the check, then they are recorded unstable at the current step). One model
        evaluation of the whole batch; the RNG advances by one full-batch velocity draw
        whatever the mask, so the stream stays independent of which replicas were reset.
        """
        R = _as_tensor(R, self.device, self.dtype)
        mask = _as_tensor(mask, self.device, torch.bool).reshape(-1)
        if R.shape != state.R.shape or mask.shape != (state.batch_size,):
            raise ValueError(
                f"reset needs mask ({state.batch_size},) and positions {tuple(state.R.shape)}, "
                f"got {tuple(mask.shape)} and {tuple(R.shape)}"
            )
        m = mask[:, None, None]
        R_new = torch.where(m, R, state.R)
        V_new = self.maxwell_boltzmann(state.batch_size, state.generator)
        E, F = self._evaluate(R_new)
        ok = self._ok(R_new, E, F)
        good = mask & ok
        g = good[:, None, None]
        state.R = torch.where(g, R_new, state.R)
        state.V = torch.where(g, V_new, state.V)
        state.F = torch.where(g, F, state.F)
        state.E = torch.where(good, E, state.E)
        state.alive = torch.where(mask, ok, state.alive)
        state.unstable_step = torch.where(mask, torch.where(ok, -1, state.step), state.unstable_step)

    # -- dynamics -----------------------------------------------------------------------
    def step(self, state: LangevinState, n_steps: int = 1) -> LangevinState:
        """Advance ``state`` in place by ``n_steps`` BAOAB steps (one model evaluation each)."""
        half = 0.5 * self.dt
        c1 = math.exp(-self.friction * self.dt)
        noise = self._v_thermal * math.sqrt(max(0.0, 1.0 - c1 * c1))
        kick = half * self._kick
        rows = self._active_rows(state) if n_steps > 0 else None  # a replica frozen during the call stays in
        for _ in range(n_steps):
            # Fused multiply-adds keep the per-step op count (the CPU overhead at small B) low.
            V = torch.addcmul(state.V, kick, state.F)  # B: half kick with the stored forces
            R = torch.add(state.R, V, alpha=half)  # A
            if self.friction > 0:  # O: exact Ornstein–Uhlenbeck update
                xi = torch.randn(V.shape, generator=state.generator, device=self.device, dtype=self.dtype)
                V = torch.addcmul(V.mul_(c1), noise, xi)
            R.add_(V, alpha=half)  # A
            E, F = self._evaluate_rows(R, state, rows)  # the step's only model evaluation (alive rows)
            V.addcmul_(kick, F)  # B
            ok = state.alive & self._ok(R, E, F, V)
            newly = state.alive & ~ok
            state.step += 1
            state.unstable_step = torch.where(newly, state.step, state.unstable_step)
            m = ok[:, None, None]
            # torch.where never propagates NaN from the branch it does not select.
            state.R = torch.where(m, R, state.R)
            state.V = torch.where(m, V, state.V)
            state.F = torch.where(m, F, state.F)
            state.E = torch.where(ok, E, state.E)
            state.alive = ok
        return state

    def run(self, state: LangevinState, n_steps: int, save_every: int) -> dict[str, Tensor]:
        """Advance ``n_steps`` and record every ``save_every``-th step (device tensors, stacked over saves).

        Returns R (T, B, n, 3), E (T, B), T_kin (T, B), alive (T, B) with T = n_steps // save_every;
        frames of replicas no longer alive hold their frozen state (mask them with ``alive``).
        """
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        saves: dict[str, list[Tensor]] = {"R": [], "E": [], "T_kin": [], "alive": []}
        done = 0
        while done < n_steps:
            k = min(save_every, n_steps - done)
            self.step(state, k)
            done += k
            if k == save_every:
                saves["R"].append(state.R.clone())
                saves["E"].append(state.E.clone())
                saves["T_kin"].append(self.kinetic_temperature(state.V))
                saves["alive"].append(state.alive.clone())
        B, n = state.batch_size, self.n_atoms
        empty = {"R": (0, B, n, 3), "E": (0, B), "T_kin": (0, B), "alive": (0, B)}
        return {
            k: torch.stack(v) if v else torch.zeros(empty[k], device=self.device) for k, v in saves.items()
        }

    # -- observables --------------------------------------------------------------------
    def kinetic_energy(self, V: Tensor, internal: bool = False) -> Tensor:
        """Kinetic energy (B,) kcal/mol; ``internal`` removes the centre-of-mass motion."""
        m = self.masses.reshape(1, -1, 1)
        V = V.to(torch.float64)
        ke = 0.5 * KINETIC * (m * V * V).sum((1, 2))
        if internal:
            p = (m * V).sum(1)
            ke = ke - 0.5 * KINETIC * (p * p).sum(-1) / m.sum()
        return ke

    def kinetic_temperature(self, V: Tensor) -> Tensor:
        """Instantaneous kinetic temperature (B,) K from the internal kinetic energy over 3n − 3 DOF."""
        return 2.0 * self.kinetic_energy(V, internal=self.n_atoms > 1) / (self.dof * KB)
