"""DVC wiring: stages declare their scripts, params and outputs; download+split run under `dvc repro`."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from synthetic import write_synthetic_npz

from crmse.artifacts import RunPaths
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
            if key == "${item.arm}":  # each post-trained arm's own section
                assert set(stage["matrix"]["arm"]) <= set(SCHEMA), name
                continue
            node = SCHEMA
            for part in key.split("."):
                assert part in node, f"stage {name} declares unknown param {key}"
                node = node[part]


def _project(tmp_path: Path, sizes: str = "[40]", arms: list[str] | None = None, **md) -> Path:
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
    if arms:
        params["arms"] = arms
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    subprocess.run([*DVC, "init", "-q"], cwd=proj, check=True)
    return proj


def _run_repro(proj: Path, mirror: Path, *targets: str) -> subprocess.CompletedProcess:
    # A synthetic file has no pinned sha256.
    env = {**os.environ, "CRMSE_DATA_MIRROR": str(mirror), "CRMSE_DATA_ALLOW_UNPINNED": "1",
           "PYTHONPATH": str(proj / "src")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    return subprocess.run([*DVC, "repro", *targets], cwd=proj, env=env, capture_output=True, text=True)


def _repro(proj: Path, mirror: Path, *targets: str) -> str:
    out = _run_repro(proj, mirror, *targets)
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


def test_temperatures_and_arms_are_matrix_axes_with_one_path_scheme(tmp_path):
    plain = _stage_list(_project(tmp_path / "a"))
    for arm in ("mse", "crmse", "crmse_memory"):
        assert f"sample@ethanol-40-0-auto-{arm}" in plain and f"evaluate@ethanol-40-0-auto-{arm}" in plain
    assert "posttrain@ethanol-40-0-crmse" in plain and "posttrain@ethanol-40-0-crmse_memory" in plain
    assert "reference@ethanol-40-0-auto" in plain and "report@ethanol-40-0-auto" in plain
    assert not [s for s in plain if "-500" in s]
    proj = _project(tmp_path / "b", temperatures=["auto", 500])
    stages = _stage_list(proj)
    for arm in ("mse", "crmse", "crmse_memory"):
        assert f"sample@ethanol-40-0-500-{arm}" in stages and f"audit@ethanol-40-0-500-{arm}" in stages
    assert "report@ethanol-40-0-500" in stages and "posttrain@ethanol-40-0-crmse" in stages
    assert set(plain) <= set(stages)
    # The stages write where the scripts read: the folder crmse.artifacts.RunPaths builds.
    shown = subprocess.run([*DVC, "stage", "list"], cwd=proj, capture_output=True, text=True).stdout
    assert str(RunPaths("ethanol", 40, 0).samples_dir(500, "crmse_memory")) in shown
    # Fewer arms: fewer sampled branches (both CRMSE recipes are still trained).
    two = _stage_list(_project(tmp_path / "c", arms=["mse", "crmse_memory"]))
    assert "sample@ethanol-40-0-auto-crmse" not in two and "sample@ethanol-40-0-auto-crmse_memory" in two


@pytest.mark.slow
def test_a_misspelt_param_fails_dvc_repro(tmp_path):
    """A key no stage declares (md.n_replica) is caught by check_params, not silently ignored."""
    mirror = tmp_path / "mirror"
    write_synthetic_npz(mirror / "md17_ethanol.npz", n=150)
    proj = _project(tmp_path)
    _repro(proj, mirror, "split")
    for edit in (lambda p: p["md"].update(n_replica=8), lambda p: p.update(seed=[1])):
        params = yaml.safe_load((proj / "params.yaml").read_text())
        good = copy.deepcopy(params)
        edit(params)
        (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        out = _run_repro(proj, mirror, "split")
        assert out.returncode != 0 and "unknown key" in out.stderr, out.stdout + out.stderr
        (proj / "params.yaml").write_text(yaml.safe_dump(good, sort_keys=False))
    # A valid edit of an undeclared-by-split key reruns check_params only.
    assert "Running stage 'split" not in _repro(proj, mirror, "split")


def _crmse_imports(path: Path) -> set[str]:
    """crmse modules a file imports anywhere (function-level imports too), as ``crmse.x`` names."""
    import ast

    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("crmse")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("crmse"):
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # ``from crmse import x`` / a package's module
    return names


def _module_file(name: str) -> Path | None:
    base = REPO / "src" / Path(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def test_every_stage_depends_on_the_code_its_script_runs():
    """A stage whose code changed must rerun: every crmse module its script reaches (transitively) is a dep."""
    for name, stage in _stages().items():
        script = REPO / stage["cmd"].split()[1]
        todo, reached = [script], set()
        while todo:
            for mod in _crmse_imports(todo.pop()):
                f = _module_file(mod)
                if f is not None and f not in reached:
                    reached.add(f)
                    todo.append(f)
        deps = [REPO / d for d in stage["deps"]]
        missing = sorted(str(f.relative_to(REPO)) for f in reached
                         if f.name != "__init__.py" or f.parent.name != "crmse"
                         if not any(f == d or d in f.parents for d in deps))
        assert not missing, f"stage {name} runs code it does not depend on: {missing}"


def _outputs(stage: dict) -> list[tuple[str, bool]]:
    """(path, cached) of every out, metric and plot a stage declares, its matrix placeholders filled in."""
    item = {"molecule": "ethanol", "size": "200", "seed": "0", "temperature": "auto", "arm": "crmse"}
    found = []
    for group in ("outs", "metrics", "plots"):
        for entry in stage.get(group, []):
            path, opts = (entry, {}) if isinstance(entry, str) else next(iter(entry.items()))
            for key, value in item.items():
                path = path.replace(f"${{item.{key}}}", value)
            found.append((path, (opts or {}).get("cache", True)))
    return found


def test_git_holds_exactly_the_outputs_dvc_does_not_cache():
    # The published run is dvc.lock plus the cache: false outputs outside data/ (never committed); a cached
    # output in git, or a published one that git ignores, bloats the repository or empties a clone's metrics.
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    outputs = [out for stage in _stages().values() for out in _outputs(stage)]
    assert any(not cached for _, cached in outputs) and any(cached for _, cached in outputs)
    for path, cached in outputs:
        probe = path if Path(path).suffix else f"{path}/probe.csv"  # a folder output: a file inside it
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", probe], cwd=REPO).returncode == 0
        if path.startswith("data/"):
            assert ignored, f"{path}: data must stay out of git"
            continue
        assert ignored == cached, f"{path}: {'cached by DVC but not' if cached else 'published but'} git-ignored"
