"""The whole DVC pipeline on a tiny synthetic molecule: download → … → report_index."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from synthetic import write_synthetic_npz

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
    "crmse": {"n_chains": 4, "scout_chains": 4, "steps_per_iter": 2, "iterations": 6, "eval_every": 3},
    "md": {
        "n_replicas": 3, "equilibration_fs": 5, "production_ps": 0.02, "save_every": 2, "chunk_frames": 5,
        "conf_temperature_frames": 8,
    },
    "evaluate": {"conf_temperature_frames": 8},
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
    for stage in ("download", "split", "pretrain", "crmse", "sample", "evaluate", "audit", "report", "report_index"):
        assert f"Running stage '{stage}" in first, stage
    run = "ethanol/n30/s0"
    metrics = json.loads((proj / "metrics" / run / "metrics.json").read_text())
    for model in ("mse", "crmse"):
        assert metrics[model]["n_replicas"] == 3
        assert 0 <= metrics[model]["stable_fraction"] <= 1
    assert "hr_mae" in metrics["noise_floor"]
    html = (proj / "reports" / f"{run}.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 10
    assert "noise floor" in html.lower()
    assert (proj / "reports/index.html").exists()

    shown = subprocess.run([*DVC, "metrics", "show", "--json"], cwd=proj, env=env, capture_output=True, text=True)
    assert shown.returncode == 0 and "test_energy_mae" in shown.stdout
    # Nothing changed: every stage is cached.
    assert "Running stage" not in repro()

    # A one-off variation as a DVC experiment: only CRMSE and what follows it rerun; `dvc exp show` lists it.
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "add", "-A"], cwd=proj, check=True, capture_output=True)
    subprocess.run([*git, "commit", "-q", "-m", "tiny"], cwd=proj, check=True, capture_output=True)
    exp = subprocess.run([*DVC, "exp", "run", "-n", "lam-half", "-S", "crmse.lam=0.5"], cwd=proj, env=env,
                         capture_output=True, text=True)
    assert exp.returncode == 0, exp.stdout[-4000:] + exp.stderr[-4000:]
    assert "Running stage 'crmse@ethanol-30-0'" in exp.stdout and "Running stage 'pretrain" not in exp.stdout
    show = subprocess.run([*DVC, "exp", "show", "--json"], cwd=proj, env=env, capture_output=True, text=True)
    assert show.returncode == 0, show.stderr
    assert "lam-half" in show.stdout and "test_energy_mae" in show.stdout and '"lam": 0.5' in show.stdout
