"""The report stages on a tiny synthetic run: real evaluate and audit code on fake samples, then papermill.

The inputs of one run (ethanol, n_train 20, seed 0) are produced the way the pipeline produces them:
evaluate_run on stand-in checkpoints and fake samples.npz (MSE: one replica collapses two methyl H and
sits 30 kcal/mol below the DFT minimum; one replica blows up), run_audit with a fake DFT single point,
and training/chain logs in the stages' CSV formats. The per-run report and the index are then executed
by their stage scripts (papermill + nbconvert) and the HTML is checked for every figure and table.
"""

from __future__ import annotations

import base64
import csv
import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from synthetic import collapse_methyl_h, synthetic_arrays

from crmse import report
from crmse.audit import AuditConfig, DFTResult, DFTSettings, SampleRun, model_energy_forces, run_audit, write_rows_csv
from crmse.data import Frames
from crmse.evaluate import evaluate_run
from crmse.io import atomic_path, read_json, run_dir, write_json, write_npz
from crmse.model import build_model, load_checkpoint, save_checkpoint
from crmse.observables import BondReference, SpuriousDetector
from crmse.train import write_log_csv

REPO = Path(__file__).resolve().parents[1]
MOL, SIZE, SEED = "ethanol", 20, 0
TINY = {"n_atom_basis": 8, "n_filters": 8, "n_interactions": 1, "n_rbf": 8, "cutoff": 5.0, "dtype": "float32"}
T_FRAMES, M = 12, 4
T_SET = 650.0




def _write_csv(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def _params(root: Path, **top) -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p.update(molecules=[MOL], train_sizes=[SIZE], seeds=[SEED], device="cpu", **top)
    p["evaluate"].update(conf_temperature_frames=4, batch_size=16, noise_blocks=4, dihedral_bins=12)
    p["crmse"].update(iterations=30, eval_every=10, n_chains=8)
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    from crmse.params import load_params

    return load_params(root / "params.yaml")


def make_run(root: Path, crmse_dead: bool = False) -> dict:
    """Every input of the report for one run, in the stages' formats, mostly by the stages' own code.

    ``crmse_dead``: every CRMSE replica fails before its first saved frame (no valid frame at all), and the
    audit is skipped, as the audit stage writes it for a molecule not in audit.molecules.
    """
    params = _params(root)
    a = synthetic_arrays(MOL, 140, seed=0)
    frames = Frames(a["z"], a["R"], a["E"].reshape(-1), a["F"], a["md17_index"])
    split = run_dir(root / "data/splits", MOL, SIZE, SEED)
    train, test = frames.subset(np.arange(20)), frames.subset(np.arange(20, 40))
    pool = frames.subset(np.arange(20, 140))  # test ⊂ reference, as in the real split
    test.save(split / "test.npz")
    pool.save(split / "reference.npz")
    models = run_dir(root / "models", MOL, SIZE, SEED)
    for k, name in enumerate(("mse", "crmse")):
        torch.manual_seed(k)
        save_checkpoint(build_model(frames.z, TINY, train), models / f"{name}.pt", {"stand_in": True})

    rng = np.random.default_rng(5)
    R = pool.R[:M][None] + 0.02 * rng.standard_normal((T_FRAMES, M, *pool.R.shape[1:]))
    E = np.repeat(pool.E[:M][None], T_FRAMES, 0) + rng.normal(0, 1.0, (T_FRAMES, M))
    time_ps = 0.01 * np.arange(1, T_FRAMES + 1)
    R_mse, E_mse = R.copy(), E.copy()
    R_mse[4:, 1] = collapse_methyl_h(R_mse[4:, 1])  # replica 1 enters the H–H collapse at frame 4 (t = 0.05 ps)
    E_mse[4:, 1] = pool.E.min() - 30.0
    R_mse[8:, 3], E_mse[8:, 3] = np.nan, np.nan  # replica 3 blows up at frame 8
    samples = {"mse": (R_mse, E_mse, np.array([-1, -1, -1, 8])), "crmse": (R, E + 1.0, np.full(M, -1))}
    if crmse_dead:
        samples["crmse"] = (np.full_like(R, np.nan), np.full_like(E, np.nan), np.zeros(M, dtype=int))
    for name, (Rs, Es, uf) in samples.items():
        out = run_dir(root / "results", MOL, SIZE, SEED) / name
        T_kin = np.where(np.isfinite(Es), T_SET + rng.normal(0, 20, (T_FRAMES, M)), np.nan)
        write_npz(out / "samples.npz", R=Rs.astype(np.float32), E=Es, T_kin=T_kin, time_ps=time_ps,
                  unstable_frame=uf, z=frames.z.astype(np.int64), temperature=np.array(T_SET))
        write_json(out / "sample.json", {
            "temperature_setting": "auto", "temperature_K": T_SET, "T_conf_samples_K": T_SET + 10 * (name == "mse"),
            "T_conf_frames": 48, "settings": {"n_replicas": M, "production_ps": 0.12, "equilibration_fs": 10.0,
                                              "dt": 0.5, "friction": 0.01, "temperature": T_SET},
        })
    metrics = evaluate_run(MOL, SIZE, SEED, params, root=root, device="cpu", progress=False)

    # pretrain stage: per-epoch log (crmse.train's writer) and metrics
    epochs = np.arange(1, 31)
    write_log_csv(models / "mse_log.csv", [
        {"epoch": int(e), "lr": 5e-4, "train_loss": float(50 / e), "val_loss": float(60 / e),
         "val_energy_mae": float(2 / np.sqrt(e)), "val_force_mae": float(8 / np.sqrt(e)), "wall_s": float(e)}
        for e in epochs
    ])
    write_json(models / "mse_metrics.json", {
        "epochs": 30, "best_epoch": 28, "stop_reason": "max_epochs", "wall_s": 30.0, "device": "cpu",
        "T_conf_train_K": T_SET + 30, "T_conf_val_K": T_SET - 20, "T_conf_pool_K": T_SET, "T_auto_K": T_SET,
        "val": {"energy_mae": 0.4, "force_mae": 1.5}, "test": {"energy_mae": 0.41},
    })
    # crmse stage: per-iteration chain log, per-evaluation validation log, metrics (posttrain.py's formats)
    its = np.arange(1, 31)
    _write_csv(models / "crmse_log.csv", [
        {"iteration": int(i), "l_mse": 3.0 / i + 0.5, "l_c": 0.3 * np.exp(-i / 10), "gap": 0.3 * np.exp(-i / 10),
         "e_data": pool.E.mean() + 0.1, "e_chain": pool.E.mean() - 0.3 * np.exp(-i / 10),
         "blowups": float(i % 7 == 0), "random_resets": 0.0, "chain_age": float(20 * i), "n_spurious": float(i < 12),
         "grad_norm": 50.0 / i + 5, "grad_fit_norm": 40.0 / i + 5, "grad_hole_norm": 60.0 / i,
         "grad_cos": -0.8 + i / 40}
        for i in its
    ])
    _write_csv(models / "crmse_val.csv", [
        {"iteration": i, "val_energy_mae": 0.45 - 0.01 * k, "val_force_mae": 1.52 - 0.01 * k, "gap": 0.1,
         "offset_refit": 0.0, "blowups": 1.0, "n_spurious": 0.0, "wall_s": 1.0 * i}
        for k, i in enumerate((10, 20, 30))
    ])
    write_json(models / "crmse_metrics.json", {
        "T_chain_K": T_SET, "selected_iteration": 20, "selection": "best validation force MAE", "wall_s": 12.0,
        "device": "cpu", "final_gap": 0.02, "chain_blowups": 4, "chains_spurious_at_end": 0,
    })
    mdir = run_dir(root / "metrics", MOL, SIZE, SEED)
    if crmse_dead:
        write_json(mdir / "audit.json", {"skipped": True, "reason": f"{MOL} is not in audit.molecules"})
        write_rows_csv(mdir / "audit_frames.csv", [])
        return metrics
    # audit stage: the real run_audit, with a fake DFT (harmonic bonds of the synthetic data + offset)
    bonds = BondReference.from_frames(pool.z, pool.R, 1.3).bonds
    det = SpuriousDetector.from_reference(pool.z, pool.R, pool.E, bonds, 5.0, 0.25)
    r0 = np.linalg.norm(pool.R[0, bonds[:, 1]] - pool.R[0, bonds[:, 0]], axis=-1)
    e_base = float(pool.E.min())

    def fake_dft(z: np.ndarray, Rf: np.ndarray, settings: DFTSettings) -> DFTResult:
        d = np.linalg.norm(Rf[bonds[:, 1]] - Rf[bonds[:, 0]], axis=-1)
        return DFTResult(e_base + 120.0 + 150.0 * float(((d - r0) ** 2).sum()), np.zeros_like(Rf), "ok", 0.01, 3)

    runs, fns = {}, {}
    for name in ("mse", "crmse"):
        runs[name] = SampleRun.load(run_dir(root / "results", MOL, SIZE, SEED) / name / "samples.npz")
        model, _ = load_checkpoint(models / f"{name}.pt")
        fns[name] = model_energy_forces(model.eval(), 16)
    result = run_audit(pool.z, pool, runs, fns, det, DFTSettings(), AuditConfig(2, 2, 3, 4, SEED), cache=None,
                       test=None, progress=False, single_point=fake_dft)
    write_json(mdir / "audit.json", {"molecule": MOL, "n_train": SIZE, "seed": SEED, **result.metrics})
    write_rows_csv(mdir / "audit_frames.csv", result.rows)
    write_npz(run_dir(root / "results", MOL, SIZE, SEED) / "audit.npz", **result.arrays)
    return metrics


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("proj")
    torch.set_num_threads(1)
    return root, make_run(root)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _figures(page: str) -> dict[str, bytes]:
    """{figure key: PNG bytes} of every <figure id="fig-..."> with an embedded PNG."""
    out = {}
    for key, data in re.findall(r'<figure id="fig-([\w-]+)"[^>]*><img alt="[^"]*"[^>]*src="data:image/png;base64,'
                                r'([A-Za-z0-9+/=]+)"', page):
        out[key] = base64.b64decode(data)
    return out


# ----------------------------------------------------------------------------------------------------
# Library level (no kernel)


def test_occupancy_and_worst_frame_agree_with_evaluate(project):
    root, metrics = project
    run = report.load_run(root, MOL, SIZE, SEED)
    occ = run.occupancy()
    for m in ("mse", "crmse"):
        assert occ[m].n_entered / occ[m].n_replicas == metrics[m]["spurious_replica_fraction"]
        assert np.nanmin(occ[m].lowest_energy_rel) == pytest.approx(metrics[m]["lowest_energy_rel_dft_min"])
        assert np.nanmin(occ[m].min_distance) == pytest.approx(metrics[m]["min_nonbonded_distance"])
    mse = occ["mse"]
    assert np.isfinite(mse.first_entry_ps).tolist() == [False, True, False, False]
    assert mse.first_entry_ps[1] == pytest.approx(0.05)
    # the worst MSE frame is the collapsed replica 1, 30 kcal/mol below the DFT minimum
    assert mse.worst[1] == 1 and mse.worst_energy_rel == pytest.approx(-30.0)
    assert np.linalg.norm(mse.worst_R[6] - mse.worst_R[5]) == pytest.approx(0.8, abs=1e-5)


def test_generated_text_follows_the_numbers(project):
    root, metrics = project
    run = report.load_run(root, MOL, SIZE, SEED)
    text = report.summary_paragraph(run)
    assert "CRMSE reduced spurious-state occupancy from 1/4 to 0/4 replicas" in text
    assert "Replicas bond-stable to the end: MSE 3/4, CRMSE 4/4." in text
    # the opposite numbers give the opposite wording
    run.metrics["mse"]["spurious_replica_fraction"], run.metrics["crmse"]["spurious_replica_fraction"] = 0.0, 0.5
    assert "CRMSE increased spurious-state occupancy from 0/4 to 2/4 replicas" in report.summary_paragraph(run)
    run.metrics["mse"]["spurious_replica_fraction"] = 0.0
    run.metrics["crmse"]["spurious_replica_fraction"] = 0.0
    assert "Neither model entered a spurious state" in report.summary_paragraph(run)
    run.metrics["mse"]["energy_w1"], run.metrics["crmse"]["energy_w1"] = 9.0, 0.1
    run.metrics["noise_floor"]["energy_w1"] = 0.5
    s = report.summary_paragraph(run)
    assert "CRMSE is closer to the DFT reference, and only CRMSE is within the noise floor" in s
    run.metrics["mse"]["test_energy_mae"], run.metrics["crmse"]["test_energy_mae"] = 0.3, 1.2
    assert "only MSE within chemical accuracy" in report.summary_paragraph(run)
    # temperature: auto at T_set; like-for-like only when the pool's T_conf is within 5 %
    run.metrics["reference"]["T_conf_mse_laplacian"] = T_SET * 1.02
    t = report.temperature_sentence(run)
    assert t.count(".") >= 1 and f"T = {T_SET:.0f} K" in t and "like-for-like" in t and "auto" in t.lower()
    run.metrics["reference"]["T_conf_mse_laplacian"] = T_SET * 1.3
    assert "colder than the data" in report.temperature_sentence(run)


def test_metrics_table_has_a_floor_beside_every_metric(project):
    root, metrics = project
    run = report.load_run(root, MOL, SIZE, SEED)
    df = report.metrics_table(run)
    assert list(df.columns) == ["metric", "MSE", "CRMSE", "noise floor / DFT reference"]
    by = dict(zip(df["metric"], df.itertuples(index=False), strict=True))
    assert by["Replicas entering a spurious state"].MSE == "1/4"
    assert by["Energy W1 (kcal/mol)"][3] == report.fmt(metrics["noise_floor"]["energy_w1"], 2)
    for t in ("hydroxyl", "methyl"):
        row = next(r for r in df.itertuples(index=False) if r.metric.startswith("F(φ) RMSE") and t in r.metric)
        assert row[3] == report.fmt(metrics["noise_floor"][f"dihedral_{t}_rmse"], 2)
    assert all(isinstance(v, str) and v for v in df.iloc[:, 3])


def test_audit_absent_or_skipped_is_said(project, tmp_path):
    root, _ = project
    run = report.load_run(root, MOL, SIZE, SEED)
    assert report.fig_audit(run) is not None and report.audit_table(run) is not None
    run.audit, run.audit_frames = {"skipped": True, "reason": "ethanol is not in audit.molecules"}, None
    assert report.fig_audit(run) is None and report.audit_table(run) is None
    assert "skipped" in report.audit_sentence(run) and "audit.molecules" in report.audit_sentence(run)


def test_every_figure_survives_a_model_without_valid_frames(tmp_path):
    """A tiny pipeline run can kill every replica of a model: the report still draws, and says so."""
    torch.set_num_threads(1)
    metrics = make_run(tmp_path, crmse_dead=True)
    assert metrics["crmse"]["stable_fraction"] == 0.0 and metrics["crmse"].get("energy_w1") is None
    run = report.load_run(tmp_path, MOL, SIZE, SEED)
    assert run.audit == {"skipped": True, "reason": f"{MOL} is not in audit.molecules"}
    assert run.occupancy()["crmse"].worst is None and run.occupancy()["crmse"].n_entered == 0
    figs = {name: getattr(report, f"fig_{name}")(run) for name in (
        "temperatures", "spurious", "worst", "stability", "energy", "hr", "dihedrals", "parity", "training",
        "chains", "hole_gradient", "audit")}
    assert figs.pop("audit") is None
    for name, fig in figs.items():
        assert report.figure_png(fig).startswith(b"\x89PNG"), name
    text = report.summary_paragraph(run)
    assert "Replicas bond-stable to the end: MSE 3/4, CRMSE 0/4." in text and "undefined" in text
    assert report.metrics_table(run).set_index("metric").loc["Energy W1 (kcal/mol)", "CRMSE"] == "—"


def test_missing_inputs_are_named(tmp_path):
    _params(tmp_path)
    with pytest.raises(report.ReportError, match=r"metrics/ethanol/n20/s0/metrics\.json.*crmse_log\.csv"):
        report.load_run(tmp_path, MOL, SIZE, SEED)
    out = subprocess.run([sys.executable, str(REPO / "pipelines/report.py"), MOL, str(SIZE), str(SEED)],
                         cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert out.returncode != 0 and "missing inputs" in out.stderr and "samples.npz" in out.stderr
    assert not (tmp_path / "reports").exists()


def test_discover_runs_keeps_declared_runs_and_variants(tmp_path):
    for rel in ("ethanol/n200/s0", "ethanol/n50/s1", "ethanol/n999/s0", "aspirin/n200/s0", "ethanol/n200/s0/t500"):
        write_json(tmp_path / "metrics" / rel / "metrics.json", {})
    declared = {"molecules": ["ethanol"], "train_sizes": [50, 200], "seeds": [0, 1]}
    runs = report.discover_runs(tmp_path, declared)
    assert [r.rel for r in runs] == ["ethanol/n50/s1", "ethanol/n200/s0", "ethanol/n200/s0/t500"]
    assert runs[2].variant == "t500" and runs[2].report_html == "ethanol/n200/s0/t500.html"
    assert len(report.discover_runs(tmp_path)) == 5


# ----------------------------------------------------------------------------------------------------
# Stage level: papermill + nbconvert


def test_report_stage_renders_every_figure_and_the_table(project):
    root, metrics = project
    out = subprocess.run([sys.executable, str(REPO / "pipelines/report.py"), MOL, str(SIZE), str(SEED),
                          "--no-progress"], cwd=root, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    stem = run_dir(root / "reports", MOL, SIZE, SEED)
    page = stem.with_suffix(".html").read_text()
    figs = _figures(page)
    assert set(figs) == set(report.RUN_FIGURES), sorted(set(report.RUN_FIGURES) ^ set(figs))
    for key, png in figs.items():
        assert png.startswith(b"\x89PNG") and len(png) > 10_000, key  # a real, non-empty picture
    assert page.count('src="data:image/png;base64,') == len(report.RUN_FIGURES)  # (the CSS has one more)
    assert 'id="metrics-table"' in page and 'id="audit-table"' in page
    assert "CRMSE reduced spurious-state occupancy from 1/4 to 0/4 replicas" in page
    assert "correlated in time" in page and f"compared at T = {T_SET:.0f} K" in page
    assert "report.load_run" not in page  # code is hidden
    assert page.index('id="metrics-table"') < page.index('id="fig-temperature"') < page.index('id="fig-audit"')
    nb = read_json(stem.with_suffix(".ipynb"))
    assert nb["metadata"]["papermill"]["parameters"] == {
        "molecule": MOL, "size": SIZE, "seed": SEED, "root": ".", "variant": ""
    }
    assert not list(stem.parent.glob(".*.tmp"))  # atomic writes left no temporaries


def test_a_failing_cell_fails_the_stage_and_writes_nothing(project, tmp_path):
    src, _ = project
    root = tmp_path / "proj"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("reports"))
    val = run_dir(root / "models", MOL, SIZE, SEED) / "crmse_val.csv"
    val.write_text("iteration,something_else\n10,1.0\n")  # readable, but not the crmse stage's columns
    out = subprocess.run([sys.executable, str(REPO / "pipelines/report.py"), MOL, str(SIZE), str(SEED),
                          "--no-progress"], cwd=root, env=_env(), capture_output=True, text=True)
    assert out.returncode != 0
    assert "the report notebook failed" in out.stderr and "val_energy_mae" in out.stderr
    assert not (root / "reports").exists() or not list((root / "reports").rglob("*.*"))


def test_index_stage_links_runs_and_draws_the_sweep(project, tmp_path):
    src, _ = project
    root = tmp_path / "proj"
    shutil.copytree(src / "metrics", root / "metrics")
    shutil.copytree(src / "models", root / "models", ignore=shutil.ignore_patterns("*.pt"))
    _params(root)
    p = yaml.safe_load((root / "params.yaml").read_text())
    p.update(train_sizes=[SIZE, 40], seeds=[0, 1])
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    base = read_json(root / "metrics" / MOL / f"n{SIZE}" / "s0" / "metrics.json")
    for size, seed, scale in ((40, 0, 0.5), (SIZE, 1, 1.1), (40, 1, 0.6), (999, 0, 1.0)):  # n999: not declared
        met = {sec: {k: (v * scale if isinstance(v, float) and k != "T_set" else v) for k, v in d.items()}
               for sec, d in base.items()}
        write_json(run_dir(root / "metrics", MOL, size, seed) / "metrics.json", met)
        write_json(run_dir(root / "models", MOL, size, seed) / "mse_metrics.json",
                   read_json(root / "models" / MOL / f"n{SIZE}" / "s0" / "mse_metrics.json"))
    out = subprocess.run([sys.executable, str(REPO / "pipelines/report_index.py"), "--no-progress"], cwd=root,
                         env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    page = (root / "reports/index.html").read_text()
    assert (root / "reports/index.ipynb").exists()
    assert 'id="runs-table"' in page
    links = re.findall(r'<a href="([^"]+)">', page)
    assert sorted(links) == sorted(f"{MOL}/n{n}/s{s}.html" for n in (SIZE, 40) for s in (0, 1))
    figs = _figures(page)
    assert set(figs) == {f"sweep-{MOL}"} and len(figs[f"sweep-{MOL}"]) > 20_000
    assert "4 evaluated runs" in page and "n999" not in page
    table = page[page.index('id="sweep-table"'):]
    table = table[: table.index("</table>")]
    assert table.count("<tr") == 1 + 2 and " ± " in table  # header + two sizes, two seeds each
    assert report.AUTO_GROUP in page


def test_dvc_stages_declare_their_inputs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    rep, idx = stages["report"], stages["report_index"]
    assert set(rep["matrix"]) == {"molecule", "size", "seed"}
    run = "${item.molecule}/n${item.size}/s${item.seed}"
    for dep in ("pipelines/report.py", "pipelines/report.ipynb", "src/crmse/report.py", f"metrics/{run}/metrics.json",
                f"metrics/{run}/plots", f"metrics/{run}/audit.json", f"models/{run}/crmse_log.csv",
                f"models/{run}/mse_log.csv", f"results/{run}/mse/samples.npz", f"results/{run}/crmse/sample.json",
                f"data/splits/{run}"):
        assert dep in rep["deps"], dep
    outs = [next(iter(o)) if isinstance(o, dict) else o for o in rep["outs"]]
    assert sorted(outs) == sorted([f"reports/{run}.ipynb", f"reports/{run}.html"])
    # the index follows every run whatever train_sizes holds: folder deps plus the declared-run params
    assert {"metrics", "models", "pipelines/index.ipynb", "pipelines/report_index.py"} <= set(idx["deps"])
    assert {"molecules", "train_sizes", "seeds"} <= set(idx["params"])


def test_temperature_ablation_run_is_evaluated_reported_and_indexed_beside_the_main_run(project, tmp_path):
    src, _ = project
    root = tmp_path / "proj"
    shutil.copytree(src, root, ignore=shutil.ignore_patterns("reports"))
    res = run_dir(root / "results", MOL, SIZE, SEED)
    for name in ("mse", "crmse"):  # the same samples, declared as sampled at 500 K (the sample stage's layout)
        out = res / "T500" / name
        shutil.copytree(res / name, out)
        with np.load(out / "samples.npz") as d:
            arrays = {k: d[k] for k in d.files}
        write_npz(out / "samples.npz", **{**arrays, "temperature": np.array(500.0)})
        info = read_json(out / "sample.json")
        write_json(out / "sample.json", {**info, "temperature_setting": 500.0, "temperature_K": 500.0})
    params = _params(root)
    evaluate_run(MOL, SIZE, SEED, params, root=root, device="cpu", progress=False, variant="T500")
    met = read_json(run_dir(root / "metrics", MOL, SIZE, SEED) / "T500" / "metrics.json")
    assert met["mse"]["T_set"] == 500.0 and met["reference"]["dihedral_temperature"] == 500.0
    out = subprocess.run([sys.executable, str(REPO / "pipelines/report.py"), MOL, str(SIZE), str(SEED),
                          "--temperature", "500", "--no-progress"], cwd=root, env=_env(), capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    page = (run_dir(root / "reports", MOL, SIZE, SEED) / "T500.html").read_text()
    assert "sampled at 500 K (temperature ablation)" in page and "compared at T = 500 K" in page
    out = subprocess.run([sys.executable, str(REPO / "pipelines/report_index.py"), "--no-progress"], cwd=root,
                         env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    index = (root / "reports/index.html").read_text()
    links = re.findall(r'<a href="([^"]+)">', index)
    assert sorted(links) == sorted([f"{MOL}/n{SIZE}/s{SEED}.html", f"{MOL}/n{SIZE}/s{SEED}/T500.html"])
    assert report.AUTO_GROUP in index and "T = 500 K" in index


def test_hole_gradient_figure_needs_a_hole_memory(project):
    root, _ = project
    run = report.load_run(root, MOL, SIZE, SEED)
    n_lines = len(report.fig_hole_gradient(run).axes[0].lines)
    run.crmse_log["grad_cos_energy"] = -run.crmse_log["grad_cos"]  # what crmse.energy_projection logs as well
    assert len(report.fig_hole_gradient(run).axes[0].lines) == n_lines + 1
    run.crmse_log = run.crmse_log.drop(columns=["grad_cos", "grad_fit_norm", "grad_hole_norm"])  # hole_memory: 0
    assert report.fig_hole_gradient(run) is None
