"""Batched BAOAB engine: physics (NVE conservation, equipartition, harmonic ⟨x²⟩), freezing, stability, RNG."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from md_toys import BondPotential, Harmonic, one_thread  # noqa: F401 (autouse fixture)
from synthetic import reference_frame, synthetic_arrays

from crmse.langevin import Langevin, LangevinState, StabilityCheck
from crmse.units import KB, masses


def _ethanol_engine(
    pot, friction: float, dt: float = 0.5, T: float = 500.0, dtype: torch.dtype = torch.float64, **kw
) -> tuple[Langevin, np.ndarray]:
    z, R0, _ = reference_frame("ethanol")
    return Langevin(pot, masses(z), dt=dt, temperature=T, friction=friction, dtype=dtype, **kw), R0


def _nve_total_energy(dt: float) -> np.ndarray:
    """Total energy (steps, replicas) of 1 ps of zero-friction dynamics on Morse bonds."""
    pot, _, _ = BondPotential.for_molecule("ethanol", morse_a=2.0)
    eng, R0 = _ethanol_engine(pot, friction=0.0, dt=dt)
    R = R0[None] + 0.02 * np.random.default_rng(0).standard_normal((8, 9, 3))
    state = eng.init_state(R, seed=1)
    H = []
    for _ in range(round(1000 / dt)):
        eng.step(state)
        H.append((state.E + eng.kinetic_energy(state.V)).numpy())
    assert bool(state.alive.all())
    return np.array(H)


def test_zero_friction_conserves_energy_with_second_order_fluctuations():
    H1, H2 = _nve_total_energy(0.5), _nve_total_energy(0.25)
    # Kinetic energy of 9 atoms at 500 K is ~12 kcal/mol and fluctuates by several kcal/mol;
    # the total energy of a symplectic integrator only wiggles at O(dt²) around a constant.
    fluct1, fluct2 = H1.std(0).mean(), H2.std(0).mean()
    assert fluct1 < 0.03, fluct1
    assert 3.0 < fluct1 / fluct2 < 5.5, (fluct1, fluct2)  # halving dt quarters the wiggle
    for H, fluct in ((H1, fluct1), (H2, fluct2)):
        n = len(H) // 5
        drift = np.abs(H[-n:].mean(0) - H[:n].mean(0))
        assert drift.max() < 0.5 * fluct, (drift, fluct)  # no systematic growth over 1 ps


def test_friction_gives_equipartition_kinetic_energy():
    pot, _, _ = BondPotential.for_molecule("ethanol")
    eng, R0 = _ethanol_engine(pot, friction=0.05, T=500.0)
    state = eng.init_state(np.repeat(R0[None], 64, 0), seed=2)
    eng.step(state, 400)  # thermalise, including the centre of mass the initial draw left at rest
    out = eng.run(state, 2000, save_every=10)
    n = eng.n_atoms
    # DOF convention: total kinetic energy has 3n quadratic terms (friction thermalises the
    # centre of mass too); the reported kinetic temperature uses the internal part, 3n − 3.
    assert eng.dof == 3 * n - 3
    kT = KB * 500.0
    ke = []
    T_kin = out["T_kin"].numpy()
    assert abs(T_kin.mean() / 500.0 - 1) < 0.02, T_kin.mean()
    # Total KE needs velocities: continue and average them directly.
    for _ in range(200):
        eng.step(state, 10)
        ke.append(eng.kinetic_energy(state.V).numpy())
    ke = np.array(ke)
    assert abs(ke.mean() / (1.5 * n * kT) - 1) < 0.03, ke.mean() / (1.5 * n * kT)


def test_harmonic_oscillator_position_variance_is_kT_over_k():
    k, T = 3.0, 300.0  # kcal/mol/Å², K
    eng = Langevin(Harmonic(k), [1.0], dt=1.0, temperature=T, friction=0.05, dtype=torch.float64)
    state = eng.init_state(torch.zeros(2048, 1, 3), seed=3)
    eng.step(state, 200)
    out = eng.run(state, 600, save_every=10)
    x2 = float((out["R"] ** 2).mean())
    assert abs(x2 / (KB * T / k) - 1) < 0.03, x2 / (KB * T / k)
    assert abs(float(out["T_kin"].mean()) / T - 1) < 0.03


def test_initial_velocities_are_maxwell_boltzmann_with_zero_net_momentum():
    pot, _, _ = BondPotential.for_molecule("ethanol")
    eng, R0 = _ethanol_engine(pot, friction=0.01, T=400.0)
    state = eng.init_state(np.repeat(R0[None], 4000, 0), seed=5)
    m = eng.masses.reshape(1, -1, 1)
    assert float((m * state.V).sum(1).abs().max()) < 1e-10
    # Internal kinetic temperature averages to T (3n − 3 DOF after the momentum removal).
    assert abs(float(eng.kinetic_temperature(state.V).mean()) / 400.0 - 1) < 0.01


class _Sabotage:
    """Wraps a potential: from call ``nan_call`` on, replica 1 gets NaN forces; replica 2 is pushed apart."""

    def __init__(self, pot, nan_call: int) -> None:
        self.pot, self.nan_call, self.calls = pot, nan_call, 0

    def __call__(self, R):
        self.calls += 1
        E, F = self.pot(R)
        F = F.clone()
        F[2] = -3.0 * F[2]  # inverted, amplified curvature: replica 2's bonds run away
        if self.calls >= self.nan_call:
            F[1] = float("nan")
        return E, F


def test_exploding_replicas_are_frozen_and_the_rest_continue_unchanged():
    pot, z, R0 = BondPotential.for_molecule("ethanol")
    ref = synthetic_arrays("ethanol", 50, seed=4)["R"]
    check = StabilityCheck.from_reference(z, ref, tolerance=0.5)
    R = R0[None] + 0.01 * np.random.default_rng(1).standard_normal((5, 9, 3))

    clean, _ = _ethanol_engine(pot, friction=0.02, stability=check)
    s_clean = clean.init_state(R, seed=7)
    history = [s_clean.R.clone()]
    for _ in range(150):
        clean.step(s_clean)
        history.append(s_clean.R.clone())

    bad_pot = _Sabotage(pot, nan_call=31)  # call 1 is init_state, so step 30 is the first NaN
    eng, _ = _ethanol_engine(bad_pot, friction=0.02, stability=check)
    state = eng.init_state(R, seed=7)
    eng.step(state, 150)

    assert state.alive.tolist() == [True, False, False, True, True]
    assert int(state.unstable_step[1]) == 30
    s2 = int(state.unstable_step[2])
    assert 0 < s2 < 150
    # Frozen at the last good positions: NaN never enters the state.
    for t in (state.R, state.V, state.F, state.E):
        assert bool(torch.isfinite(t).all())
    torch.testing.assert_close(state.R[1], history[29][1], rtol=0, atol=0)
    assert float(check.deviation(state.R[2:3])) <= 0.5  # last good frame is still within tolerance
    # The healthy replicas follow exactly the trajectory they follow without the failures.
    healthy = [0, 3, 4]
    torch.testing.assert_close(state.R[healthy], s_clean.R[healthy], rtol=0, atol=0)
    assert bool(s_clean.alive.all()) and s_clean.unstable_step.tolist() == [-1] * 5
    # A frozen replica stays put.
    frozen = state.R[1:3].clone()
    eng.step(state, 5)
    torch.testing.assert_close(state.R[1:3], frozen, rtol=0, atol=0)


def test_bond_criterion_fires_on_a_stretched_bond_and_not_on_reference_frames():
    z, R0, _ = reference_frame("ethanol")
    ref = synthetic_arrays("ethanol", 200, seed=0)["R"]
    check = StabilityCheck.from_reference(z, ref, tolerance=0.5, factor=1.3)
    assert len(check.bonds) == 8  # C–C, C–O, O–H, 5 C–H
    others = torch.as_tensor(synthetic_arrays("ethanol", 200, seed=1)["R"])
    assert bool(check(others).all())
    assert float(check.deviation(others).max()) < 0.3

    # Hydroxyl H (atom 8) moved along its O–H bond.
    u = (R0[8] - R0[2]) / np.linalg.norm(R0[8] - R0[2])
    frames = np.repeat(R0[None], 5, 0)
    for f, shift in enumerate((0.4, 0.6, -0.6)):
        frames[f, 8] += shift * u
    frames[3, 0] = np.nan
    frames[4, 5] += np.array([0.0, 0.0, 2.0])  # a methyl H torn away sideways
    ok = check(torch.as_tensor(frames))
    assert ok.tolist() == [True, False, False, False, False]
    np.testing.assert_allclose(float(check.deviation(torch.as_tensor(frames[1:2]))), 0.6, atol=0.05)


def test_stability_check_validates_input():
    with pytest.raises(ValueError, match="tolerance"):
        StabilityCheck([[0, 1]], [1.0], tolerance=0)
    with pytest.raises(ValueError, match="mean lengths"):
        StabilityCheck([[0, 1], [1, 2]], [1.0])


def test_same_seed_same_trajectory_and_different_seed_differs():
    pot, _, _ = BondPotential.for_molecule("ethanol")

    def final(seed: int) -> torch.Tensor:
        eng, R0 = _ethanol_engine(pot, friction=0.05)
        s = eng.init_state(np.repeat(R0[None], 3, 0), seed=seed)
        eng.step(s, 50)
        return s.R

    torch.testing.assert_close(final(11), final(11), rtol=0, atol=0)
    assert not torch.allclose(final(11), final(12))


def test_state_dict_resume_is_bit_identical(tmp_path):
    pot, _, _ = BondPotential.for_molecule("ethanol")
    eng, R0 = _ethanol_engine(pot, friction=0.05, dtype=torch.float32)
    full = eng.init_state(np.repeat(R0[None], 4, 0), seed=3)
    eng.step(full, 40)

    part = eng.init_state(np.repeat(R0[None], 4, 0), seed=3)
    eng.step(part, 15)
    np.savez(tmp_path / "s.npz", **part.state_dict())
    resumed = LangevinState.from_state_dict(dict(np.load(tmp_path / "s.npz")))
    assert resumed.step == 15
    eng.step(resumed, 25)
    for k in ("R", "V", "F", "E"):
        torch.testing.assert_close(getattr(resumed, k), getattr(full, k), rtol=0, atol=0)


def test_reset_restarts_selected_replicas_only():
    pot, z, R0 = BondPotential.for_molecule("ethanol")
    check = StabilityCheck.from_reference(z, R0, tolerance=0.5)
    eng, _ = _ethanol_engine(pot, friction=0.05, stability=check)
    state = eng.init_state(np.repeat(R0[None], 4, 0), seed=0)
    eng.step(state, 10)
    state.alive[1] = False  # as if replica 1 had blown up
    state.unstable_step[1] = 7
    before = state.R.clone(), state.V.clone()
    R_new = np.repeat(R0[None], 4, 0) + 0.05
    mask = torch.tensor([False, True, True, False])
    eng.reset(state, mask, R_new)
    assert state.alive.all() and state.unstable_step.tolist() == [-1, -1, -1, -1]
    torch.testing.assert_close(state.R[1:3], torch.as_tensor(R_new[1:3]), rtol=0, atol=1e-12)
    torch.testing.assert_close(state.R[[0, 3]], before[0][[0, 3]], rtol=0, atol=0)
    torch.testing.assert_close(state.V[[0, 3]], before[1][[0, 3]], rtol=0, atol=0)
    assert not torch.allclose(state.V[1:3], before[1][1:3])
    E, F = pot(state.R)
    torch.testing.assert_close(state.F, F.to(state.F.dtype))  # forces of the new positions are stored
    # Resetting onto a broken geometry records it as unstable at the current step.
    broken = R_new.copy()
    broken[0, 8] += 3.0
    eng.reset(state, torch.tensor([True, False, False, False]), broken)
    assert state.alive.tolist() == [False, True, True, True] and int(state.unstable_step[0]) == state.step


def test_bad_arguments_are_rejected_with_clear_errors():
    pot, _, _ = BondPotential.for_molecule("ethanol")
    with pytest.raises(ValueError, match="dt"):
        _ethanol_engine(pot, friction=0.01, dt=0.0)
    with pytest.raises(ValueError, match="friction"):
        _ethanol_engine(pot, friction=-1.0)
    with pytest.raises(ValueError, match="temperature"):
        _ethanol_engine(pot, friction=0.01, T=-5.0)
    eng, R0 = _ethanol_engine(pot, friction=0.01)
    with pytest.raises(ValueError, match=r"shape \(B, 9, 3\)"):
        eng.init_state(R0)


# -- issue 31.9: frozen replicas leave the model's batch; nobody else's trajectory changes ------------------------


class _Fuse:
    """Wraps a potential: a frame whose centroid x passes ``x_max`` gets inverted, amplified forces (it blows up).

    Frame-separable (the fault depends on the frame itself, not its row), as the engine's contract asks;
    records the batch size of every call.
    """

    def __init__(self, pot, x_max: float, batch_offset: float = 0.0) -> None:
        self.pot, self.x_max, self.batch_offset, self.sizes = pot, x_max, batch_offset, []

    def __call__(self, R):
        self.sizes.append(len(R))
        E, F = self.pot(R)
        lit = R[:, :, 0].mean(1) > self.x_max
        # batch_offset != 0: a model whose result depends on the batch size (as BLAS rounding can make it).
        return E + self.batch_offset * len(R), torch.where(lit[:, None, None], -5.0 * F, F)


def _fused_runs(batch_offset: float = 0.0, steps: int = 600):
    pot, z, R0 = BondPotential.for_molecule("ethanol")
    check = StabilityCheck.from_reference(z, synthetic_arrays("ethanol", 50, seed=4)["R"], tolerance=0.5)
    R = R0[None] + 0.01 * np.random.default_rng(1).standard_normal((12, 9, 3))
    runs = {}
    for compact in (False, True):
        fuse = _Fuse(pot, R0[:, 0].mean() + 0.3, batch_offset)
        eng = Langevin(fuse, masses(z), 0.5, 500.0, 0.05, check, dtype=torch.float32, compact=compact)
        state = eng.init_state(R, seed=3)
        runs[compact] = (eng, state, eng.run(state, steps, 10), fuse)
    return runs


def test_frozen_replicas_leave_the_batch_and_the_others_stay_bit_identical():
    runs = _fused_runs()
    (eng0, s0, out0, fuse0), (eng1, s1, out1, fuse1) = runs[False], runs[True]
    dead = s0.unstable_step.tolist()
    assert sum(d > 0 for d in dead) == 4 and len({d for d in dead if d > 0}) == 4  # four die, at different steps
    for k in out0:
        assert torch.equal(out0[k], out1[k]), k  # every saved frame of every replica, to the bit
    for k, v in s0.state_dict().items():
        np.testing.assert_array_equal(v, s1.state_dict()[k], err_msg=k)
    assert set(fuse0.sizes) == {12}
    assert min(fuse1.sizes) == 8 and sum(fuse1.sizes) < sum(fuse0.sizes) - 1000  # the frozen ones left the batch
    assert eng1.compaction["off_reason"] is None and eng1.compaction["checks"] >= 1
    assert eng1.compaction["rows_skipped"] > 1000 and eng0.compaction["rows_skipped"] == 0


def test_compaction_switches_itself_off_when_the_model_depends_on_the_batch_size():
    runs = _fused_runs(batch_offset=1e-9)
    (_, _, out0, _), (eng1, _, out1, _) = runs[False], runs[True]
    assert eng1.compaction["off_reason"] is not None and "depends on the batch size" in eng1.compaction["off_reason"]
    for k in out0:
        assert torch.equal(out0[k], out1[k]), k  # the check step used the full batch; nothing changed


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_compaction_with_the_schnet_model_changes_no_bit(dtype):
    """The real model: compacted only where its kernels give the same bits for any batch size (see the report)."""
    from crmse.data import Frames
    from crmse.model import build_model

    a = synthetic_arrays("ethanol", 40, 3)
    fr = Frames(a["z"].astype(np.int64), a["R"], a["E"][:, 0], a["F"], a["md17_index"])
    torch.manual_seed(0)
    cfg = {"n_atom_basis": 64, "n_filters": 64, "n_interactions": 1, "n_rbf": 20, "cutoff": 5.0, "dtype": dtype}
    model = build_model(fr.z, cfg, fr).eval()  # as the sample stage runs it
    check = StabilityCheck.from_reference(fr.z, fr.R, tolerance=0.3)  # the untrained model: all die, one by one
    outs = {}
    for compact in (False, True):
        eng = Langevin(model.energy_and_forces, masses(fr.z), 0.5, 500.0, 0.05, check, dtype=model.dtype,
                       compact=compact)
        state = eng.init_state(fr.R[:8], seed=1)
        outs[compact] = (eng.run(state, 120, 10), state.unstable_step.clone())
    assert (outs[False][1] > 0).sum() >= 4
    for k in outs[False][0]:
        assert torch.equal(outs[False][0][k], outs[True][0][k]), k
    assert torch.equal(outs[False][1], outs[True][1])
