"""DVC wiring: stages declare their scripts, params and outputs; download+split run under `dvc repro`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from synthetic import write_synthetic_npz

from crmse.io import temperature_variant
from crmse.params import SCHEMA

REPO = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_depends_on_its_script_and_declares_known_params():
    for name, stage in _stages().items():
        script = stage["cmd"].split()[1]
        assert script.startswith("pipelines/") and (REPO / script).exists(), name
        assert script in stage["deps"], f"stage {name} does not depend on its script {script}"
        for p in stage.get("params", []):
            key = p if isinstance(p, str) else next(iter(p))
            if key == "per_molecule.${item.molecule}":
                assert "molecule" in stage["matrix"], name
                continue
            node = SCHEMA
            for part in key.split("."):
                assert part in node, f"stage {name} declares unknown param {key}"
                node = node[part]


def _project(tmp_path: Path, sizes: str = "[40]", **md) -> Path:
    """A copy of the repository's pipeline definition in a fresh git+DVC project."""
    proj = tmp_path / "proj"
    for item in ("src", "pipelines", "dvc.yaml", "params.yaml"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, proj / item if src.is_dir() else proj)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["molecules"] = ["ethanol"]
    params["train_sizes"] = yaml.safe_load(sizes)
    params["split"].update(n_val=10, n_test=20)
    params["md"].update(md)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    subprocess.run([*DVC, "init", "-q"], cwd=proj, check=True)
    return proj


def _repro(proj: Path, mirror: Path, *targets: str) -> str:
    env = {**os.environ, "CRMSE_DATA_MIRROR": str(mirror), "PYTHONPATH": str(proj / "src")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    out = subprocess.run([*DVC, "repro", *targets], cwd=proj, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


@pytest.mark.slow
def test_download_and_split_under_dvc_repro(tmp_path):
    mirror = tmp_path / "mirror"
    write_synthetic_npz(mirror / "md17_ethanol.npz", n=150)
    proj = _project(tmp_path)
    first = _repro(proj, mirror, "split")
    assert "Running stage 'download@ethanol'" in first and "Running stage 'split@ethanol-40-0'" in first
    split = proj / "data/splits/ethanol/n40/s0"
    assert sorted(p.name for p in split.iterdir()) == sorted(
        ["train.npz", "val.npz", "test.npz", "reference.npz", "split.json"]
    )
    # Nothing changed: a no-op.
    second = _repro(proj, mirror, "split")
    assert "Running stage" not in second
    # A new training size reruns only the new split branch.
    params = yaml.safe_load((proj / "params.yaml").read_text())
    params["train_sizes"] = [40, 60]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _repro(proj, mirror, "split")
    assert "Running stage 'split@ethanol-60-0'" in third
    assert "Running stage 'download@ethanol'" not in third and "Running stage 'split@ethanol-40-0'" not in third


def _stage_list(proj: Path) -> list[str]:
    out = subprocess.run([*DVC, "stage", "list", "--name-only"], cwd=proj, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout.split()


def test_temperature_ablation_adds_stages_only_when_asked(tmp_path):
    plain = _stage_list(_project(tmp_path / "a"))
    assert not [s for s in plain if "ablation" in s]
    proj = _project(tmp_path / "b", ablation_temperatures=[500])
    stages = _stage_list(proj)
    for model in ("mse", "crmse"):
        assert f"sample_ablation@ethanol-40-0-500-{model}" in stages
    assert "evaluate_ablation@ethanol-40-0-500" in stages and "report_ablation@ethanol-40-0-500" in stages
    # The main branches are untouched, and the ablation writes where the scripts read (same folder name).
    assert set(plain) <= set(stages)
    shown = subprocess.run([*DVC, "stage", "list"], cwd=proj, capture_output=True, text=True).stdout
    assert f"results/ethanol/n40/s0/{temperature_variant('500')}/mse" in shown
