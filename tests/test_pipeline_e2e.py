"""The whole DVC pipeline on a tiny synthetic molecule, three arms × two temperatures: download → … → report_index."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from synthetic import write_synthetic_npz

from crmse.artifacts import RunPaths

REPO = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]

TINY = {
    "molecules": ["ethanol"],
    "train_sizes": [30],
    "seeds": [0],
    "torch_threads": 1,
    "split": {"n_val": 10, "n_test": 20},
    "model": {"n_atom_basis": 8, "n_filters": 8, "n_interactions": 1, "n_rbf": 8},
    "mse": {"max_epochs": 3, "max_steps": 1000, "max_minutes": 0.5},
    # Chains at 500 K and zero detector margins: the tiny model's chains are flagged from iteration 4 on, so the
    # hinge acts and (with the last weights written) the memory arm's settings change its weights.
    "crmse": {"chains": {"n": 4, "steps_per_iter": 2, "temperature": 500}, "iterations": 6,
              "selection": {"every": 3, "rule": "last"}},
    "crmse_memory": {"scouts": {"n": 4}},
    "md": {
        "temperatures": ["auto", 500],
        "auto_temperature_bounds": [1.0e-3, 1.0e12],  # the tiny model's Laplacian gives ~10⁶ K
        "n_replicas": 3, "equilibration_fs": 5, "production_ps": 0.02, "save_every": 2, "chunk_frames": 5,
        "conf_temperature_frames": 8,
    },
    "evaluate": {"conf_temperature_frames": 8, "spurious_energy_margin": 0.0, "spurious_distance_margin": 0.0},
    "audit": {"basis": "sto-3g", "n_reference": 2, "n_lowest": 1, "n_spurious": 0, "n_random": 1, "threads": 1},
}


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) else v
    return out


@pytest.mark.slow
def test_tiny_pipeline_runs_end_to_end_and_is_cached(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    for item in ("src", "pipelines", "dvc.yaml"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, proj / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, proj / item)
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    mirror = tmp_path / "mirror"
    write_synthetic_npz(mirror / "md17_ethanol.npz", n=150)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    subprocess.run([*DVC, "init", "-q"], cwd=proj, check=True)
    env = {
        **os.environ,
        "CRMSE_DATA_MIRROR": str(mirror),
        "CRMSE_DATA_ALLOW_UNPINNED": "1",  # a synthetic file: no pinned sha256
        "PYTHONPATH": str(proj / "src"),
        "CRMSE_DFT_CACHE": str(tmp_path / "dft_cache"),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }

    def repro() -> str:
        out = subprocess.run([*DVC, "repro"], cwd=proj, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        return out.stdout

    first = repro()
    for stage in ("check_params", "download", "split", "pretrain", "posttrain", "sample", "reference", "evaluate",
                  "audit", "report", "report_index"):
        assert f"Running stage '{stage}" in first, stage
    run = RunPaths("ethanol", 30, 0, proj)
    arms = ("mse", "crmse", "crmse_memory")
    for temperature in ("auto", 500):
        for arm in arms:
            m = json.loads((run.metrics_dir(temperature, arm) / "metrics.json").read_text())
            assert m["n_replicas"] == 3 and 0 <= m["stable_fraction"] <= 1, (temperature, arm)
        floor = json.loads((run.reference_dir(temperature) / "metrics.json").read_text())["noise_floor"]
        assert "hr_mae" in floor
        html = run.report(temperature, proj / "reports").with_suffix(".html").read_text()
        assert html.count('src="data:image/png;base64,') >= 10
        assert "noise floor" in html.lower() and "CRMSE + memory" in html
    assert json.loads((run.metrics_dir(500, "mse") / "metrics.json").read_text())["T_set"] == 500.0
    # The paper's arm logs only the contrastive term's columns; the memory arm adds the hole term's.
    crmse_cols = (run.train_log("crmse")).read_text().splitlines()[0].split(",")
    memory_cols = (run.train_log("crmse_memory")).read_text().splitlines()[0].split(",")
    assert "l_hole" not in crmse_cols and "l_hole" in memory_cols and set(crmse_cols) < set(memory_cols)
    assert (proj / "reports/index.html").exists()

    shown = subprocess.run([*DVC, "metrics", "show", "--json"], cwd=proj, env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "test_energy_mae" in shown.stdout
    # Nothing changed: every stage is cached.
    assert "Running stage" not in repro()

    # One arm's setting as a DVC experiment: only that arm's branch (and the reports) may rerun.
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=proj, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-q", "-m", "tiny"], cwd=proj, check=True, capture_output=True)
    before = run.checkpoint("crmse_memory").read_bytes()
    exp = subprocess.run([*DVC, "exp", "run", "-n", "hinge-half", "-S", "crmse_memory.weight=0.5"], cwd=proj, env=env,
                         capture_output=True, text=True)
    assert exp.returncode == 0, exp.stdout[-4000:] + exp.stderr[-4000:]
    ran = set(re.findall(r"Running stage '([^']+)'", exp.stdout))
    assert "posttrain@ethanol-30-0-crmse_memory" in ran
    branch = {"posttrain@ethanol-30-0-crmse_memory"} | {
        f"{stage}@ethanol-30-0-{t}-crmse_memory" for stage in ("sample", "evaluate", "audit") for t in ("auto", 500)
    }
    reports = {"report@ethanol-30-0-auto", "report@ethanol-30-0-500", "report_index"}
    assert ran <= branch | reports | {"check_params"}, sorted(ran)
    # The hinge held remembered holes, so its weight changed the weights and the whole branch reran.
    assert run.checkpoint("crmse_memory").read_bytes() != before
    assert branch <= ran, sorted(ran)
    show = subprocess.run([*DVC, "exp", "show", "--json"], cwd=proj, env=env, capture_output=True, text=True)
    assert show.returncode == 0, show.stderr
    assert "hinge-half" in show.stdout and "test_energy_mae" in show.stdout and '"weight": 0.5' in show.stdout
