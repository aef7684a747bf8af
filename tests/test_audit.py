"""Ab initio audit: PySCF single points, per-frame cache, offset fit, frame selection, the whole audit wiring.

Real PySCF runs use water in the minimal sto-3g basis with one thread (a fraction of a second per
frame); everything else uses a fake single point that counts its calls.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from crmse.audit import (
    AuditConfig,
    DFTCache,
    DFTResult,
    DFTSettings,
    SampleRun,
    dft_single_point,
    fit_offset,
    frame_key,
    model_energy_forces,
    run_audit,
    run_dft,
    select_frames,
    write_rows_csv,
)
from crmse.data import Frames
from crmse.observables import BondReference, SpuriousDetector
from crmse.params import ParamsError, validate

REPO = Path(__file__).resolve().parents[1]

Z_WATER = np.array([8, 1, 1])
R_WATER = np.array([[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692], [0.0, -0.7572, -0.4692]])  # Å, near equilibrium
FAST = DFTSettings(basis="sto-3g", threads=1)  # PBE/sto-3g with density fitting: well under a second on water


def _collapsed_water(d_hh: float = 0.8) -> np.ndarray:
    """Water with both O–H kept at their length but the H–H distance squeezed to ``d_hh`` Å."""
    O = R_WATER[0]
    r_oh = np.linalg.norm(R_WATER[1] - O)
    half = math.asin(d_hh / 2 / r_oh)
    return np.array([O, O + r_oh * np.array([0, math.sin(half), -math.cos(half)]),
                     O + r_oh * np.array([0, -math.sin(half), -math.cos(half)])])


class ToyWater(torch.nn.Module):
    """Harmonic O–H bonds on top of E0, plus a spurious 40 kcal/mol hole at H–H ≈ 0.8 Å (a 'model' that drifts)."""

    def __init__(self, E0: float) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(500.0, dtype=torch.float64))
        self.E0 = E0

    def energy(self, R: torch.Tensor) -> torch.Tensor:
        d1 = torch.linalg.vector_norm(R[:, 1] - R[:, 0], dim=-1)
        d2 = torch.linalg.vector_norm(R[:, 2] - R[:, 0], dim=-1)
        hh = torch.linalg.vector_norm(R[:, 2] - R[:, 1], dim=-1)
        harm = 0.5 * self.k * ((d1 - 0.9578) ** 2 + (d2 - 0.9578) ** 2 + 0.2 * (hh - 1.5144) ** 2)
        return self.E0 + harm - 40.0 * torch.exp(-((hh - 0.8) ** 2) / 0.02)

    def energy_and_forces(self, R: torch.Tensor, create_graph: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        R = R.detach().requires_grad_(True)
        E = self.energy(R)
        (g,) = torch.autograd.grad(E.sum(), R, create_graph=create_graph)
        return E.detach(), -g.detach()


def _fake_single_point(calls: list):
    """A counting stand-in for PySCF: energy = −1000·Σz + Σ|R|², forces = −2R."""

    def sp(z: np.ndarray, R: np.ndarray, settings: DFTSettings) -> DFTResult:
        calls.append(R.copy())
        return DFTResult(-1000.0 * float(np.sum(z)) + float((R**2).sum()), -2 * R, "ok", 0.01, 3)

    return sp


# ----------------------------------------------------------------------------------------------------
# PySCF single points


def test_single_point_units_and_forces_match_finite_differences():
    R = R_WATER.copy()
    R[1] = R[0] + 1.3 * (R[1] - R[0])  # stretch one O–H bond
    res = dft_single_point(Z_WATER, R, FAST)
    assert res.ok and res.cycles > 1
    # Water's PBE/sto-3g total energy is about −75.2 Hartree: the result is in kcal/mol.
    assert -47300 < res.energy < -47100
    # Forces: kcal/mol/Å and −∂E/∂R (checked by central differences), no net force, and the
    # stretched H is pulled back towards O.
    h = 1e-3
    for c in (1, 2):
        Rp, Rm = R.copy(), R.copy()
        Rp[1, c] += h
        Rm[1, c] -= h
        fd = -(dft_single_point(Z_WATER, Rp, FAST).energy - dft_single_point(Z_WATER, Rm, FAST).energy) / (2 * h)
        assert res.forces[1, c] == pytest.approx(fd, abs=0.05)
    # PySCF's gradient leaves out the response of the grid weights, so the net force is a grid artifact:
    # 0.050 kcal/mol/Å here at grid level 2 (the audit's), against forces of ~190 kcal/mol/Å.
    assert np.abs(res.forces.sum(0)).max() < 0.1
    assert np.dot(res.forces[1], R[0] - R[1]) > 50.0


def test_non_converging_scf_is_recorded_and_the_run_continues(tmp_path):
    no_retry = DFTSettings(basis="sto-3g", threads=1, max_cycle=1, soscf_fallback=False)
    res = dft_single_point(Z_WATER, R_WATER, no_retry)
    assert res.status == "scf_not_converged" and not res.ok
    assert math.isnan(res.energy) and np.isnan(res.forces).all()
    # Through run_dft: a failure (and a PySCF exception) is a status, and later frames still run.
    calls: list = []
    fake = _fake_single_point(calls)

    def flaky(z, R, settings):
        if len(calls) == 0 and not hasattr(flaky, "raised"):
            flaky.raised = True
            raise RuntimeError("linear dependency in basis")
        return fake(z, R, settings)

    frames = np.stack([R_WATER, R_WATER + 0.01, R_WATER + 0.02])
    cache = DFTCache(tmp_path / "cache")
    out = run_dft(Z_WATER, frames, FAST, cache, progress=False, single_point=flaky)
    assert [r.status for r in out] == ["error", "ok", "ok"]
    assert "linear dependency" in out[0].message
    # Errors are not cached (they may be transient); the retry computes only that frame.
    calls.clear()
    again = run_dft(Z_WATER, frames, FAST, cache, progress=False, single_point=fake)
    assert [r.status for r in again] == ["ok", "ok", "ok"] and len(calls) == 1
    # A real non-converged SCF goes through the cache as a failure (deterministic for its max_cycle).
    real = run_dft(Z_WATER, frames[:1], no_retry, cache, progress=False)
    assert real[0].status == "scf_not_converged" and not real[0].cached
    cached = run_dft(Z_WATER, frames[:1], no_retry, cache, progress=False, single_point=_fake_single_point(calls := []))
    assert cached[0].status == "scf_not_converged" and cached[0].cached and calls == []


# ----------------------------------------------------------------------------------------------------
# Cache


def test_cache_second_run_costs_no_dft_and_overlaps_are_free(tmp_path):
    calls: list = []
    sp = _fake_single_point(calls)
    cache = DFTCache(tmp_path / "cache")
    rng = np.random.default_rng(0)
    frames = R_WATER + 0.05 * rng.standard_normal((5, 3, 3))
    first = run_dft(Z_WATER, frames, FAST, cache, progress=False, single_point=sp)
    assert len(calls) == 5 and not any(r.cached for r in first)
    calls.clear()
    second = run_dft(Z_WATER, frames, FAST, cache, progress=False, single_point=sp)
    assert calls == [] and all(r.cached for r in second)
    assert [r.energy for r in second] == [r.energy for r in first]
    np.testing.assert_array_equal(second[3].forces, first[3].forces)
    # Overlapping selection (and a duplicate inside one call): only the new geometry is computed.
    more = np.concatenate([frames[2:], frames[:1], R_WATER[None] + 0.3, R_WATER[None] + 0.3])
    run_dft(Z_WATER, more, FAST, cache, progress=False, single_point=sp)
    assert len(calls) == 1
    # float32 noise below the rounding (1e-6 Å) hits the same record; different settings do not.
    calls.clear()
    run_dft(Z_WATER, frames.astype(np.float32), FAST, cache, progress=False, single_point=sp)
    assert calls == []
    run_dft(Z_WATER, frames[:2], DFTSettings(basis="sto-3g", xc="lda"), cache, progress=False, single_point=sp)
    assert len(calls) == 2
    # Threads do not change the numbers, so they are not part of the key.
    assert frame_key(Z_WATER, frames[0], FAST) == frame_key(Z_WATER, frames[0], DFTSettings(basis="sto-3g"))
    assert frame_key(Z_WATER, frames[0], FAST) != frame_key(Z_WATER, frames[0] + 1e-4, FAST)
    # A corrupt record (or one whose geometry does not match its key) is recomputed, not trusted.
    calls.clear()
    key = frame_key(Z_WATER, frames[0], FAST)
    cache.path(key).write_text("{ not json")
    other = frame_key(Z_WATER, frames[1], FAST)
    cache.path(other).write_text(cache.path(frame_key(Z_WATER, frames[2], FAST)).read_text())
    out = run_dft(Z_WATER, frames[:2], FAST, cache, progress=False, single_point=sp)
    assert len(calls) == 2 and out[0].energy == first[0].energy and out[1].energy == first[1].energy
    # Records are complete JSON files, written atomically (no temporary files left behind).
    assert not list((tmp_path / "cache").rglob("*.tmp"))


# ----------------------------------------------------------------------------------------------------
# Offset fit and frame selection


def test_offset_fit_recovers_a_noisy_constant_and_its_spread():
    rng = np.random.default_rng(1)
    label = -97196.0 + 4.0 * rng.standard_normal(400)
    dft = label + 119.9 + 1.0 * rng.standard_normal(400)
    dft[[3, 10]] = np.nan  # failed SCFs
    fit = fit_offset(dft, label)
    assert fit.n == 398 and fit.n_failed == 2
    assert fit.offset == pytest.approx(119.9, abs=4 * 1.0 / math.sqrt(398))
    assert fit.std == pytest.approx(1.0, rel=0.15)
    assert fit.sem == pytest.approx(fit.std / math.sqrt(398))
    assert fit.max_abs_deviation > 2.0  # 400 normal draws reach beyond 2σ
    exact = fit_offset(np.array([10.0, 12.0, 14.0]), np.array([0.0, 2.0, 4.0]))
    assert (exact.offset, exact.std, exact.max_abs_deviation) == (10.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="needs >= 2 converged"):
        fit_offset(np.array([1.0, np.nan, np.nan]), np.zeros(3))
    with pytest.raises(ValueError, match="frames"):
        fit_offset(np.zeros(3), np.zeros(4))


def test_select_frames_kinds_caps_validity_and_seed():
    T, M = 6, 4
    E = np.arange(T * M, dtype=float).reshape(T, M)
    E[5, 0] = -100.0  # replica 0's lowest
    E[4, 0] = -99.0   # replica 0's second lowest: must not crowd out other replicas
    valid = np.ones((T, M), bool)
    valid[3:, 3] = False  # replica 3 unstable from frame 3
    E[3:, 3] = np.nan
    spurious = np.zeros((T, M), bool)
    spurious[2:, 1] = True
    spurious[4:, 3] = True  # invalid frames flagged spurious must still never be chosen
    picks = select_frames(E, valid, spurious, n_lowest=3, n_spurious=2, n_random=4, seed=7)
    kinds = [p.kind for p in picks]
    assert kinds == ["lowest"] * 3 + ["spurious"] * 2 + ["random"] * 4
    lowest = [(p.t, p.m) for p in picks if p.kind == "lowest"]
    assert lowest == [(5, 0), (0, 1), (0, 2)]  # one per replica first, by energy
    for p in picks:
        assert valid[p.t, p.m]
        assert spurious[p.t, p.m] == (p.kind == "spurious")
    assert len({(p.t, p.m) for p in picks}) == len(picks)
    assert picks == select_frames(E, valid, spurious, 3, 2, 4, seed=7)
    assert picks != select_frames(E, valid, spurious, 3, 2, 4, seed=8)
    # Caps: asking for more than exists returns what exists.
    many = select_frames(E, valid, spurious, 0, 100, 0, seed=0)
    assert len(many) == spurious[valid].sum() == 4
    with pytest.raises(ValueError, match="n_random"):
        select_frames(E, valid, spurious, 1, 1, -1, seed=0)


# ----------------------------------------------------------------------------------------------------
# The whole audit on water / sto-3g


def _water_case(tmp_path: Path):
    rng = np.random.default_rng(3)
    model = ToyWater(E0=-47205.0)
    fn = model_energy_forces(model, batch_size=4)
    R_pool = R_WATER + 0.015 * rng.standard_normal((6, 3, 3))
    E_pool, F_pool = fn(R_pool)  # labels = the toy model, so test MAE is 0 by construction
    pool = Frames(Z_WATER, R_pool, E_pool, F_pool, np.arange(6) * 40)
    # Samples: replica 0 ordinary, replica 1 collapses its H atoms, replica 2 blows up at frame 2.
    T, M = 4, 3
    R = np.repeat(R_WATER[None, None], T * M, 0).reshape(T, M, 3, 3) + 0.02 * rng.standard_normal((T, M, 3, 3))
    R[2:, 1] = _collapsed_water(0.8)[None] + 0.005 * rng.standard_normal((2, 3, 3))
    R[2:, 2] = np.nan
    R = R.astype(np.float32)
    E = np.full((T, M), np.nan)
    ok = np.isfinite(R).all((-1, -2))
    E[ok] = fn(R[ok])[0]
    valid = (np.arange(T)[:, None] < np.array([T, T, 2])[None, :]) & np.isfinite(E)
    run = SampleRun(R, E, valid, np.arange(T) * 0.01)
    bonds = BondReference.from_frames(Z_WATER, R_pool).bonds
    detector = SpuriousDetector.from_reference(Z_WATER, R_pool, E_pool, bonds, 5.0, 0.25)
    return pool, run, fn, detector


def test_audit_wiring_water_sto3g(tmp_path):
    pool, run, fn, detector = _water_case(tmp_path)
    config = AuditConfig(n_lowest=1, n_spurious=1, n_random=2, n_reference=3, seed=0)
    cache = DFTCache(tmp_path / "cache")
    result = run_audit(Z_WATER, pool, {"mse": run}, {"mse": fn}, detector, FAST, config, cache, test=pool,
                       progress=False)
    met, m = result.metrics, result.metrics["models"]["mse"]
    assert met["dft"] == {"n_frames": 3 + 4, "n_failed": 0} and result.timing["n_computed"] == 7
    assert m["n_selected"] == {"lowest": 1, "spurious": 1, "random": 2}
    # Offset: DFT − label on 3 reference frames, its spread; labels = model, so the model's error on
    # the reference frames equals the label/DFT mismatch (the floor of the sampled-frame comparison).
    ref_rows = [r for r in result.rows if r["kind"] == "reference"]
    assert len(ref_rows) == 3
    d = np.array([r["dft_energy"] - r["label_energy"] for r in ref_rows])
    assert met["offset"]["offset"] == pytest.approx(d.mean()) and met["offset"]["n"] == 3
    assert m["reference_energy_mae"] == pytest.approx(met["offset"]["label_energy_mae"])
    assert m["test_energy_mae"] == pytest.approx(0.0, abs=1e-9)
    sampled = [r for r in result.rows if r["kind"] != "reference"]
    # Never a frame of replica 2 at/after its instability; both collapsed frames are spurious.
    assert all(not (r["replica"] == 2 and r["frame"] >= 2) for r in sampled)
    spur = [r for r in sampled if r["spurious"]]
    assert {(r["replica"], r["frame"]) for r in spur} == {(1, 2), (1, 3)}
    assert {r["kind"] for r in spur} == {"lowest", "spurious"}
    # The physics the audit exists for: the model claims the collapsed water lies far below the
    # reference minimum; DFT puts it far above.
    assert m["spurious"]["n"] == 2
    assert m["spurious"]["model_rel_dft_min"]["max"] < -5.0
    assert m["spurious"]["dft_rel_dft_min"]["min"] > 10.0
    assert m["spurious"]["dft_above_pool_min_fraction"] == 1.0
    # Random-frame metrics are what the rows say.
    rnd = [r for r in sampled if r["kind"] == "random"]
    assert m["random"]["energy_mae"] == pytest.approx(np.mean([abs(r["model_minus_dft"]) for r in rnd]))
    assert m["random"]["forces_mae"] == pytest.approx(np.mean([r["forces_mae"] for r in rnd]))
    assert m["random_energy_w1_floor"] > 0 and m["random_dft_energy_w1"] >= 0
    # The model's claim is recomputed at the rounded geometry DFT saw; it matches the saved energy.
    assert m["model_energy_recompute_max_abs"] < 1e-3
    # Arrays line up with the rows (for the report's drawings).
    assert result.arrays["R"].shape == (len(result.rows), 3, 3)
    assert list(result.arrays["kind"]) == [r["kind"] for r in result.rows]
    # Second run: everything from the cache, same numbers.
    again = run_audit(Z_WATER, pool, {"mse": run}, {"mse": fn}, detector, FAST, config, cache, test=pool,
                      progress=False, single_point=_fake_single_point(calls := []))
    assert calls == [] and again.timing["n_computed"] == 0 and again.timing["n_cached"] == 7
    # ... and the same bytes: what the cache held is not part of the metrics or the rows.
    assert json.dumps(again.metrics) == json.dumps(result.metrics) and json.dumps(again.rows) == json.dumps(result.rows)
    write_rows_csv(tmp_path / "frames.csv", result.rows)
    lines = (tmp_path / "frames.csv").read_text().splitlines()
    assert len(lines) == 1 + len(result.rows) and lines[0].startswith("model,kind,replica,frame")


def test_audit_survives_failed_scf(tmp_path):
    """Every SCF failing (reference frames included) gives counts and NaN-free JSON, not a crash."""
    pool, run, fn, detector = _water_case(tmp_path)
    failing = DFTSettings(basis="sto-3g", threads=1, max_cycle=1, soscf_fallback=False)
    config = AuditConfig(n_lowest=1, n_spurious=0, n_random=1, n_reference=2, seed=0)
    result = run_audit(Z_WATER, pool, {"mse": run}, {"mse": fn}, detector, failing, config, None,
                       progress=False)
    assert result.metrics["dft"]["n_failed"] == 4
    assert "error" in result.metrics["offset"]
    m = result.metrics["models"]["mse"]
    assert m["n_failed"] == 2 and m["random"]["energy_mae"] is None
    assert all(r["status"] == "scf_not_converged" for r in result.rows)


# ----------------------------------------------------------------------------------------------------
# Params and the stage's skip path


def test_audit_params_are_validated():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    assert DFTSettings.from_params(validate(params)["audit"]).xc == params["audit"]["xc"]
    params["audit"]["density_fit"] = "yes"
    with pytest.raises(ParamsError, match="audit.density_fit"):
        validate(params)


def test_stage_writes_skip_outputs_for_molecules_not_audited(tmp_path, monkeypatch):
    import runpy

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["audit"]["molecules"] = ["ethanol"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["audit.py", "aspirin", "50", "1", "auto", "crmse"])
    with pytest.raises(SystemExit) as done:  # nothing else is read: no split, model or samples exist here
        runpy.run_path(str(REPO / "pipelines/audit.py"), run_name="__main__")
    assert done.value.code == 0
    got = yaml.safe_load((tmp_path / "metrics/aspirin/n50/s1/Tauto/crmse/audit.json").read_text())
    assert got["skipped"] is True
    assert (tmp_path / "metrics/aspirin/n50/s1/Tauto/crmse/audit_frames.csv").read_text().startswith("model,kind")
    assert (tmp_path / "results/aspirin/n50/s1/Tauto/audit_crmse.npz").exists()


# ----------------------------------------------------------------------------------------------------
# With the real SchNet potential and the real stage script (DFT faked: the wiring, not PySCF, is tested)

TINY_MODEL = {"n_atom_basis": 8, "n_filters": 8, "n_interactions": 1, "n_rbf": 8, "cutoff": 5.0, "dtype": "float32"}


def test_model_energy_forces_batches_the_real_potential():
    from synthetic import synthetic_arrays

    from crmse.data import validate_frames
    from crmse.model import build_model

    torch.manual_seed(0)
    frames = validate_frames(synthetic_arrays("ethanol", 7, 0), "ethanol")
    model = build_model(frames.z, TINY_MODEL, frames).eval()
    E, F = model_energy_forces(model, batch_size=3)(frames.R)
    E_all, F_all = model.energy_and_forces(torch.as_tensor(frames.R, dtype=torch.float32))
    assert E.shape == (7,) and F.shape == (7, 9, 3) and E.dtype == np.float64
    np.testing.assert_allclose(E, E_all.numpy(), rtol=0, atol=1e-3)
    np.testing.assert_allclose(F, F_all.double().numpy(), rtol=1e-4, atol=1e-4)


def test_stage_script_end_to_end_with_fake_dft(tmp_path, monkeypatch):
    import runpy

    from synthetic import synthetic_arrays

    import crmse.audit
    from crmse.data import validate_frames
    from crmse.io import write_npz
    from crmse.model import build_model, save_checkpoint

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["audit"].update(molecules=["ethanol"], n_lowest=1, n_spurious=1, n_random=2, n_reference=3)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    frames = validate_frames(synthetic_arrays("ethanol", 40, 0), "ethanol")
    split = tmp_path / "data/splits/ethanol/n50/s0"
    frames.subset(np.arange(0, 30)).save(split / "reference.npz")
    frames.subset(np.arange(30, 40)).save(split / "test.npz")
    torch.manual_seed(0)
    for name in ("mse", "crmse"):
        model = build_model(frames.z, TINY_MODEL, frames).eval()
        save_checkpoint(model, tmp_path / f"models/ethanol/n50/s0/{name}.pt")
        R = frames.R[:15].reshape(5, 3, 9, 3).astype(np.float32)
        E = model_energy_forces(model)(R.reshape(-1, 9, 3))[0].reshape(5, 3)
        R[3:, 1], E[3:, 1] = np.nan, np.nan  # replica 1 unstable from saved frame 3
        write_npz(tmp_path / f"results/ethanol/n50/s0/T500/{name}/samples.npz", R=R, E=E,
                  unstable_frame=np.array([-1, 3, -1]), time_ps=np.arange(5) * 0.01, z=frames.z,
                  T_kin=np.full((5, 3), 500.0), temperature=np.array(500.0))
    calls: list = []
    monkeypatch.setattr(crmse.audit, "dft_single_point", _fake_single_point(calls))
    monkeypatch.chdir(tmp_path)
    params["md"]["temperatures"] = [500]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for name in ("mse", "crmse"):
        monkeypatch.setattr(sys, "argv", ["audit.py", "ethanol", "50", "0", "500", name, "--cache",
                                          str(tmp_path / "cache")])
        runpy.run_path(str(REPO / "pipelines/audit.py"), run_name="__main__")
        got = crmse.io.read_json(tmp_path / f"metrics/ethanol/n50/s0/T500/{name}/audit.json")
        assert (got["molecule"], got["n_train"], got["seed"], got["arm"]) == ("ethanol", 50, 0, name)
        assert got["offset"]["n"] == 3 and got["dft"]["n_failed"] == 0
        m = got["models"][name]
        assert set(got["models"]) == {name}
        assert m["n_selected"]["lowest"] == 1 and m["n_selected"]["random"] == 2
        assert m["test_energy_mae"] > 0 and m["random"]["forces_mae"] is not None
        assert m["model_energy_recompute_max_abs"] < 1e-2
        with np.load(tmp_path / f"results/ethanol/n50/s0/T500/audit_{name}.npz") as d:
            assert d["R"].shape[1:] == (9, 3) and len(d["kind"]) == len(d["R"])
            assert not ((d["replica"] == 1) & (d["frame"] >= 3)).any()  # after instability: never audited
    # The reference frames of the offset fit were computed once, by the first arm.
    assert len(calls) <= 3 + 2 * 3
    # Re-run: nothing computed.
    calls.clear()
    runpy.run_path(str(REPO / "pipelines/audit.py"), run_name="__main__")
    assert calls == []
