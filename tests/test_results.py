"""README's generated result block (crmse.results) on a fake metrics tree, and the dvc status classifier."""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Any

import pytest
import yaml

from crmse import results
from crmse.artifacts import ARMS, RunPaths
from crmse.audit import ROW_FIELDS
from crmse.io import write_json
from crmse.molecules import TORSIONS
from crmse.results import END, START, ResultsError, classify_status, generate, render_block, replace_block

REPO = Path(__file__).resolve().parents[1]
README = f"# crmse\n\nintro text\n\n## What it shows\n\n{START}\nplaceholder\n{END}\n\n## Two commands\n\nkeep me\n"

# Per molecule and arm: test E MAE, test F MAE, spurious and stable fractions, lowest E − DFT min, W1 ± sd.
ARM_VALUES = {
    "ethanol": {
        "mse": (0.5051, 1.4132, 12 / 64, 48 / 64, -107.26, 0.7012, 0.0456),
        "crmse": (0.4249, 1.3851, 3 / 64, 56 / 64, -4.311, 0.5501, 0.0321),
        "crmse_memory": (0.4012, 1.3702, 0.0, 1.0, 2.5, 0.4987, None),
    },
    "aspirin": {
        "mse": (1.0791, 2.3853, 32 / 64, 33 / 64, -16.84, 1.2345, 0.1),
        "crmse": (1.7322, 2.4001, 2 / 64, 59 / 64, 12.5, 0.9876, 0.0543),
        "crmse_memory": (1.0402, 2.3702, 0.0, 61 / 64, 15.75, 0.4801, 0.0222),
    },
}
T_AUTO = {"ethanol": 654.31, "aspirin": 556.04}
RANDOM_ERRORS = [0.5, 0.9, 1.2, 0.3, 0.8, 1.1, 0.7, 0.6, 1.0]  # |model − DFT| of ethanol mse's random frames


def write_params(root: Path, temperatures: list[Any] | None = None) -> None:
    """The repository's params.yaml, optionally with other md.temperatures."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    if temperatures is not None:
        params["md"]["temperatures"] = temperatures
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def arm_metrics(molecule: str, arm: str) -> dict[str, Any]:
    e, f, spur, stable, lowest, w1, w1_sd = ARM_VALUES[molecule][arm]
    row = {"test_energy_mae": e, "test_forces_mae": f, "n_replicas": 64, "spurious_replica_fraction": spur,
           "stable_fraction": stable, "lowest_energy_rel_dft_min": lowest, "energy_w1": w1,
           "energy_w1_boot_sd": w1_sd, "hr_mae": 0.0512, "hr_mae_boot_sd": 0.0049}
    for i, t in enumerate(TORSIONS[molecule]):
        row[f"dihedral_{t.name}_rmse"] = 0.25 + 0.1 * i
        row[f"dihedral_{t.name}_rmse_boot_sd"] = 0.01 * (i + 1)
    return row


def write_audit(folder: Path, arm: str) -> None:
    """An audit.json (10 random frames, one failed) and audit_frames.csv with the random frames' errors."""
    write_json(folder / "audit.json", {
        "arm": arm,
        "offset": {"offset": 119.9, "std": 1.0, "n": 16, "n_failed": 0, "label_energy_mae": 0.1523},
        "models": {arm: {"random": {"n": 10, "n_failed": 1, "energy_mae": 0.8123}}},
    })
    rows = [{"model": arm, "kind": "random", "status": "ok", "spurious": False, "model_minus_dft": e * (-1) ** i}
            for i, e in enumerate(RANDOM_ERRORS)]
    rows += [{"model": arm, "kind": "random", "status": "failed", "spurious": False, "model_minus_dft": ""},
             {"model": arm, "kind": "reference", "status": "ok", "spurious": False, "model_minus_dft": 40.0},
             {"model": arm, "kind": "lowest", "status": "ok", "spurious": True, "model_minus_dft": 90.0}]
    with open(folder / "audit_frames.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=ROW_FIELDS, restval="")
        w.writeheader()
        w.writerows(rows)


def write_energy_curve(path: Path, shift: float) -> None:
    """An energy histogram table as evaluate and reference write it (a Gaussian, shifted by ``shift`` kcal/mol)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    x = [-10 + 0.5 * i for i in range(41)]
    with open(path, "w", newline="") as fh:
        fh.write("energy_rel_kcal_mol,density\n")
        fh.writelines(f"{e},{math.exp(-((e - shift) ** 2) / 8) / math.sqrt(8 * math.pi)}\n" for e in x)


def write_tree(root: Path, temperatures: tuple[str, ...] = ("auto",)) -> None:
    """Metrics of ethanol and aspirin (n200, s0), three arms, reference noise floors; audits of ethanol only."""
    for molecule in ("ethanol", "aspirin"):
        paths = RunPaths(molecule, 200, 0, root)
        write_json(paths.train_metrics("mse"), {"T_auto_K": T_AUTO[molecule]})
        for t in temperatures:
            floor = {"energy_w1": 0.1234, "hr_mae": 0.0101}
            floor.update({f"dihedral_{x.name}_rmse": 0.05 for x in TORSIONS[molecule]})
            write_json(paths.reference_dir(t) / "metrics.json", {"reference": {"n_frames": 120}, "noise_floor": floor})
            write_energy_curve(paths.reference_dir(t) / "plots/energy/reference.csv", shift=0.0)
            for arm in ARMS:
                folder = paths.metrics_dir(t, arm)
                write_json(folder / "metrics.json", arm_metrics(molecule, arm))
                write_energy_curve(folder / "plots/energy" / f"{arm}.csv", shift=ARMS.index(arm))
                if molecule == "ethanol":
                    write_audit(folder, arm)
                else:
                    write_json(folder / "audit.json", {"skipped": True, "reason": "not in audit.molecules"})


@pytest.fixture
def project(tmp_path: Path) -> Path:
    write_params(tmp_path)
    write_tree(tmp_path)
    (tmp_path / "README.md").write_text(README)
    return tmp_path


def block_of(text: str) -> str:
    return text[text.index(START) + len(START) : text.index(END)]


def table_row(block: str, molecule: str, label: str) -> str:
    """The row starting with ``label`` in ``molecule``'s table."""
    section = block[block.index(f"**{molecule}**") :]
    return next(line for line in section.splitlines() if line.startswith(f"| {label} |"))


# ----------------------------------------------------------------------------------------------------
# The generator


def test_tables_on_fixture_metrics(project: Path) -> None:
    _, text, _ = generate(project, commit="abc1234", stale=False)
    block = block_of(text)
    assert "commit `abc1234`, the last to change `dvc.lock`" in block
    assert "Stale" not in block
    assert "**ethanol** — n_train 200, seed 0, sampled at `Tauto` = 654.3 K" in block
    assert "**aspirin** — n_train 200, seed 0, sampled at `Tauto` = 556.0 K" in block
    assert block.index("**ethanol**") < block.index("**aspirin**")  # params.yaml's order
    assert "|  | MSE | CRMSE | CRMSE + memory | noise floor |" in block

    row = table_row
    assert row(block, "ethanol", "test energy MAE (kcal/mol)") == (
        "| test energy MAE (kcal/mol) | 0.505 | 0.425 | 0.401 | — |")
    assert row(block, "ethanol", "test force MAE (kcal/mol/Å)").endswith("| 1.413 | 1.385 | 1.370 | — |")
    # k/M from fraction × n_replicas
    assert row(block, "ethanol", "replicas entering a spurious state").endswith("| 12/64 | 3/64 | 0/64 | — |")
    assert row(block, "aspirin", "replicas entering a spurious state").endswith("| 32/64 | 2/64 | 0/64 | — |")
    assert row(block, "ethanol", "bond-stable replicas").endswith("| 48/64 | 56/64 | 64/64 | — |")
    assert row(block, "aspirin", "bond-stable replicas").endswith("| 33/64 | 59/64 | 61/64 | — |")
    # decimals follow the magnitude: -107.26 → -107, -4.311 → -4.311, 15.75 → 15.8 (one decimal below 100)
    assert row(block, "ethanol", "lowest sampled energy − DFT minimum (kcal/mol)").endswith(
        "| -107 | -4.311 | 2.500 | — |")
    assert row(block, "aspirin", "lowest sampled energy − DFT minimum (kcal/mol)").endswith(
        "| -16.8 | 12.5 | 15.8 | — |")
    # ± the bootstrap sd at the mean's decimals; no ± when the sd is undefined; noise floor beside
    assert row(block, "ethanol", "energy W1 (kcal/mol)").endswith(
        "| 0.701 ± 0.046 | 0.550 ± 0.032 | 0.499 | 0.123 |")
    assert row(block, "ethanol", "h(r) MAE").endswith("| 0.051 ± 0.005 | 0.051 ± 0.005 | 0.051 ± 0.005 | 0.010 |")
    assert row(block, "ethanol", "F(φ) RMSE, hydroxyl (kcal/mol)").endswith(
        "| 0.250 ± 0.010 | 0.250 ± 0.010 | 0.250 ± 0.010 | 0.050 |")
    assert row(block, "ethanol", "F(φ) RMSE, methyl (kcal/mol)").endswith("| 0.350 ± 0.020 | 0.050 |")
    for name in ("ester", "ring_ester", "carboxyl", "acid"):
        assert f"| F(φ) RMSE, {name} (kcal/mol) |" in block[block.index("**aspirin**") :]
    assert "F(φ) RMSE, hydroxyl" not in block[block.index("**aspirin**") :]
    # DFT audit: audit.json's mean, n = converged random frames, sd over them from audit_frames.csv
    sd = statistics.stdev(RANDOM_ERRORS)
    assert row(block, "ethanol", "DFT audit energy MAE, random frames (kcal/mol)") == (
        f"| DFT audit energy MAE, random frames (kcal/mol) | 0.812 ± {sd:.3f} (n=9) | 0.812 ± {sd:.3f} (n=9) "
        f"| 0.812 ± {sd:.3f} (n=9) | 0.152 (n=16) |")
    assert row(block, "aspirin", "DFT audit energy MAE, random frames (kcal/mol)").endswith(
        "| not audited | not audited | not audited | — |")


def test_stale_flag_and_no_commit(project: Path) -> None:
    _, text, _ = generate(project, commit="abc1234", stale=True)
    assert "at commit" not in text and "**Stale:** code or params changed since that run" in block_of(text)
    _, text, _ = generate(project, commit="", stale=False)
    assert "a `dvc.lock` that no commit holds yet" in text


def test_every_temperature_setting_gets_a_table(tmp_path: Path) -> None:
    write_params(tmp_path, ["auto", 500])
    write_tree(tmp_path, ("auto", "500"))
    (tmp_path / "README.md").write_text(README)
    block = block_of(generate(tmp_path, commit="abc1234", stale=False)[1])
    titles = [line for line in block.splitlines() if line.startswith("**")]
    assert titles == [
        "**ethanol** — n_train 200, seed 0, sampled at `Tauto` = 654.3 K",
        "**ethanol** — n_train 200, seed 0, sampled at `T500` = 500.0 K",
        "**aspirin** — n_train 200, seed 0, sampled at `Tauto` = 556.0 K",
        "**aspirin** — n_train 200, seed 0, sampled at `T500` = 500.0 K",
    ]


def test_output_is_deterministic(project: Path) -> None:
    _, first, png = generate(project, commit="abc1234", stale=False)
    (project / "README.md").write_text(first)
    old, second, png_again = generate(project, commit="abc1234", stale=False)
    assert first == second == old  # regenerating an up-to-date README changes nothing
    assert png == png_again and png.startswith(b"\x89PNG")
    assert f"]({results.FIGURE})" in block_of(first)


def test_missing_metrics_name_the_files(project: Path) -> None:
    gone = RunPaths("aspirin", 200, 0, project).metrics_dir("auto", "crmse") / "metrics.json"
    gone.unlink()
    floor = RunPaths("ethanol", 200, 0, project).reference_dir("auto") / "metrics.json"
    floor.unlink()
    with pytest.raises(ResultsError) as err:
        generate(project, commit="abc1234", stale=False)
    assert str(gone) in str(err.value) and str(floor) in str(err.value)


def test_auto_needs_the_pretrain_metrics(project: Path) -> None:
    path = RunPaths("ethanol", 200, 0, project).train_metrics("mse")
    path.unlink()
    with pytest.raises(ResultsError, match=str(path)):
        generate(project, commit="abc1234", stale=False)


def test_absent_audit_is_a_dash(project: Path) -> None:
    (RunPaths("ethanol", 200, 0, project).metrics_dir("auto", "crmse") / "audit.json").unlink()
    block = block_of(generate(project, commit="abc1234", stale=False)[1])
    cells = table_row(block, "ethanol", "DFT audit energy MAE, random frames (kcal/mol)").split(" | ")
    assert cells[2] == "—" and cells[1].endswith("(n=9)")


# ----------------------------------------------------------------------------------------------------
# Markers


def test_replace_block_touches_nothing_outside_the_markers() -> None:
    out = replace_block(README, "NEW\n")
    assert out == README.replace("\nplaceholder\n", "\nNEW\n")
    head, tail = README.split(START)[0], README.split(END)[1]
    assert out.startswith(head + START) and out.endswith(END + tail)
    assert replace_block(out, "NEW\n") == out


@pytest.mark.parametrize("text, message", [
    ("# no markers\n", "exactly one"),
    (f"{START}\n{START}\n{END}\n", "exactly one"),
    (f"{START}\nx\n", "exactly one"),
    (f"{END}\nx\n{START}\n", "before"),
])
def test_bad_markers_are_a_clear_error(text: str, message: str) -> None:
    with pytest.raises(ResultsError, match=message):
        replace_block(text, "x\n")


def test_missing_markers_in_readme(project: Path) -> None:
    (project / "README.md").write_text("# crmse\n")
    with pytest.raises(ResultsError, match="results:start"):
        generate(project, commit="abc1234", stale=False)


# ----------------------------------------------------------------------------------------------------
# write and check commands (git and DVC replaced by fixed answers)


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(results, "lock_commit", lambda root=".": "abc1234")
    monkeypatch.setattr(results, "lock_uncommitted", lambda root=".": False)
    monkeypatch.setattr(results, "freshness", lambda root=".": results.Freshness(()))


def test_check_fails_on_a_modified_block_and_passes_on_the_generated_one(
    project: Path, offline: None, capsys: pytest.CaptureFixture[str]
) -> None:
    root = ["--root", str(project)]
    assert results.main(["check", *root]) == 1  # the placeholder is not the generated block
    assert results.main(["write", *root]) == 0
    generated = (project / "README.md").read_text()
    assert "intro text" in generated and "keep me" in generated
    assert results.main(["check", *root]) == 0
    capsys.readouterr()

    (project / "README.md").write_text(generated.replace("| 12/64 |", "| 11/64 |"))
    assert results.main(["check", *root]) == 1
    out = capsys.readouterr().out
    assert "-| replicas entering a spurious state | 11/64" in out
    assert "+| replicas entering a spurious state | 12/64" in out


def test_check_fails_on_a_missing_or_changed_figure_and_write_redraws_it(
    project: Path, offline: None, capsys: pytest.CaptureFixture[str]
) -> None:
    root = ["--root", str(project)]
    figure = project / results.FIGURE
    assert results.main(["write", *root]) == 0
    drawn = figure.read_bytes()
    assert results.main(["check", *root]) == 0
    figure.unlink()
    assert results.main(["check", *root]) == 1
    assert "is missing" in capsys.readouterr().err
    assert results.main(["write", *root]) == 0 and figure.read_bytes() == drawn
    # a curve the figure draws changes: the table is the same, the figure is not
    write_energy_curve(RunPaths("aspirin", 200, 0, project).metrics_dir("auto", "mse") / "plots/energy/mse.csv", -4.0)
    assert results.main(["check", *root]) == 1
    assert "differs from the committed metrics" in capsys.readouterr().err


def test_check_fails_when_a_metric_changes(project: Path, offline: None) -> None:
    root = ["--root", str(project)]
    assert results.main(["write", *root]) == 0
    write_json(RunPaths("aspirin", 200, 0, project).metrics_dir("auto", "mse") / "metrics.json",
               {**arm_metrics("aspirin", "mse"), "test_energy_mae": 2.0})
    assert results.main(["check", *root]) == 1


def test_commands_report_missing_metrics(project: Path, offline: None, capsys: pytest.CaptureFixture[str]) -> None:
    gone = RunPaths("ethanol", 200, 0, project).metrics_dir("auto", "mse") / "metrics.json"
    gone.unlink()
    assert results.main(["write", "--root", str(project)]) == 2
    assert str(gone) in capsys.readouterr().err


def test_render_block_ends_with_a_newline() -> None:
    assert render_block([], "abc1234", False).endswith(".\n")


# ----------------------------------------------------------------------------------------------------
# Freshness: dvc status --json as DVC 3.67 prints it (checked on a small DVC project)

RUN = "ethanol-200-0"
PRODUCED = {"data/params_checked.txt", "data/raw/ethanol.npz", "data/splits/ethanol/n200/s0",
            "models/ethanol/n200/s0/mse.pt", "results/ethanol/n200/s0/Tauto/mse"}


def test_clean_status_is_fresh() -> None:
    result = classify_status({})
    assert result.ok and not result.changes
    assert "fresh" in result.report()


def test_changed_code_fails_naming_stage_and_file() -> None:
    status = {f"evaluate@{RUN}-auto-mse": [{"changed deps": {"src/crmse/evaluate.py": "modified"}}],
              f"evaluate@{RUN}-auto-crmse": [{"changed deps": {"src/crmse/evaluate.py": "modified"}}]}
    result = classify_status(status, produced=PRODUCED)
    assert not result.ok
    assert {(c.kind, c.path, c.status) for c in result.failures} == {("code", "src/crmse/evaluate.py", "modified")}
    report = result.report()
    assert (f"STALE code: src/crmse/evaluate.py (modified): evaluate@{RUN}-auto-mse, evaluate@{RUN}-auto-crmse"
            in report)


def test_changed_params_fail() -> None:
    status = {f"pretrain@{RUN}": [{"changed deps": {"params.yaml": {"mse": "modified", "model.cutoff": "new"}}}],
              f"audit@{RUN}-auto-mse": [{"changed deps": {"params.yaml": {"audit.n_random": "deleted"}}}]}
    result = classify_status(status, produced=PRODUCED)
    assert {(c.stage, c.kind, c.path, c.status) for c in result.failures} == {
        (f"pretrain@{RUN}", "params", "params.yaml:mse", "modified"),
        (f"pretrain@{RUN}", "params", "params.yaml:model.cutoff", "new"),
        (f"audit@{RUN}-auto-mse", "params", "params.yaml:audit.n_random", "deleted"),
    }
    # check_params depends on params.yaml as a file: any edit of it is a params change
    result = classify_status({"check_params": [{"changed deps": {"params.yaml": "modified"}}]}, produced=PRODUCED)
    assert [(c.kind, c.path) for c in result.failures] == [("params", "params.yaml")]


def test_missing_outputs_and_data_pass() -> None:
    """A fresh clone: data, models and samples are absent; committed metrics are in place."""
    status = {
        "download@ethanol": [{"changed outs": {"data/raw/ethanol.npz": "not in cache"}}],
        f"split@{RUN}": [{"changed deps": {"data/raw/ethanol.npz": "deleted"}},
                         {"changed outs": {"data/splits/ethanol/n200/s0": "deleted"}}],
        f"sample@{RUN}-auto-mse": [{"changed deps": {"models/ethanol/n200/s0/mse.pt": "deleted",
                                                     "data/splits/ethanol/n200/s0": "deleted"}},
                                   {"changed outs": {"results/ethanol/n200/s0/Tauto/mse": "deleted"}}],
        f"evaluate@{RUN}-auto-mse": [{"changed deps": {"data/splits/ethanol/n200/s0/test.npz": "deleted",
                                                       "results/ethanol/n200/s0/Tauto/mse": "deleted"}}],
    }
    result = classify_status(status, produced=PRODUCED)
    assert result.ok
    assert {c.kind for c in result.changes} == {"absent"}
    assert "4 stage(s) only miss outputs or inputs that are not in git" in result.report()
    assert classify_status(status).ok  # without dvc.lock's outputs every deleted dependency counts as absent


def test_deleted_source_fails_when_outputs_are_known() -> None:
    status = {f"evaluate@{RUN}-auto-mse": [{"changed deps": {"src/crmse/evaluate.py": "deleted"}}]}
    assert [c.kind for c in classify_status(status, produced=PRODUCED).failures] == ["code"]


def test_outputs_that_differ_and_upstream_data_that_differs_fail() -> None:
    status = {
        f"evaluate@{RUN}-auto-mse": [
            {"changed outs": {"metrics/ethanol/n200/s0/Tauto/mse/metrics.json": "modified"}}],
        f"sample@{RUN}-auto-mse": [{"changed deps": {"models/ethanol/n200/s0/mse.pt": "modified"}}],
    }
    kinds = {(c.kind, c.path) for c in classify_status(status, produced=PRODUCED).failures}
    assert kinds == {("output", "metrics/ethanol/n200/s0/Tauto/mse/metrics.json"),
                     ("data", "models/ethanol/n200/s0/mse.pt")}


def test_command_changes_and_unlocked_stages_fail_always_changed_passes() -> None:
    status = {f"posttrain@{RUN}-crmse": ["changed command"], "audit@x": ["always changed"]}
    result = classify_status(status)
    assert [(c.stage, c.kind) for c in result.failures] == [(f"posttrain@{RUN}-crmse", "command")]
    new_run = {"pretrain@benzene-200-0": [{"changed deps": {"pipelines/pretrain.py": "modified"}},
                                          {"changed outs": {"models/benzene/n200/s0/mse.pt": "deleted"}}]}
    result = classify_status(new_run, locked={f"pretrain@{RUN}"})
    assert [(c.stage, c.kind) for c in result.failures] == [("pretrain@benzene-200-0", "not locked")]
    assert "never run, or its run not committed" in result.report()


def test_stages_the_tables_do_not_show_are_ignored() -> None:
    status = {f"report@{RUN}-auto": [{"changed deps": {"src/crmse/report": "modified"}}],
              "report_index": [{"changed deps": {"pipelines/index.ipynb": "modified"}}]}
    assert classify_status(status).ok
    assert results.stage_base("dvc.yaml:evaluate@ethanol-200-0-auto-mse") == "evaluate"
    assert set(results.RESULT_STAGES) == {"check_params", "download", "split", "pretrain", "posttrain", "sample",
                                          "reference", "evaluate", "audit"}


def test_result_stages_are_the_pipeline_s_stages_minus_the_reports() -> None:
    stages = set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
    assert stages - set(results.RESULT_STAGES) == {"report", "report_index"}


def test_lock_contents(tmp_path: Path) -> None:
    assert results.lock_contents(tmp_path) == (set(), set())
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "check_params": {"cmd": "x", "outs": [{"path": "data/params_checked.txt", "md5": "0"}]},
        f"split@{RUN}": {"cmd": "y", "deps": [{"path": "data/raw/ethanol.npz"}],
                         "outs": [{"path": "data/splits/ethanol/n200/s0", "md5": "1.dir"}]},
    }}))
    assert results.lock_contents(tmp_path) == ({"check_params", f"split@{RUN}"},
                                               {"data/params_checked.txt", "data/splits/ethanol/n200/s0"})
