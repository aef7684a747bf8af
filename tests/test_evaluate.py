"""The reference and evaluate stages end to end on tiny synthetic inputs: stand-in checkpoints, fake samples.npz."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from synthetic import collapse_methyl_h, synthetic_arrays

from crmse.artifacts import ArtifactError, RunPaths, load_samples
from crmse.data import Frames
from crmse.evaluate import REPLICA_COLUMNS, EvaluateError, evaluate_arm, evaluate_reference
from crmse.io import read_json, write_json, write_npz
from crmse.model import build_model, save_checkpoint
from crmse.params import load_params
from crmse.temperature import frames_temperature

REPO = Path(__file__).resolve().parents[1]
MOL, SIZE, SEED, T = "ethanol", 20, 0, "500"
ARMS = ("mse", "crmse")
TINY = {"n_atom_basis": 8, "n_filters": 8, "n_interactions": 1, "n_rbf": 8, "cutoff": 5.0, "dtype": "float32"}
T_FRAMES, M = 10, 4


def _frames(a: dict) -> Frames:
    return Frames(a["z"], a["R"], a["E"].reshape(-1), a["F"], a["md17_index"])


def _paths(root: Path) -> RunPaths:
    return RunPaths(MOL, SIZE, SEED, root)


def _make_inputs(root: Path) -> dict:
    a = synthetic_arrays(MOL, 140, seed=0)
    frames = _frames(a)
    paths = _paths(root)
    split = paths.split_dir
    train, test = frames.subset(np.arange(20)), frames.subset(np.arange(20, 40))
    pool = frames.subset(np.arange(20, 140))  # test ⊂ reference, as in the real split
    test.save(split / "test.npz")
    pool.save(split / "reference.npz")
    for k, name in enumerate(("mse", "crmse")):
        torch.manual_seed(k)
        model = build_model(frames.z, TINY, train)
        save_checkpoint(model, paths.checkpoint(name), {"stand_in": True})

    rng = np.random.default_rng(5)
    start = pool.R[:M]
    R = start[None] + 0.02 * rng.standard_normal((T_FRAMES, M, 9, 3))
    E = np.repeat(pool.E[:M][None], T_FRAMES, 0) + rng.normal(0, 1.0, (T_FRAMES, M))
    time_ps = 0.01 * np.arange(1, T_FRAMES + 1)
    samples = {}
    # mse: replica 1 collapses into the H–H state from frame 4; replica 3 blows up at frame 7 (NaN from there)
    R_mse, E_mse = R.copy(), E.copy()
    R_mse[4:, 1] = collapse_methyl_h(R_mse[4:, 1])
    E_mse[4:, 1] = pool.E.min() - 30.0
    R_mse[7:, 3], E_mse[7:, 3] = np.nan, np.nan
    samples["mse"] = dict(R=R_mse, E=E_mse, unstable=np.array([-1, -1, -1, 7]))
    # crmse: everything physical, energies shifted up by 1 kcal/mol
    samples["crmse"] = dict(R=R.copy(), E=E + 1.0, unstable=np.full(M, -1))
    for name, s in samples.items():
        T_kin = np.where(np.isfinite(s["E"]), 500.0 + rng.normal(0, 20, (T_FRAMES, M)), np.nan)
        write_npz(
            paths.samples_dir(T, name) / "samples.npz",
            R=s["R"].astype(np.float32),
            E=s["E"],
            T_kin=T_kin,
            time_ps=time_ps,
            unstable_frame=s["unstable"],
            z=frames.z.astype(np.int64),
            temperature=np.array(500.0),
        )
    # the sample stage's summary: its T_conf of the samples is used as is (crmse only here)
    summary = {"T_conf_samples_K": 612.5, "T_conf_frames": 512}
    write_json(paths.samples_dir(T, "crmse") / "sample.json", summary)
    return {"pool": pool, "test": test, "samples": samples}


def _params() -> dict:
    p = load_params(REPO / "params.yaml")
    p["evaluate"].update(conf_temperature_frames=6, batch_size=16, noise_blocks=4, dihedral_bins=12)
    return p


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory) -> tuple[Path, dict, dict]:
    root = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    inputs = _make_inputs(root)
    metrics = evaluate_reference(_paths(root), T, _params())
    for arm in ARMS:
        metrics[arm] = evaluate_arm(_paths(root), T, arm, _params(), device="cpu", progress=False)
    return root, inputs, metrics


def _leaves(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_leaves(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def test_metrics_json_is_flat_numeric_and_complete(evaluated):
    root, _, metrics = evaluated
    paths = _paths(root)
    reference = read_json(paths.reference_dir(T) / "metrics.json")
    assert set(reference) == {"reference", "noise_floor"}
    on_disk = {**reference, **{arm: read_json(paths.metrics_dir(T, arm) / "metrics.json") for arm in ARMS}}
    leaves = _leaves(on_disk)
    assert all(k.count(".") == 1 for k in leaves), "each metrics.json must be flat (sections for the reference)"
    assert all(v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in leaves.values())
    for m in ARMS:
        for key in (
            "test_energy_mae",
            "test_forces_mae",
            "stable_fraction",
            "median_time_to_instability_ps",
            "spurious_replica_fraction",
            "spurious_frame_fraction",
            "lowest_energy_rel_dft_min",
            "T_set",
            "T_kin",
            "T_conf",
            "T_conf_pool_laplacian",
            "energy_w1",
            "energy_mean_shift",
            "hr_mae",
            "dihedral_hydroxyl_rmse",
            "dihedral_hydroxyl_unvisited",
            "dihedral_methyl_rmse",
            "dihedral_methyl_unvisited",
        ):
            assert key in on_disk[m], (m, key)
    for key in ("energy_min", "energy_mean", "energy_std", "spurious_distance_threshold"):
        assert key in on_disk["reference"]
    for key in ("energy_w1", "hr_mae", "dihedral_methyl_rmse", "dihedral_hydroxyl_unvisited"):
        assert on_disk["noise_floor"][key] is not None
    returned = _leaves(metrics)
    assert returned.keys() == leaves.keys()
    assert all(returned[k] == pytest.approx(v) for k, v in leaves.items() if v is not None)


def test_metrics_values_follow_the_inputs(evaluated):
    root, inputs, metrics = evaluated
    pool, test = inputs["pool"], inputs["test"]
    mse, crmse, ref = metrics["mse"], metrics["crmse"], metrics["reference"]
    # spurious: replica 1 of mse from frame 4 (t = 0.05 ps), 30 kcal/mol below the DFT minimum
    assert mse["spurious_replica_fraction"] == 0.25 and crmse["spurious_replica_fraction"] == 0.0
    assert mse["spurious_first_entry_min_ps"] == pytest.approx(0.05)
    assert mse["lowest_energy_rel_dft_min"] == pytest.approx(-30.0)
    assert mse["min_nonbonded_distance"] == pytest.approx(0.8, abs=1e-5)
    assert mse["spurious_frame_fraction"] == pytest.approx(6 / (4 * 10 - 3))
    # stability: replica 3 of mse unstable at frame 7 (0.08 ps); the collapse keeps bonds intact
    assert mse["stable_fraction"] == 0.75 and crmse["stable_fraction"] == 1.0
    assert mse["n_valid_frames"] == 37
    # temperatures
    assert mse["T_set"] == 500.0 and 450 < mse["T_kin"] < 550
    # energies: the crmse samples are the mse-free samples shifted by +1 → mean shift vs pool reflects it
    s = inputs["samples"]["crmse"]
    assert crmse["energy_mean_shift"] == pytest.approx(s["E"].mean() - pool.E.mean())
    assert ref["energy_min"] == pytest.approx(pool.E.min()) and ref["n_frames"] == len(pool)
    assert ref["dihedral_temperature"] == 500.0
    assert ref["max_bond_deviation"] < 0.5
    # test accuracy equals a direct evaluation of the checkpoint
    from crmse.model import load_checkpoint

    model, _ = load_checkpoint(_paths(root).checkpoint("mse"))
    E, F = model.energy_and_forces(torch.as_tensor(test.R, dtype=torch.float32))
    assert mse["test_energy_mae"] == pytest.approx(np.abs(E.numpy() - test.E).mean(), rel=1e-6)
    assert mse["test_forces_mae"] == pytest.approx(np.abs(F.numpy() - test.F).mean(), rel=1e-5)
    # samples' T_conf: from sample.json when the sample stage recorded it, else computed on valid frames
    assert crmse["T_conf"] == 612.5 and crmse["T_conf_frames"] == 512
    s = inputs["samples"]["mse"]
    valid = np.ones((T_FRAMES, M), bool)
    valid[7:, 3] = False
    R_valid = s["R"].astype(np.float32).astype(np.float64)[valid]
    pick = np.unique(np.linspace(0, len(R_valid) - 1, 6).round().astype(int))
    try:
        expect = frames_temperature(model.energy, R_valid[pick], None, 16, "cpu", torch.float32)
    except ValueError:
        expect = None
    assert mse["T_conf"] == pytest.approx(expect) and mse["T_conf_frames"] == 6
    # reference T_conf uses crmse.temperature with DFT forces on evenly spaced pool frames
    sel = np.unique(np.linspace(0, len(pool) - 1, 6).round().astype(int))
    try:
        expect = frames_temperature(model.energy, pool.R[sel], pool.F[sel], 16, "cpu", torch.float32)
    except ValueError:
        expect = None
    assert mse["T_conf_pool_laplacian"] == pytest.approx(expect)


def _read_csv(path: Path) -> tuple[list[str], np.ndarray]:
    with open(path) as fh:
        rows = list(csv.reader(fh))
    return rows[0], np.array(rows[1:], dtype=float)


def test_plot_tables(evaluated):
    root, inputs, _ = evaluated
    paths = _paths(root)
    ref_plots = paths.reference_dir(T) / "plots"
    names = sorted(str(p.relative_to(ref_plots)) for p in ref_plots.rglob("*.csv"))
    assert names == sorted(["hr/reference.csv", "energy/reference.csv", "dihedral/hydroxyl_reference.csv",
                            "dihedral/methyl_reference.csv"])
    for arm in ARMS:
        plots = paths.metrics_dir(T, arm) / "plots"
        names = sorted(str(p.relative_to(plots)) for p in plots.rglob("*.csv"))
        expect = [f"hr/{arm}.csv", f"energy/{arm}.csv", f"stability/{arm}.csv"]
        expect += [f"dihedral/{t}_{arm}.csv" for t in ("hydroxyl", "methyl")]
        expect += [f"parity/{k}_{arm}.csv" for k in ("energy", "forces")]
        assert names == sorted(expect)
    header, hr = _read_csv(ref_plots / "hr/reference.csv")
    assert header == ["r_A", "h"] and hr.shape == (500, 2)
    assert np.sum(hr[:, 1]) * (10 - 1e-6) / 500 == pytest.approx(1.0, rel=1e-5)
    header, e = _read_csv(ref_plots / "energy/reference.csv")
    assert header == ["energy_rel_kcal_mol", "density"] and len(e) == 60
    header, f = _read_csv(ref_plots / "dihedral/methyl_reference.csv")
    assert header == ["phi_deg", "F_kcal_mol"] and f[:, 1].min() == 0.0 and np.all(np.abs(f[:, 0]) < 180)
    plots = paths.metrics_dir(T, "mse") / "plots"
    header, st = _read_csv(plots / "stability/mse.csv")
    assert header == ["time_ps", "stable_fraction"]
    np.testing.assert_allclose(st[:, 1], [1] * 7 + [0.75] * 3)
    header, pe = _read_csv(plots / "parity/energy_mse.csv")
    assert header == ["dft", "model"] and len(pe) == len(inputs["test"])
    _, pf = _read_csv(plots / "parity/forces_mse.csv")
    assert len(pf) == 20 * 9 * 3


def test_replica_table_and_worst_frame(evaluated):
    root, inputs, _ = evaluated
    header, rows = _read_csv(_paths(root).metrics_dir(T, "mse") / "replicas.csv")
    assert tuple(header) == REPLICA_COLUMNS and len(rows) == M
    col = {name: rows[:, i] for i, name in enumerate(header)}
    # replica 1 enters the H–H state at frame 4 (0.05 ps), 30 kcal/mol below the DFT minimum, and stays
    assert col["first_spurious_ps"][1] == pytest.approx(0.05) and np.isnan(col["first_spurious_ps"][[0, 2, 3]]).all()
    assert col["lowest_energy_rel_dft_min"][1] == pytest.approx(-30.0)
    assert col["spurious_frame_fraction"][1] == pytest.approx(6 / 10)
    assert col["min_nonbonded_distance_A"][1] == pytest.approx(0.8, abs=1e-5)
    # replica 3 blows up at frame 7 (0.08 ps); the others stay stable
    assert col["first_unstable_ps"][3] == pytest.approx(0.08) and np.isnan(col["first_unstable_ps"][:3]).all()
    worst = read_json(_paths(root).metrics_dir(T, "mse") / "worst_frame.json")
    assert worst["replica"] == 1 and worst["energy_rel_dft_min"] == pytest.approx(-30.0)
    R = np.asarray(worst["R"])
    i, j = worst["closest_pair"]
    assert R.shape == (9, 3) and np.linalg.norm(R[i] - R[j]) == pytest.approx(0.8, abs=1e-5)


def test_missing_samples_is_a_clear_error(tmp_path):
    _make_inputs(tmp_path)
    missing = _paths(tmp_path).samples_dir(T, "crmse") / "samples.npz"
    missing.unlink()
    with pytest.raises(EvaluateError, match=r"crmse/samples\.npz"):
        evaluate_arm(_paths(tmp_path), T, "crmse", _params(), progress=False)
    assert not (_paths(tmp_path).metrics_dir(T, "crmse") / "metrics.json").exists()


def test_malformed_samples_are_named(tmp_path):
    path = tmp_path / "samples.npz"
    write_npz(path, R=np.zeros((3, 2, 9, 3)), E=np.zeros((3, 2)), time_ps=np.arange(3.0))
    with pytest.raises(ArtifactError, match="missing keys.*T_kin"):
        load_samples(path)
    write_npz(
        path,
        R=np.zeros((3, 2, 9, 3)),
        E=np.zeros((3, 3)),
        T_kin=np.zeros((3, 2)),
        time_ps=np.arange(3.0),
        unstable_frame=np.array([-1, -1]),
        z=np.ones(9),
        temperature=np.array(500.0),
    )
    with pytest.raises(ArtifactError, match=r"E has shape \(3, 3\), expected \(3, 2\)"):
        load_samples(path)


def test_dvc_stages_declare_inputs_outputs_and_plots():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    run = "${item.molecule}/n${item.size}/s${item.seed}"
    at = f"{run}/T${{item.temperature}}"
    stage = stages["evaluate"]
    assert set(stage["matrix"]) == {"molecule", "size", "seed", "temperature", "arm"}
    arm = "${item.arm}"
    for dep in ("pipelines/evaluate.py", "src/crmse/evaluate.py", "src/crmse/artifacts.py",
                f"data/splits/{run}/test.npz", f"data/splits/{run}/reference.npz", f"models/{run}/{arm}.pt",
                f"results/{at}/{arm}"):
        assert dep in stage["deps"], dep
    assert "evaluate" in stage["params"]
    (metric,) = stage["metrics"]
    assert metric == {f"metrics/{at}/${{item.arm}}/metrics.json": {"cache": False}}
    (plots,) = stage["plots"]
    assert plots == {f"metrics/{at}/${{item.arm}}/plots": {"cache": False}}
    ref = stages["reference"]
    assert set(ref["matrix"]) == {"molecule", "size", "seed", "temperature"}
    assert ref["metrics"] == [{f"metrics/{at}/reference/metrics.json": {"cache": False}}]


@pytest.mark.slow
def test_stage_script_runs_from_a_project_root(tmp_path):
    _make_inputs(tmp_path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["evaluate"].update(conf_temperature_frames=4, batch_size=16, noise_blocks=4)
    params["device"] = "cpu"
    params["md"]["temperatures"] = [500]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    def stage() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(REPO / "pipelines/evaluate.py"), MOL, str(SIZE), str(SEED), T, "crmse"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )

    out = stage()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "crmse: test E/F MAE" in out.stdout
    assert (_paths(tmp_path).metrics_dir(T, "crmse") / "metrics.json").exists()
    # a missing checkpoint: clear message naming the file, non-zero exit
    _paths(tmp_path).checkpoint("crmse").unlink()
    out = stage()
    assert out.returncode != 0 and "crmse.pt" in out.stderr


def test_a_model_without_valid_frames_gets_null_distribution_metrics(tmp_path):
    _make_inputs(tmp_path)
    path = _paths(tmp_path).samples_dir(T, "crmse") / "samples.npz"
    with np.load(path) as d:
        arrays = dict(d)
    arrays["unstable_frame"] = np.zeros(M, dtype=np.int64)  # every replica failed before its first frame
    arrays["R"][:] = np.nan
    arrays["E"][:] = np.nan
    write_npz(path, **arrays)
    crmse = evaluate_arm(_paths(tmp_path), T, "crmse", _params(), progress=False)
    mse = evaluate_arm(_paths(tmp_path), T, "mse", _params(), progress=False)
    assert crmse["stable_fraction"] == 0.0 and crmse["n_valid_frames"] == 0
    assert crmse["hr_mae"] is None and crmse["dihedral_methyl_rmse"] is None and crmse["T_kin"] is None
    assert set(crmse) == set(mse)  # same keys, so dvc metrics show lines up
    assert read_json(_paths(tmp_path).metrics_dir(T, "crmse") / "worst_frame.json") == {}
    plots = _paths(tmp_path).metrics_dir(T, "crmse") / "plots"
    assert not (plots / "hr/crmse.csv").exists() and (plots / "stability/crmse.csv").exists()
