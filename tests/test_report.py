"""The report package on fixture tables in the stages' layout: loading, generated text, every figure, the index.

:func:`write_fake_run` writes what the evaluate, reference, audit, pretrain and posttrain stages write for one
run at one temperature setting (tiny, deterministic, no model): per arm metrics.json, replicas.csv,
worst_frame.json, plots/*.csv, audit.json and audit_frames.csv; the reference's metrics.json and plots; the
training metrics and logs (with the posttrain stage's fixed log columns). MSE has one replica in a spurious
state (entering at 0.05 ps, 30 kcal/mol below the DFT minimum) and one that fails; the CRMSE arms have none.
Only the last test starts a Jupyter kernel (both stage scripts).
"""

from __future__ import annotations

import base64
import csv
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.figure import Figure
from synthetic import bonds_of, collapse_methyl_h, reference_frame

from crmse import report
from crmse.artifacts import ARMS, POSTTRAINED, RunPaths
from crmse.audit import ROW_FIELDS
from crmse.contrastive import VAL_COLUMNS, ContrastiveTerm, MSETerm
from crmse.evaluate import REPLICA_COLUMNS
from crmse.holes import HoleTerm
from crmse.io import read_json, write_json
from crmse.molecules import TORSIONS
from crmse.report import display
from crmse.report.index_figures import AXES_NOTE, clear_corner
from crmse.report.run import audit_errors
from crmse.report.style import new_figure, relative_change

REPO = Path(__file__).resolve().parents[1]
MOL, SIZE, SEED = "ethanol", 20, 0
M, T_FRAMES, T_SET = 4, 12, 650.0
TIME_PS = 0.01 * np.arange(1, T_FRAMES + 1)


def params(**top: Any) -> dict[str, Any]:
    """The params keys the report reads, in the params.yaml shape (molecule overrides merged)."""
    p = {
        "molecules": [MOL], "train_sizes": [SIZE], "seeds": [SEED], "arms": list(ARMS),
        "md": {"temperatures": ["auto"], "equilibration_fs": 10.0, "dt": 0.5, "friction": 0.01},
        "evaluate": {"bond_tolerance": 0.5, "dihedral_bins": 12},
        "crmse": {"lam": 1.0, "chains": {"n": 8, "steps_per_iter": 20, "dt": 0.5},
                  "selection": {"rule": "fewest_chain_failures", "max_gap": 3.0}},
        "crmse_memory": {"projection": "fit"},
    }
    p.update(top)
    return p


def _csv(path: Path, header: list[str] | tuple[str, ...], rows: list[list[Any]] | list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        if rows and isinstance(rows[0], dict):
            w = csv.DictWriter(fh, fieldnames=list(header))
            w.writeheader()
            w.writerows(rows)
        else:
            w = csv.writer(fh)
            w.writerow(header)
            w.writerows(rows)


def _gauss(x: np.ndarray, mu: float, sd: float) -> np.ndarray:
    return np.exp(-0.5 * ((x - mu) / sd) ** 2) / (sd * np.sqrt(2 * np.pi))


def _write_curves(plots: Path, source: str, shift: float) -> None:
    r = np.linspace(0.05, 9.95, 100)
    _csv(plots / "hr" / f"{source}.csv", ["r_A", "h"], np.c_[r, _gauss(r, 2.5 + shift, 0.8)].tolist())
    e = np.linspace(-8, 8, 30)
    _csv(plots / "energy" / f"{source}.csv", ["energy_rel_kcal_mol", "density"],
         np.c_[e, _gauss(e, 3 * shift, 2.0)].tolist())
    phi = -180 + (np.arange(12) + 0.5) * 30
    for t in TORSIONS[MOL]:
        F = 1 - np.cos(np.radians(3 * phi)) + shift
        keep = np.arange(12) != 5  # one bin never visited
        _csv(plots / "dihedral" / f"{t.name}_{source}.csv", ["phi_deg", "F_kcal_mol"],
             np.c_[phi[keep], F[keep] - F[keep].min()].tolist())


def _arm_row(arm: str, k: int, scale: float, dead: bool) -> dict[str, Any]:
    spurious = arm == "mse"
    row = {
        "test_energy_mae": 0.40 * scale - 0.02 * k, "test_forces_mae": 1.41 * scale + 0.01 * k,
        "stable_fraction": 0.0 if dead else (0.75 if arm == "mse" else 1.0),
        "median_time_to_instability_ps": 0.09, "trajectory_ps": float(TIME_PS[-1]), "n_replicas": M,
        "n_valid_frames": 0 if dead else 40, "spurious_replica_fraction": 0.25 if spurious else 0.0,
        "spurious_frame_fraction": 0.17 if spurious else 0.0, "spurious_first_entry_min_ps": 0.05 if spurious else None,
        "lowest_energy_rel_dft_min": None if dead else (-30.0 if spurious else 2.0 + k),
        "min_nonbonded_distance": None if dead else (0.8 if spurious else 1.7),
        "T_set": T_SET, "T_kin": T_SET + 5 * k, "T_conf": T_SET + 10 - 5 * k, "T_conf_frames": 40,
        "T_conf_pool_laplacian": T_SET * 1.02 + k,
        "energy_w1": None if dead else 2.0 * scale / (k + 1), "energy_mean_shift": None if dead else 1.0 / (k + 1),
        "hr_mae": None if dead else 0.2 * scale / (k + 1),
    }
    for t in TORSIONS[MOL]:
        row[f"dihedral_{t.name}_rmse"] = None if dead else 0.9 * scale / (k + 1)
        row[f"dihedral_{t.name}_unvisited"] = None if dead else 0.1
    for key in ("energy_w1", "energy_mean_shift", "hr_mae", *(f"dihedral_{t.name}_rmse" for t in TORSIONS[MOL])):
        row[f"{key}_boot_sd"] = None if dead else 0.05
    return row


def _audit(arm: str, k: int, dir_: Path) -> None:
    """audit.json (one model entry) and audit_frames.csv in the audit stage's formats."""
    rng = np.random.default_rng(k)
    rows = []

    def add(kind: str, n: int, err: float, flagged: bool = False) -> None:
        for i in range(n):
            d = err + rng.normal(0, 0.1)
            rows.append({f: "" for f in ROW_FIELDS} | {
                "model": arm, "kind": kind, "replica": -1 if kind == "reference" else i, "frame": i,
                "time_ps": 0.01 * (i + 1), "spurious": flagged, "min_nonbonded_distance": 1.7,
                "model_energy": 10.0 + d, "dft_energy_aligned": 10.0, "model_minus_dft": d,
                "model_rel_dft_min": 5.0 + d - 35.0 * flagged, "dft_rel_dft_min": 5.0 + 20.0 * flagged,
                "forces_mae": 1.0, "status": "ok"})

    add("reference", 4, 0.3)
    add("random", 6, 1.0 + k)
    add("lowest", 2, 2.0)
    if arm == "mse":
        add("spurious", 1, -55.0, flagged=True)
    _csv(dir_ / "audit_frames.csv", ROW_FIELDS, rows)
    write_json(dir_ / "audit.json", {
        "settings": {"xc": "pbe", "basis": "def2-svp"}, "offset": {"n": 16, "offset": -120.0, "std": 0.3},
        "models": {arm: {"reference_energy_mae": 0.3, "random": {"n": 6, "energy_mae": 1.0 + k, "forces_mae": 1.1},
                         "spurious": {"n": int(arm == "mse"), "energy_mae": 55.0 if arm == "mse" else None,
                                      "model_rel_dft_min": {"min": -30.0}, "dft_rel_dft_min": {"min": 25.0}}}},
    })


def write_fake_run(root: Path, size: int = SIZE, seed: int = SEED, temperature: str = "auto",
                   arms: tuple[str, ...] = ARMS, audit: bool = True, dead: tuple[str, ...] = (),
                   scale: float = 1.0) -> RunPaths:
    """Every table a report of ``arms`` reads, in the stages' layout; ``dead`` arms have no valid frame."""
    paths = RunPaths(MOL, size, seed, root)
    ref_dir = paths.reference_dir(temperature)
    floor = {"energy_w1": 0.5, "energy_mean_shift": 0.2, "hr_mae": 0.05, "n_blocks": 4}
    for t in TORSIONS[MOL]:
        floor |= {f"dihedral_{t.name}_rmse": 0.3, f"dihedral_{t.name}_unvisited": 0.0}
    write_json(ref_dir / "metrics.json", {"reference": {
        "n_frames": 120, "energy_min": -97000.0, "energy_mean": -96990.0, "energy_std": 2.0, "max_bond_deviation": 0.2,
        "min_nonbonded_distance": 1.6, "spurious_distance_threshold": 1.35,
        "spurious_energy_threshold_rel_dft_min": -5.0, "dihedral_temperature": T_SET}, "noise_floor": floor})
    _write_curves(ref_dir / "plots", "reference", 0.0)
    z, R0, _ = reference_frame(MOL)
    bonds = bonds_of(z, R0)
    for k, arm in enumerate(arms):
        d = paths.metrics_dir(temperature, arm)
        is_dead = arm in dead
        write_json(d / "metrics.json", _arm_row(arm, k, scale, is_dead))
        if not is_dead:
            _write_curves(d / "plots", arm, 0.3 / (k + 1))
        x = np.linspace(-3, 3, 20)
        _csv(d / "plots/parity" / f"energy_{arm}.csv", ["dft", "model"], np.c_[x, x + 0.1 * k].tolist())
        _csv(d / "plots/parity" / f"forces_{arm}.csv", ["dft", "model"], np.c_[3 * x, 3.3 * x].tolist())
        stable = np.ones(T_FRAMES) if arm != "mse" else np.where(np.arange(T_FRAMES) >= 8, 0.75, 1.0)
        _csv(d / "plots/stability" / f"{arm}.csv", ["time_ps", "stable_fraction"],
             np.c_[TIME_PS, 0 * stable if is_dead else stable].tolist())
        rows = []
        for m in range(M):
            spur = arm == "mse" and m == 1
            rows.append([m, 0.05 if spur else np.nan, np.nan if is_dead else (-30.0 if spur else 2.0 + m),
                         np.nan if is_dead else (0.8 if spur else 1.7 + 0.01 * m),
                         0.09 if (arm == "mse" and m == 3) or is_dead else np.nan, 0.67 if spur else 0.0])
        _csv(d / "replicas.csv", REPLICA_COLUMNS, rows)
        R = collapse_methyl_h(R0) if arm == "mse" else R0
        write_json(d / "worst_frame.json", {} if is_dead else {
            "replica": 1, "time_ps": 0.05, "energy_rel_dft_min": -30.0 if arm == "mse" else 2.0,
            "z": z.tolist(), "R": R.tolist(), "bonds": bonds.tolist(), "closest_pair": [5, 6]})
        if audit and not is_dead:
            _audit(arm, k, d)
    # pretrain and posttrain stages
    epochs = np.arange(1, 31)
    _csv(paths.train_log("mse"), ["epoch", "lr", "train_loss", "val_loss", "val_energy_mae", "val_force_mae"],
         [[e, 5e-4, 50 / e, 60 / e, 2 / np.sqrt(e), 8 / np.sqrt(e)] for e in epochs])
    write_json(paths.train_metrics("mse"), {
        "epochs": 30, "best_epoch": 28, "stop_reason": "max_epochs", "device": "cpu",
        "T_conf_train_K": T_SET + 30, "T_conf_val_K": T_SET - 20, "T_conf_pool_K": T_SET, "T_auto_K": T_SET,
        "val": {"energy_mae": 0.4, "force_mae": 1.5}})
    for k, arm in enumerate(a for a in arms if a in POSTTRAINED):
        cols = ["iteration", *MSETerm.columns, *ContrastiveTerm.columns,
                *(HoleTerm.columns if arm == "crmse_memory" else ()), "grad_norm"]
        its = np.arange(1, 31)
        log = [{c: float(np.cos(i + j) + 2) for j, c in enumerate(cols)}
               | {"iteration": int(i), "blowups": float(i % 7 == 0)} for i in its]
        _csv(paths.train_log(arm), cols, log)
        _csv(paths.val_log(arm), VAL_COLUMNS,
             [{c: 1.0 for c in VAL_COLUMNS} | {"iteration": i, "val_energy_mae": 0.45 - 0.01 * j - 0.02 * k,
                                               "val_force_mae": 1.52 - 0.01 * j} for j, i in enumerate((10, 20, 30))])
        write_json(paths.train_metrics(arm), {"T_chain_K": T_SET, "selected_iteration": 20 + k,
                                              "selection": "fewest chain failures"})
    return paths


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("proj")
    write_fake_run(root)
    return root


@pytest.fixture
def run(root) -> report.RunData:
    return report.load_run(root, MOL, SIZE, SEED, "auto", params())


def _line_labels(ax) -> list[str]:
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


# ----------------------------------------------------------------------------------------------------
# Loading


def test_load_run_reads_every_arm_and_names_every_missing_input(root, run, tmp_path):
    assert run.arms == ARMS and run.posttrained == POSTTRAINED
    assert set(run.rows) == set(run.replicas) == set(run.worst) == set(ARMS)
    assert set(run.logs) == {"mse", *POSTTRAINED} and set(run.val) == set(POSTTRAINED)
    assert run.curve("reference", "hr") is not None and run.curve("mse", "dihedral", "methyl_mse") is not None
    assert run.curve("crmse", "hr", "absent") is None
    write_fake_run(tmp_path, arms=("mse",))  # one arm on disk, three declared
    with pytest.raises(report.ReportError) as err:
        report.load_run(tmp_path, MOL, SIZE, SEED, "auto", params())
    msg = str(err.value)
    for name in ("T" + "auto/crmse/metrics.json", "crmse_memory/replicas.csv", "crmse_memory/worst_frame.json",
                 "crmse_log.csv", "crmse_memory_val.csv", "crmse_metrics.json"):
        assert name in msg, name
    assert "mse/metrics.json" not in msg.replace("crmse/metrics.json", "").replace("crmse_memory/metrics.json", "")
    assert report.load_run(tmp_path, MOL, SIZE, SEED, "auto", params(arms=["mse"])).arms == ("mse",)


def test_audit_errors_split_random_and_flagged_frames(run):
    e = audit_errors(run.audit["mse"], run.audit_frames["mse"], "mse")
    assert e["random"]["n"] == 6 and e["random"]["mean"] == pytest.approx(1.0, abs=0.1) and e["random"]["sd"] > 0
    assert e["flagged"]["n"] == 1 and e["flagged"]["mean"] == pytest.approx(55.0, abs=0.5)
    assert e["reference"]["n"] == 4
    # without the per-frame table: audit.json's means, no spread
    e = audit_errors(run.audit["crmse"], None, "crmse")
    assert e["random"] == {"n": 6, "mean": 2.0, "sd": None}
    assert audit_errors({"skipped": True, "reason": "x"}, None, "mse") == {} and audit_errors(None, None, "mse") == {}


# ----------------------------------------------------------------------------------------------------
# Generated text and tables


def test_summary_names_every_arm_and_follows_the_numbers(run):
    text = report.summary_paragraph(run)
    assert "CRMSE reduced spurious-state occupancy from 1/4 (MSE) to 0/4 replicas" in text
    assert "CRMSE + memory reduced spurious-state occupancy" in text
    assert "Replicas bond-stable to the end: MSE 3/4, CRMSE 4/4, CRMSE + memory 4/4." in text
    assert "closest to the DFT reference: CRMSE + memory" in text
    assert "DFT audit" in text and " ± " in text
    run.rows["crmse"]["spurious_replica_fraction"] = 0.5
    assert "CRMSE increased spurious-state occupancy from 1/4 (MSE) to 2/4 replicas" in report.summary_paragraph(run)
    for a in ARMS:
        run.rows[a]["spurious_replica_fraction"] = 0.0
    assert "No arm entered a spurious state" in report.summary_paragraph(run)
    run.rows["crmse_memory"]["test_energy_mae"] = 1.5
    assert "only MSE and CRMSE within chemical accuracy" in report.summary_paragraph(run)


def test_temperature_sentence_compares_with_the_pool(run):
    t = report.temperature_sentence(run)
    assert f"T = {T_SET:.0f} K" in t and "like-for-like" in t and "every arm's sampler" in t and "automatically" in t
    run.rows["mse"]["T_conf_pool_laplacian"] = T_SET * 1.3
    assert "colder than the data" in report.temperature_sentence(run)


def test_metrics_table_has_a_column_per_arm_and_a_floor(run):
    df = report.metrics_table(run)
    assert list(df.columns) == ["metric", "MSE", "CRMSE", "CRMSE + memory", "noise floor / DFT reference"]
    by = df.set_index("metric")
    assert by.loc["Replicas entering a spurious state", "MSE"] == "1/4"
    assert by.loc["Energy W1 (kcal/mol)", "noise floor / DFT reference"] == "0.50"
    assert by.loc["Energy W1 (kcal/mol)", "CRMSE"] == "1.00 ± 0.05"
    assert all(isinstance(v, str) and v for v in df.iloc[:, -1])


def test_evidence_table_separates_what_the_detector_defines(run):
    df = report.evidence_table(run).set_index("metric")
    defined = df[report.text.DETECTOR_COLUMN]
    assert defined["Replicas entering a spurious state"] == "defines it"
    assert defined["Lowest energy − DFT minimum (kcal/mol)"] == "defines its flag"
    for name in ("Energy W1 (kcal/mol)", "h(r) MAE", "F(φ) RMSE, hydroxyl (kcal/mol)",
                 "Replicas bond-stable to the end", "DFT audit |E_model − E_DFT|, random sampled frames (kcal/mol)"):
        assert defined[name] == "independent", name
    audit_row = df.loc["DFT audit |E_model − E_DFT|, random sampled frames (kcal/mol)"]
    assert " ± " in audit_row["MSE"] and "(n = 6)" in audit_row["CRMSE + memory"]
    assert df.loc["DFT audit |E_model − E_DFT|, frames it flags (kcal/mol)", "CRMSE"] == "—"
    s = report.detector_sentence(run)
    assert "does not define the energy W1, h(r), F(φ), bond stability" in s
    assert "chose their checkpoint" in s and "CRMSE + memory raised the energy" in s


def test_a_skipped_or_absent_audit_is_said(run):
    assert report.audit_table(run) is not None and len(report.audit_table(run)) == 3
    run.audit = {"mse": {"skipped": True, "reason": "ethanol is not in audit.molecules"}}
    run.audit_frames = {}
    assert report.audit_table(run) is None and report.fig_audit(run) is None
    s = report.audit_sentence(run)
    assert "audit.molecules" in s and "CRMSE: no audit.json" in s
    assert "DFT audit" not in report.evidence_table(run)["metric"].str.cat()


# ----------------------------------------------------------------------------------------------------
# Figures of one report


FIGURES = ("overview", "temperatures", "spurious", "worst", "stability", "hr", "dihedrals", "parity", "training",
           "chains", "holes", "audit")


def test_every_figure_draws_every_arm(run):
    figs = {name: getattr(report, f"fig_{name}")(run) for name in FIGURES}
    assert all(isinstance(f, Figure) for f in figs.values()), [k for k, f in figs.items() if f is None]
    labels = ("MSE", "CRMSE", "CRMSE + memory")
    entry, energy = figs["overview"].axes
    assert [lab.split(":")[0] for lab in _line_labels(entry)] == list(labels)
    assert entry.get_lines()[0].get_ydata()[-1] == pytest.approx(0.25)  # MSE: 1 of 4 replicas entered
    assert {lab.split(":")[0] for lab in _line_labels(energy)} == {"DFT reference (120 frames)", *labels}
    assert [t.get_text() for t in figs["spurious"].axes[0].get_xticklabels()] == list(labels)
    assert len(figs["worst"].axes) == 3 and "SPURIOUS" in figs["worst"].axes[0].get_title()
    assert "not spurious" in figs["worst"].axes[1].get_title()
    assert len(_line_labels(figs["stability"].axes[0])) == 3
    assert len(_line_labels(figs["hr"].axes[0])) == 4 and len(_line_labels(figs["hr"].axes[1])) == 3
    assert len(figs["dihedrals"].axes) == len(TORSIONS[MOL])
    assert len(figs["parity"].axes) == 6
    assert len(figs["training"].axes) == 6 and len(figs["chains"].axes) == 6
    assert len(_line_labels(figs["chains"].axes[0])) == 2  # the two post-trained arms' gaps
    assert "projection: fit" in figs["holes"].axes[2].get_title()
    assert len(figs["audit"].axes) == 2
    png = display.figure_png(figs["overview"])
    assert png.startswith(b"\x89PNG")


def test_figures_tolerate_missing_arms_dead_arms_and_no_audit(tmp_path):
    write_fake_run(tmp_path, arms=("mse", "crmse"), audit=False, dead=("crmse",))
    run = report.load_run(tmp_path, MOL, SIZE, SEED, "auto", params(arms=["mse", "crmse"]))
    assert report.fig_holes(run) is None and report.fig_audit(run) is None  # no memory arm, no audit
    for name in FIGURES[:-3]:
        fig = getattr(report, f"fig_{name}")(run)
        assert isinstance(fig, Figure), name
    assert "no valid frame" in report.fig_worst(run).axes[1].texts[0].get_text()
    assert len(report.fig_parity(run).axes) == 4
    assert "undefined for CRMSE" in report.summary_paragraph(run)
    assert report.metrics_table(run).set_index("metric").loc["Energy W1 (kcal/mol)", "CRMSE"] == "—"
    only_mse = report.load_run(tmp_path, MOL, SIZE, SEED, "auto", params(arms=["mse"]))
    assert report.fig_chains(only_mse) is None and len(report.fig_training(only_mse).axes) == 3


def test_overview_shows_occupancy_over_time_and_energies_with_equal_curves_visible(tmp_path):
    write_fake_run(tmp_path, arms=("mse", "crmse", "crmse_memory"), dead=("crmse_memory",))
    run = report.load_run(tmp_path, MOL, SIZE, SEED, "auto", params())
    fig = report.fig_overview(run)
    entry, energy = fig.axes
    assert "occupancy over time" in entry.get_title()
    labels = _line_labels(entry)
    assert labels[0] == "MSE: 1/4 replicas entered; 17 % of frames" and labels[1].startswith("CRMSE: 0/4")
    assert labels[2] == "CRMSE + memory: 0/4 replicas entered; no valid frame"
    # CRMSE and CRMSE + memory coincide (no entry): each next arm is drawn narrower on top, so both show
    widths = [line.get_linewidth() for line in entry.get_lines()]
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 3
    assert "CRMSE + memory: no valid frame" in _line_labels(energy)  # named, though it has no samples
    widths = [line.get_linewidth() for line in energy.get_lines()[1:]]  # the arms, after the DFT reference
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == 3
    fig.draw_without_rendering()
    for ax in (entry, energy):  # legends below the axes, not over the curves
        assert ax.get_legend().get_window_extent().y1 <= ax.get_window_extent().y0


# ----------------------------------------------------------------------------------------------------
# Tables on a 1300 px page


def test_wide_tables_are_split_and_cells_wrap():
    df = pd.DataFrame({f"c{i}": [i] for i in range(30)})
    parts = display.split_columns(df, ["c0", "c1"], max_columns=12)
    assert all(len(p.columns) <= 12 and list(p.columns[:2]) == ["c0", "c1"] for p in parts)
    assert sorted({c for p in parts for c in p.columns}) == sorted(df.columns)
    page = display.table_html(df, "wide", keys=["c0"])
    assert page.count("<table") == 3 and 'id="wide-2"' in page and 'id="wide-3"' in page
    assert "white-space:normal" in page and f"max-width:{display.PAGE_WIDTH_PX - 60}px" in page
    assert display.table_html(df.iloc[:, :5], "narrow").count("<table") == 1
    # 13 columns, 3 keys: two parts of equal width, not 12 columns and a stub
    parts = display.split_columns(df.iloc[:, :13], ["c0", "c1", "c2"])
    assert [len(p.columns) for p in parts] == [8, 8]
    # cells wrap between words, never inside one ("n_tra / in") nor inside "mean ± sd" or "500 K"
    page = display.table_html(pd.DataFrame({"n_train": [20], "T": ["500 K"], "W1": ["1.00 ± 0.05"]}), "pm")
    assert "overflow-wrap:anywhere" not in page and "overflow-wrap:break-word" in page
    assert "1.00\u00a0±\u00a00.05" in page and "1.00 ± 0.05" not in page and "500\u00a0K" in page


def test_relative_change_and_zero_without_a_sign():
    assert relative_change(1.05, 1.0) == "+5.0 %" and relative_change(0.9, 1.0) == "-10.0 %"
    assert relative_change(1.0001, 1.0) == "±0.0 %"  # not "-0.0 %" or "+0.0 %"
    assert relative_change(1.0, 0.0) == "" and relative_change(float("nan"), 1.0) == ""
    assert report.fmt(-0.0, 1) == "0.0" and report.fmt(-0.001, 2) == "0.00" and report.fmt(-0.5, 1) == "-0.5"


# ----------------------------------------------------------------------------------------------------
# The index


def _index_project(root: Path, sizes: tuple[int, ...], seeds: tuple[int, ...] = (0, 1)) -> dict[str, Any]:
    for i, size in enumerate(sizes):
        for seed in seeds:
            write_fake_run(root, size=size, seed=seed, scale=1.0 / (1 + i) + 0.05 * seed)
    write_fake_run(root, size=999, seed=0)  # on disk, not declared
    return params(train_sizes=list(sizes), seeds=list(seeds))


def test_index_discovers_declared_reports_and_tabulates_every_arm(tmp_path):
    declared = _index_project(tmp_path, (SIZE,))
    keys = report.discover_runs(tmp_path, declared)
    assert [(k.size, k.seed, k.temperature, k.arms) for k in keys] == [(SIZE, 0, "auto", ARMS), (SIZE, 1, "auto", ARMS)]
    assert keys[0].report_html == f"{MOL}/n{SIZE}/s0/Tauto.html"
    assert len(report.discover_runs(tmp_path)) == 3  # every report on disk
    df = report.collect_runs(tmp_path, keys)
    assert set(df["source"]) == {*ARMS, "floor"} and df["audit_random_sd"].notna().any()
    table = report.index_table(df)
    assert len(table.columns) <= display.MAX_COLUMNS and len(table) == 2 * 4
    assert table["report"].str.contains("<a href=").sum() == 2
    assert list(table["arm"][:4]) == ["MSE", "CRMSE", "CRMSE + memory", "noise floor"]
    assert report.several_seeds(df) and not report.several_seeds(df[df["seed"] == 0])
    seeds = report.seed_table(df, MOL)
    assert list(seeds["arm"]) == ["MSE", "CRMSE", "CRMSE + memory", "noise floor"] and (seeds["seeds"] == 2).all()
    assert " ± " in seeds.iloc[0]["energy W1 (kcal/mol)"]
    page = display.table_html(seeds, "seed", keys=["T", "n_train", "arm"])
    assert all(len(re.findall(r"<th[ >]", t)) <= display.MAX_COLUMNS for t in page.split("<table")[1:])
    text = report.index_paragraph(df)
    assert "2 reports" in text and "detector-defined" in text and "energy W1 (independent)" in text
    assert text.count("\n- ") == 1  # one bullet per setting (molecule, temperature, size)


def test_index_compares_arms_at_one_size_and_sweeps_several(tmp_path):
    declared = _index_project(tmp_path / "one", (SIZE,))
    df1 = report.collect_runs(tmp_path / "one", report.discover_runs(tmp_path / "one", declared))
    figs = report.index_figures(df1)
    assert [k for k, _, _ in figs] == [f"arms-{MOL}-Tauto"]
    fig = figs[0][1]
    panels = [ax for ax in fig.axes if ax.get_visible() and ax.axison]
    names = [ax.get_title() for ax in panels]
    assert any("energy W1" in n for n in names) and any("spurious" in n and "‡" in n for n in names)
    assert [t.get_text() for t in panels[0].get_yticklabels()] == ["MSE", "CRMSE", "CRMSE + memory"]
    for ax in panels:  # arms on the y axis, the axis from zero (T_conf: about zero)
        assert list(ax.get_yticks()) == [0, 1, 2]
        lo, hi = ax.get_xlim()
        assert lo <= 0 <= hi
    w1 = next(ax for ax in panels if ax.get_title().startswith("energy W1"))
    assert any(line.get_label().startswith("noise floor") for line in w1.get_lines())
    assert AXES_NOTE in fig.get_suptitle()

    sizes = (20, 50, 200)
    df3 = report.collect_runs(tmp_path / "three",
                              report.discover_runs(tmp_path / "three", _index_project(tmp_path / "three", sizes)))
    figs = report.index_figures(df3)
    assert [k for k, _, _ in figs] == [f"sweep-{MOL}-Tauto"]
    panels = [ax for ax in figs[0][1].axes if ax.axison]
    for ax in panels:
        assert ax.get_xscale() == "log" and ax.get_ylim()[0] <= 0
    # two temperature settings: one figure each
    write_fake_run(tmp_path / "three", size=20, seed=0, temperature="500")
    declared = params(train_sizes=list(sizes), seeds=[0, 1])
    declared["md"]["temperatures"] = ["auto", 500]
    keys = report.discover_runs(tmp_path / "three", declared)
    assert keys[-1].temperature == "500" and keys[-1].report_html.endswith("/T500.html")
    figs = report.index_figures(report.collect_runs(tmp_path / "three", keys))
    assert [k for k, _, _ in figs] == [f"sweep-{MOL}-Tauto", f"arms-{MOL}-T500"]


def _gaps(fig: Figure) -> list[float]:
    """Horizontal gaps (px) between the tight boxes (tick labels included) of neighbouring panels in a row."""
    fig.draw_without_rendering()
    boxes = [ax.get_tightbbox() for ax in fig.axes if ax.axison and ax.get_visible()]
    gaps = []
    for a in boxes:
        right = [b for b in boxes if b.x0 > a.x0 and b.y0 < a.y1 and a.y0 < b.y1]
        if right:
            gaps.append(min(b.x0 for b in right) - a.x1)
    return gaps


def test_index_figures_name_references_inside_panels_and_keep_panels_apart(tmp_path):
    df = report.collect_runs(tmp_path / "one",
                             report.discover_runs(tmp_path / "one", _index_project(tmp_path / "one", (SIZE,))))
    fig = report.fig_arms(df, MOL, "auto")
    panels = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.axison}
    texts = {name: [t.get_text() for t in ax.texts] for name, ax in panels.items()}
    assert "noise floor" in texts["energy W1"] and "chem. accuracy" in texts["test energy MAE"]
    assert "DFT: all stable" in texts["bond-stable replicas"] and "pool T_conf" in texts["T_conf of the samples"]
    assert "-4.9 %" in texts["test energy MAE"]  # CRMSE vs MSE, 0.39 vs 0.41 kcal/mol
    assert not any("%" in t for t in texts["bond-stable replicas"])  # fractions read off their 0–1 axis
    (legend,) = fig.legends  # the arms only: the reference lines are named where they are drawn
    assert [t.get_text() for t in legend.get_texts()] == ["MSE", "CRMSE", "CRMSE + memory"]
    assert min(_gaps(fig)) >= 12  # tick labels of neighbouring panels never run together ("1.00.0")

    sizes = (20, 50, 200)
    df3 = report.collect_runs(tmp_path / "three",
                              report.discover_runs(tmp_path / "three", _index_project(tmp_path / "three", sizes)))
    fig = report.fig_sweep(df3, MOL, "auto")
    panels = {ax.get_title().split("\n")[0]: ax for ax in fig.axes if ax.axison}
    w1 = panels["energy W1"]
    assert "noise floor" in [t.get_text() for t in w1.texts]
    first_x = [c.lines[0].get_xdata()[0] for c in w1.containers]  # one errorbar per arm
    assert len(set(first_x)) == 3 and all(abs(x / 20 - 1) < 0.05 for x in first_x)  # side by side at n = 20
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["MSE", "CRMSE", "CRMSE + memory"]
    assert min(_gaps(fig)) >= 12


def test_clear_corner_names_a_line_where_there_is_no_data():
    fig, axes = new_figure()
    ax = axes[0, 0]
    ax.set_xlim(0, 10)
    ax.set_ylim(0, 1)
    assert clear_corner(ax, (0.5, 0.5), []) == ("right", "above")
    assert clear_corner(ax, (0.5, 0.5), [([0, 10], [0.55, 0.55])]) == ("right", "below")  # a curve just above
    crowded_right = [([9.5], [0.55]), ([9.5], [0.45])]
    assert clear_corner(ax, (0.5, 0.5), crowded_right) == ("left", "above")
    assert clear_corner(ax, (0.97, 0.97), [])[1] == "below"  # no room above a line at the top


# ----------------------------------------------------------------------------------------------------
# Stage scripts (the only test with a Jupyter kernel)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0",
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}


def _stage_project(root: Path) -> None:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p.update(molecules=[MOL], train_sizes=[SIZE], seeds=[SEED], arms=list(ARMS))
    p["md"]["temperatures"] = ["auto"]
    p["per_molecule"] = {MOL: {}}
    p["evaluate"]["dihedral_bins"] = 12
    (root / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


def _figures(page: str) -> dict[str, bytes]:
    """{figure key: PNG bytes} of every <figure id="fig-..."> with an embedded PNG."""
    found = re.findall(r'<figure id="fig-([\w-]+)"[^>]*><img alt="[^"]*"[^>]*src="data:image/png;base64,'
                       r'([A-Za-z0-9+/=]+)"', page)
    return {key: base64.b64decode(data) for key, data in found}


def test_stage_scripts_fail_fast_then_render_the_report_and_the_index(tmp_path):
    _stage_project(tmp_path)
    script = [sys.executable, str(REPO / "pipelines/report.py"), MOL, str(SIZE), str(SEED), "auto", "--no-progress"]
    out = subprocess.run(script, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert out.returncode != 0 and "missing inputs" in out.stderr
    assert "reference/metrics.json" in out.stderr and "crmse_memory_val.csv" in out.stderr
    assert not (tmp_path / "reports").exists()

    write_fake_run(tmp_path)
    out = subprocess.run(script, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    paths = RunPaths(MOL, SIZE, SEED, tmp_path)
    page = paths.report("auto", tmp_path / "reports").with_suffix(".html").read_text()
    figs = _figures(page)
    assert set(figs) == set(report.RUN_FIGURES), sorted(set(report.RUN_FIGURES) ^ set(figs))
    assert all(png.startswith(b"\x89PNG") and len(png) > 10_000 for png in figs.values())
    for table in ("evidence-table", "metrics-table", "audit-table"):
        assert f'id="{table}"' in page, table
    assert page.index('id="fig-overview"') < page.index('id="evidence-table"') < page.index('id="fig-audit"')
    assert "CRMSE + memory" in page and "report.load_run" not in page  # code hidden
    nb = read_json(paths.report("auto", tmp_path / "reports"))
    assert nb["metadata"]["papermill"]["parameters"] == {
        "molecule": MOL, "size": SIZE, "seed": SEED, "temperature": "auto", "root": "."}
    # Issue 31.3: a rerun on the same inputs gives the same bytes (no clocks, no random cell ids).
    first = {p: p.read_bytes() for p in (tmp_path / "reports").rglob("*.*")}
    out = subprocess.run(script, cwd=tmp_path, env=_env(), capture_output=True, text=True)
    assert out.returncode == 0 and {p: p.read_bytes() for p in first} == first

    out = subprocess.run([sys.executable, str(REPO / "pipelines/report_index.py"), "--no-progress"], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    index = (tmp_path / "reports/index.html").read_text()
    assert re.findall(r'<a href="([^"]+)">', index) == [f"{MOL}/n{SIZE}/s{SEED}/Tauto.html"]
    assert set(_figures(index)) == {f"arms-{MOL}-Tauto"} and 'id="runs-table"' in index
