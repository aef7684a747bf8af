"""Verlet pair list: same energies and forces as the all-pairs model, rebuilt when atoms move."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from md_toys import one_thread  # noqa: F401 (autouse fixture)
from synthetic import synthetic_arrays

from crmse.data import Frames
from crmse.langevin import Langevin
from crmse.model import build_model
from crmse.pairlist import VerletPotential
from crmse.units import masses

# Cutoff 2.5 Å: in ethanol (extent ~3.7 Å) a good share of the pairs lies beyond it.
TINY = {"n_atom_basis": 8, "n_filters": 8, "n_interactions": 1, "n_rbf": 6, "cutoff": 2.5, "dtype": "float64"}


@pytest.fixture(scope="module")
def model_and_frames():
    a = synthetic_arrays("ethanol", 16, seed=2)
    frames = Frames(a["z"].astype(np.int64), a["R"], a["E"][:, 0], a["F"], a["md17_index"])
    torch.manual_seed(0)
    return build_model(frames.z, TINY, frames).eval(), frames


def test_pruned_pairs_give_the_all_pairs_energies_and_forces(model_and_frames):
    model, frames = model_and_frames
    R = torch.as_tensor(frames.R)
    d = np.linalg.norm(frames.R[:, :, None] - frames.R[:, None], axis=-1)
    assert (d > 2.5 + 0.3).sum() > 0.2 * d.size  # pruning really drops pairs here
    E0, F0 = model.energy_and_forces(R)
    for prune in (True, False):
        vl = VerletPotential(model, skin=0.3, prune=prune)
        E1, F1 = vl(R)
        torch.testing.assert_close(E1, E0, rtol=0, atol=1e-9)
        torch.testing.assert_close(F1, F0, rtol=0, atol=1e-9)
        assert len(vl._ii) < R.shape[0] * 72


def test_md_with_a_verlet_list_follows_the_all_pairs_trajectory(model_and_frames):
    model, frames = model_and_frames
    vl = VerletPotential(model, skin=0.05, prune=False)  # small skin: many rebuilds in 60 steps
    runs = []
    for ef in (model.energy_and_forces, vl):
        eng = Langevin(ef, masses(frames.z), dt=0.5, temperature=500.0, friction=0.02, dtype=torch.float64)
        state = eng.init_state(frames.R[:4], seed=1)
        eng.step(state, 60)
        runs.append(state.R)
    assert vl.rebuilds > 3
    torch.testing.assert_close(runs[1], runs[0], rtol=0, atol=1e-7)


def test_a_nan_replica_does_not_hide_the_motion_of_the_others(model_and_frames):
    model, frames = model_and_frames
    vl = VerletPotential(model, skin=0.2)
    R = torch.as_tensor(frames.R[:3]).clone()
    vl(R)
    moved = R.clone()
    moved[0, 0, 0] += 0.5  # more than skin/2: must rebuild
    moved[1] = float("nan")
    n = vl.rebuilds
    E, F = vl(moved)
    assert vl.rebuilds == n + 1
    E0, F0 = model.energy_and_forces(moved[[0, 2]])
    torch.testing.assert_close(E[[0, 2]], E0, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match="skin"):
        VerletPotential(model, skin=0.0)
