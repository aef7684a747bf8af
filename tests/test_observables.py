"""Observables with known answers (docs/method.md §6): geometry, distributions, detectors, noise floor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation
from synthetic import reference_frame, synthetic_arrays

from crmse.geometry import bond_graph
from crmse.molecules import ATOMIC_NUMBERS, TORSIONS, Torsion
from crmse.observables import (
    HR_EDGES,
    BondReference,
    SpuriousDetector,
    compare,
    contiguous_halves,
    dihedral,
    dihedral_free_energy,
    dihedral_metrics,
    distributions,
    energy_histogram,
    energy_metrics,
    first_unstable_frame,
    hr_histogram,
    hr_mae,
    noise_floor,
    replica_bootstrap,
    stability_summary,
    stable_fraction_curve,
    torsion_angles,
    valid_mask,
)
from crmse.units import KB

# ---------------------------------------------------------------------------------------------------- helpers


def _pool(n: int = 120, seed: int = 0) -> dict:
    a = synthetic_arrays("ethanol", n, seed)
    a["E"] = a["E"].reshape(-1)
    return a


def _detector(pool: dict) -> SpuriousDetector:
    bonds = bond_graph(pool["z"], pool["R"])
    return SpuriousDetector.from_reference(pool["z"], pool["R"], pool["E"], bonds, 5.0, 0.25)


def _quad(phi_deg: float) -> np.ndarray:
    """Four atoms i, j, k, l with j→k along +z and torsion angle ``phi_deg`` (l rotated from i about z)."""
    p = np.radians(phi_deg)
    return np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.5], [np.cos(p), np.sin(p), 1.5]])


# ---------------------------------------------------------------------------------------------------- torsions


@pytest.mark.parametrize("molecule", sorted(TORSIONS))
def test_torsion_atoms_form_a_bonded_chain_in_the_real_frame(molecule):
    z, R, _ = reference_frame(molecule)
    assert tuple(z) == ATOMIC_NUMBERS[molecule]
    bonds = {tuple(b) for b in bond_graph(z, R, 1.3)}
    for t in TORSIONS[molecule]:
        for i, j, k, l in t.atoms:
            assert len({i, j, k, l}) == 4, t.name
            for a, b in ((i, j), (j, k), (k, l)):
                assert (min(a, b), max(a, b)) in bonds, f"{molecule} {t.name}: atoms {a}-{b} are not bonded"
            # and the torsion spans the actual chain: i and l are not bonded to k and j respectively
            assert (min(i, k), max(i, k)) not in bonds and (min(j, l), max(j, l)) not in bonds, t.name


ELEMENTS = {
    ("ethanol", "hydroxyl"): "HOCC",
    ("ethanol", "methyl"): "HCCO",
    ("aspirin", "ester"): "COCC",
    ("aspirin", "ring_ester"): "CCOC",
    ("aspirin", "carboxyl"): "CCCO",
    ("aspirin", "acid"): "OCOH",
}


def test_torsion_table_names_the_intended_elements():
    sym = {1: "H", 6: "C", 8: "O"}
    for molecule, torsions in TORSIONS.items():
        z = ATOMIC_NUMBERS[molecule]
        assert {(molecule, t.name) for t in torsions} <= set(ELEMENTS)
        for t in torsions:
            for quad in t.atoms:
                assert "".join(sym[z[a]] for a in quad) == ELEMENTS[(molecule, t.name)], (molecule, t.name, quad)


# ---------------------------------------------------------------------------------------------------- dihedrals


@pytest.mark.parametrize("phi", [60.0, 180.0, -60.0, 120.0, -150.0, 0.0, 5.0])
def test_dihedral_of_hand_built_geometry_and_iupac_sign(phi):
    from ase import Atoms

    R = _quad(phi)
    assert dihedral(R, (0, 1, 2, 3)) == pytest.approx(phi, abs=1e-9)
    # ASE uses the IUPAC convention too (in [0, 360))
    assert np.isclose(Atoms("H4", positions=R).get_dihedral(0, 1, 2, 3) % 360, phi % 360, atol=1e-9)
    # the reversed chain l-k-j-i has the same angle (sign convention is symmetric), the mirror image the opposite
    assert dihedral(R, (3, 2, 1, 0)) == pytest.approx(phi, abs=1e-9)
    mirrored = R * np.array([1.0, -1.0, 1.0])
    assert dihedral(mirrored, (0, 1, 2, 3)) == pytest.approx(-phi if abs(phi) != 180 else 180.0, abs=1e-9)


def test_dihedral_sign_by_clockwise_rule():
    # Looking along j→k (+z, from below), +x → +y is a clockwise turn: +60° is clockwise, so positive.
    assert dihedral(_quad(60.0), (0, 1, 2, 3)) > 0
    assert dihedral(_quad(-60.0), (0, 1, 2, 3)) < 0


def test_dihedral_periodicity_at_180():
    angles = np.array([179.9, -179.9, 180.0, -180.0, 540.0, -540.0 + 0.1])
    R = np.stack([_quad(a) for a in angles])
    phi = dihedral(R, (0, 1, 2, 3))
    assert np.all(phi > -180.0) and np.all(phi <= 180.0)
    np.testing.assert_allclose(phi, [179.9, -179.9, 180.0, 180.0, 180.0, -179.9], atol=1e-9)
    # rigid motions do not change it; batch dims are kept
    rot = Rotation.random(random_state=3).as_matrix()
    np.testing.assert_allclose(dihedral(R @ rot.T + 2.0, (0, 1, 2, 3)), phi, atol=1e-9)
    assert dihedral(R.reshape(2, 3, 4, 3), (0, 1, 2, 3)).shape == (2, 3)
    # ±179.9° fall into the two edge bins of the periodic grid, each with one count: same free energy
    F = dihedral_free_energy(phi[:2], 36, 500.0)
    assert F[0] == 0.0 and F[-1] == 0.0 and np.isnan(F[1:-1]).all()


def test_free_energy_of_uniform_distribution_is_flat():
    phi = np.linspace(-180.0, 180.0, 36 * 1000, endpoint=False) + 0.005  # exactly uniform over the bins
    F = dihedral_free_energy(phi, 36, 500.0)
    np.testing.assert_allclose(F, 0.0, atol=1e-12)
    rng = np.random.default_rng(0)
    F = dihedral_free_energy(rng.uniform(-180, 180, 400_000), 36, 500.0)
    assert np.nanmax(F) < 0.05 and np.isfinite(F).all()  # sampling noise only: ~kT·3/√(N/36)


def test_free_energy_is_minus_kt_log_p():
    # bin 0 holds e² times the angles of bin 1, so F(bin1) − F(bin0) = 2 kT.
    counts = (739, 100)  # 739/100 ≈ e^2
    phi = np.concatenate([np.full(counts[0], -175.0), np.full(counts[1], -165.0)])
    F = dihedral_free_energy(phi, 36, 400.0)
    assert F[1] - F[0] == pytest.approx(KB * 400.0 * np.log(counts[0] / counts[1]))
    assert F[0] == 0.0


def test_dihedral_metrics_rmse_and_unvisited():
    F_ref = np.array([0.0, 1.0, 2.0, np.nan, 0.5])
    F_sim = np.array([0.0, 1.5, np.nan, 1.0, 0.0])
    m = dihedral_metrics(F_sim, F_ref)
    assert m["rmse"] == pytest.approx(np.sqrt((0 + 0.25 + 0.25) / 3))
    assert m["unvisited"] == pytest.approx(1 / 4)


def test_methyl_torsion_pools_three_quadruples():
    pool = _pool(10)
    t = TORSIONS["ethanol"][1]
    assert t.name == "methyl" and len(t.atoms) == 3
    angles = torsion_angles(pool["R"], t)
    assert angles.shape == (30,)
    np.testing.assert_allclose(angles[:10], dihedral(pool["R"], t.atoms[0]))
    # in the real frame the three methyl H sit ~120° apart around the C–C axis
    _, R0, _ = reference_frame("ethanol")
    a = np.array([dihedral(R0, q) for q in t.atoms])
    np.testing.assert_allclose(np.sort((a[1:] - a[0]) % 360.0), [120, 240], atol=10)


# ---------------------------------------------------------------------------------------------------- h(r)


def _mdsim_get_hr(traj: np.ndarray, bins: np.ndarray) -> np.ndarray:
    """Literal MDsim (Fu et al.) get_hr: all cdist entries, zeros dropped by the 1e-6 lower edge."""
    t = torch.as_tensor(traj, dtype=torch.float64)
    pdist = torch.cdist(t, t).flatten()
    return np.histogram(pdist.numpy(), bins, density=True)[0]


def test_hr_of_rigid_molecule_equals_its_distance_set():
    z, R0, _ = reference_frame("aspirin")
    rots = Rotation.random(50, random_state=1).as_matrix()
    frames = np.einsum("kab,nb->kna", rots, R0) + np.random.default_rng(1).normal(size=(50, 1, 3))
    h = hr_histogram(frames)
    iu = np.triu_indices(len(z), 1)
    d = np.linalg.norm(R0[:, None] - R0[None], axis=-1)[iu]
    counts = np.histogram(d, HR_EDGES)[0]
    width = np.diff(HR_EDGES)
    np.testing.assert_allclose(h, counts / (len(d) * width), rtol=1e-9, atol=1e-9)
    assert np.sum(h * width) == pytest.approx(1.0)
    np.testing.assert_allclose(h, _mdsim_get_hr(frames, HR_EDGES), rtol=1e-9, atol=1e-9)


def test_hr_matches_mdsim_on_a_fluctuating_trajectory_and_mae_convention():
    pool = _pool(60)
    h = hr_histogram(pool["R"])
    np.testing.assert_allclose(h, _mdsim_get_hr(pool["R"], HR_EDGES), rtol=1e-9, atol=1e-12)
    assert hr_mae(h, h) == 0.0
    # MAE = 10·mean|Δh| = ∫|Δh| dr: disjoint supports give 2 (each density has unit area) ...
    dimer = np.array([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    assert hr_mae(hr_histogram(dimer), hr_histogram(2.0 * dimer)) == pytest.approx(2.0, rel=1e-5)
    # ... and a linear trimer (distances 1, 1, 2) against the dimer (distance 1): |2/3 − 1| + |1/3 − 0| = 2/3
    trimer = np.array([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [2.0, 0.0, 0.0]]])
    assert hr_mae(hr_histogram(trimer), hr_histogram(dimer)) == pytest.approx(2 / 3, rel=1e-5)


def test_hr_skips_non_finite_frames():
    pool = _pool(20)
    R = pool["R"].copy()
    R[5] = np.nan
    np.testing.assert_allclose(hr_histogram(R), hr_histogram(np.delete(pool["R"], 5, axis=0)))


# ---------------------------------------------------------------------------------------------------- energies


def test_w1_of_shifted_gaussians_is_the_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 4.0, 20_000)
    m = energy_metrics(a + 1.5, a)
    assert m["energy_w1"] == pytest.approx(1.5, abs=1e-9)
    assert m["energy_mean_shift"] == pytest.approx(1.5, abs=1e-9)
    m = energy_metrics(rng.normal(-2.0, 4.0, 20_000), rng.normal(0.0, 4.0, 20_000))
    assert m["energy_w1"] == pytest.approx(2.0, abs=0.15)
    assert m["energy_mean_shift"] == pytest.approx(-2.0, abs=0.15)


def test_energy_histogram_is_a_density_and_keeps_outside_mass_out():
    E = np.concatenate([np.linspace(0, 1, 1000), [np.nan, 50.0]])
    edges = np.linspace(0, 1, 11)
    h = energy_histogram(E, edges)
    assert np.sum(h * np.diff(edges)) == pytest.approx(1000 / 1001)


# ---------------------------------------------------------------------------------------------------- stability


def test_first_unstable_frame_bond_criterion_nan_and_recorded():
    pool = _pool(40)
    bonds = BondReference.from_frames(pool["z"], pool["R"])
    T, M = 8, 4
    traj = np.repeat(pool["R"][:M][None], T, axis=0).copy()  # (T, M, n, 3)
    i, j = bonds.bonds[0]
    axis = traj[:, :, j] - traj[:, :, i]
    axis /= np.linalg.norm(axis, axis=-1, keepdims=True)
    traj[3:, 1, j] += 0.7 * axis[3:, 1]  # replica 1: bond stretched 0.7 Å from frame 3
    traj[5:, 2, j] += 0.3 * axis[5:, 2]  # replica 2: 0.3 Å (+ its own deviation), below tolerance: stable
    traj[6:, 3] = np.nan  # replica 3: frozen (NaN) from frame 6
    uf = first_unstable_frame(traj, bonds, 0.5)
    np.testing.assert_array_equal(uf, [-1, 3, -1, 6])
    # a sampler-recorded instability that comes earlier wins; a later one does not
    np.testing.assert_array_equal(first_unstable_frame(traj, bonds, 0.5, np.array([2, 5, -1, -1])), [2, 3, -1, 6])
    base = bonds.max_deviation(pool["R"][:M]).max()  # the frames' own deviation from the mean lengths
    assert base < 0.14  # so that base < 0.3 − base − 0.01: unstretched frames stay below the tolerance
    np.testing.assert_array_equal(first_unstable_frame(traj, bonds, 0.3 - base - 0.01), [-1, 3, 5, 6])
    valid = valid_mask(uf, T)
    assert valid.shape == (T, M) and valid[:, 0].all() and valid[:, 1].sum() == 3 and valid[:, 3].sum() == 6
    time_ps = 0.01 * np.arange(1, T + 1)
    s = stability_summary(uf, time_ps)
    assert s["stable_fraction"] == 0.5
    # times to instability: 0.08 (censored), 0.04, 0.08 (censored), 0.07 → median 0.075
    assert s["median_time_to_instability_ps"] == pytest.approx(0.075)
    np.testing.assert_allclose(stable_fraction_curve(uf, T), [1, 1, 1, 0.75, 0.75, 0.75, 0.5, 0.5])


def test_reference_pool_is_stable_under_its_own_bonds():
    pool = _pool(120)
    bonds = BondReference.from_frames(pool["z"], pool["R"])
    assert len(bonds.bonds) == 8  # ethanol: C–C, C–O, O–H, 5 C–H
    assert bonds.max_deviation(pool["R"]).max() < 0.5
    traj = pool["R"].reshape(30, 4, 9, 3)
    assert (first_unstable_frame(traj, bonds, 0.5) == -1).all()


# ---------------------------------------------------------------------------------------------------- spurious


def test_spurious_detector_fires_on_collapsed_hydrogens_not_on_reference():
    pool = _pool(120)
    det = _detector(pool)
    # the synthetic reference itself: never spurious (energies or distances)
    assert not det(pool["R"], pool["E"]).any()
    assert 1.2 < det.distance_min < 2.0 and det.distance_threshold == pytest.approx(det.distance_min - 0.25)
    # two methyl H (5, 6) pulled to 0.8 Å apart, energy normal: fires by distance
    R = pool["R"][0].copy()
    u = (R[6] - R[5]) / np.linalg.norm(R[6] - R[5])
    R[6] = R[5] + 0.8 * u
    assert np.linalg.norm(R[6] - R[5]) == pytest.approx(0.8)
    low, close = det.flags(R[None], pool["E"][:1])
    assert close[0] and not low[0]
    assert det(R[None], pool["E"][:1])[0]
    # just above the distance threshold: not spurious
    R2 = pool["R"][0].copy()
    R2[6] = R2[5] + (det.distance_threshold + 0.02) * u
    assert not det(R2[None], pool["E"][:1])[0]
    # energy criterion alone: more than the margin below the DFT minimum
    E_low = np.array([det.energy_min - 5.01, det.energy_min - 4.99])
    np.testing.assert_array_equal(det(pool["R"][:2], E_low), [True, False])
    # a NaN (frozen) frame is never flagged
    assert not det(np.full((1, 9, 3), np.nan), np.array([np.nan]))[0]


def test_spurious_detector_torch_matches_numpy_on_any_batch_shape():
    pool = _pool(120)
    det = _detector(pool)
    R = pool["R"][:12].copy()
    R[3, 6] = R[3, 5] + 0.8 * (R[3, 6] - R[3, 5]) / np.linalg.norm(R[3, 6] - R[3, 5])
    E = pool["E"][:12].copy()
    E[7] = det.energy_min - 30.0
    expect = np.zeros(12, bool)
    expect[[3, 7]] = True
    np.testing.assert_array_equal(det(R, E), expect)
    out = det(torch.as_tensor(R, dtype=torch.float32), torch.as_tensor(E))
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bool
    np.testing.assert_array_equal(out.numpy(), expect)
    np.testing.assert_array_equal(det(R.reshape(3, 4, 9, 3), E.reshape(3, 4)), expect.reshape(3, 4))
    assert det(torch.as_tensor(R)).numpy().tolist() == (np.arange(12) == 3).tolist()  # distance only


def test_spurious_summary_counts_replicas_frames_and_first_entry():
    pool = _pool(120)
    det = _detector(pool)
    T, M = 6, 4
    R = np.repeat(pool["R"][:M][None], T, axis=0).copy()
    E = np.repeat(pool["E"][:M][None], T, axis=0).copy()
    u = R[:, 1, 6] - R[:, 1, 5]
    R[2:, 1, 6] = R[2:, 1, 5] + 0.8 * u[2:] / np.linalg.norm(u[2:], axis=-1, keepdims=True)  # replica 1 from frame 2
    E[4:, 2] = det.energy_min - 40.0  # replica 2 from frame 4 (energy hole)
    E[5, 3] = det.energy_min - 60.0  # replica 3 at frame 5, but that frame is after its instability
    valid = np.ones((T, M), bool)
    valid[5:, 3] = False
    time_ps = 0.1 * np.arange(1, T + 1)
    s = det.summary(R, E, valid, time_ps)
    assert s["spurious_replica_fraction"] == 0.5
    assert s["spurious_frame_fraction"] == pytest.approx((4 + 2) / valid.sum())
    assert s["spurious_distance_replica_fraction"] == 0.25 and s["spurious_energy_replica_fraction"] == 0.25
    assert s["spurious_first_entry_min_ps"] == pytest.approx(0.3)
    assert s["spurious_first_entry_median_ps"] == pytest.approx(0.4)
    assert s["lowest_energy_rel_dft_min"] == pytest.approx(-40.0)
    assert s["min_nonbonded_distance"] == pytest.approx(0.8)
    clean = det.summary(R[:, [0]], E[:, [0]], valid[:, [0]], time_ps)
    assert clean["spurious_replica_fraction"] == 0.0 and clean["spurious_first_entry_median_ps"] is None


# ---------------------------------------------------------------------------------------------------- noise floor


def test_contiguous_halves_are_alternating_blocks_in_md17_order():
    rng = np.random.default_rng(0)
    md17 = rng.choice(10_000, 103, replace=False)  # arbitrary order, as a pool might be stored
    a, b = contiguous_halves(md17, 6)
    assert len(a) + len(b) == 103 and not set(a) & set(b)
    rank = np.empty(103, int)
    rank[np.argsort(md17)] = np.arange(103)
    ra, rb = np.sort(rank[a]), np.sort(rank[b])
    # blocks of np.array_split(103, 6): sizes 18,17,17,17,17,17 → a = blocks 0,2,4; b = 1,3,5
    bounds = np.cumsum([0, 18, 17, 17, 17, 17, 17])
    expect_a = np.concatenate([np.arange(bounds[k], bounds[k + 1]) for k in (0, 2, 4)])
    expect_b = np.concatenate([np.arange(bounds[k], bounds[k + 1]) for k in (1, 3, 5)])
    np.testing.assert_array_equal(ra, expect_a)
    np.testing.assert_array_equal(rb, expect_b)
    with pytest.raises(ValueError, match="n_blocks"):
        contiguous_halves(md17, 1)


def test_noise_floor_sees_slow_drift_that_random_halves_hide():
    pool = _pool(200)
    order = np.random.default_rng(1).permutation(200)
    E = pool["E"] + 0.05 * (pool["md17_index"] - pool["md17_index"].mean()) / 40  # slow drift in MD17 time
    torsions = TORSIONS["ethanol"]
    floor = noise_floor(pool["R"], E, pool["md17_index"], torsions, 2, 12, 500.0)
    # two blocks: second vs first half in time, mean shift = drift over half the pool = 0.05·100
    assert floor["energy_mean_shift"] == pytest.approx(5.0, rel=0.05)
    # stored order does not matter (blocks follow md17_index)
    shuffled = noise_floor(pool["R"][order], E[order], pool["md17_index"][order], torsions, 2, 12, 500.0)
    assert shuffled == pytest.approx(floor)
    # random halves would hide the drift
    a, b = order[:100], order[100:]
    rnd = compare(
        distributions(pool["R"][b], E[b], torsions, 12, 500.0), distributions(pool["R"][a], E[a], torsions, 12, 500.0)
    )
    assert abs(rnd["energy_mean_shift"]) < 1.5
    assert set(floor) == {"energy_w1", "energy_mean_shift", "hr_mae"} | {
        f"dihedral_{t.name}_{k}" for t in torsions for k in ("rmse", "unvisited")
    }


def test_compare_identical_sources_is_zero():
    pool = _pool(60)
    t = (Torsion("hydroxyl", "x", ((8, 2, 0, 1),)),)
    d = distributions(pool["R"], pool["E"], t, 36, 500.0)
    m = compare(d, d)
    assert m == {
        "energy_w1": 0.0,
        "energy_mean_shift": 0.0,
        "hr_mae": 0.0,
        "dihedral_hydroxyl_rmse": 0.0,
        "dihedral_hydroxyl_unvisited": 0.0,
    }


def test_replica_bootstrap_measures_the_spread_between_replicas():
    t = (Torsion("hydroxyl", "x", ((8, 2, 0, 1),)),)
    z, R0, _ = reference_frame("ethanol")
    rng = np.random.default_rng(4)
    T, M = 40, 30
    R = R0 + 0.05 * rng.standard_normal((T, M, len(z), 3))
    offsets = rng.normal(0.0, 2.0, M)  # each replica sits at its own mean energy
    E = offsets[None, :] + 0.1 * rng.standard_normal((T, M))
    valid = np.ones((T, M), dtype=bool)
    ref = distributions(R.reshape(-1, len(z), 3), np.zeros(T * M), t, 12, 500.0)
    boot = replica_bootstrap(R, E, valid, ref, t, 12, 500.0, n_boot=400, seed=1)
    # The bootstrap sd of a mean over replicas is the replicas' spread / sqrt(M).
    expected = E.mean(0).std() / np.sqrt(M)
    assert boot["energy_mean_shift_boot_sd"] == pytest.approx(expected, rel=0.15)
    assert boot["hr_mae_boot_sd"] > 0 and boot["dihedral_hydroxyl_rmse_boot_sd"] > 0

    same = np.repeat(R[:, :1], M, axis=1)  # identical replicas: resampling changes nothing
    flat = replica_bootstrap(same, np.repeat(E[:, :1], M, axis=1), valid, ref, t, 12, 500.0, n_boot=50)
    assert all(v == pytest.approx(0.0, abs=1e-12) for v in flat.values())
    one = replica_bootstrap(R[:, :1], E[:, :1], valid[:, :1], ref, t, 12, 500.0)  # one replica: no spread
    assert set(one) == set(boot) and all(v is None for v in one.values())
