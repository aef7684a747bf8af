"""Report helpers: load one run's outputs, draw every figure and table, write generated text, render HTML.

The papermill templates ``pipelines/report.ipynb`` (one run) and ``pipelines/index.ipynb`` (all runs)
are thin: they call the functions here, so the logic is importable and tested.

One run = (molecule, training size, seed); its inputs below the repository root ``root``:

* ``metrics/<run>/metrics.json`` and ``metrics/<run>/plots/*`` (:mod:`crmse.evaluate`);
* ``metrics/<run>/audit.json`` and ``audit_frames.csv`` (:mod:`crmse.audit`; may say ``skipped``);
* ``models/<run>/{mse_log.csv, mse_metrics.json, crmse_log.csv, crmse_val.csv, crmse_metrics.json}``;
* ``results/<run>/{mse,crmse}/{samples.npz, sample.json}`` and ``data/splits/<run>/reference.npz``
  (for the per-replica spurious-state picture, with :mod:`crmse.observables`' detector).

Every number written into text here is computed from those files; nothing is hand-written.
Units: Å, kcal/mol, kcal/mol/Å, ps, K.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from crmse.io import atomic_path, read_json, run_dir
from crmse.molecules import TORSIONS, Torsion

MODELS = ("mse", "crmse")
SOURCES = ("reference", "mse", "crmse")
LABELS = {"reference": "DFT reference", "mse": "MSE", "crmse": "CRMSE"}
#: One colour per source in every figure (colour-blind safe; seaborn "colorblind" palette entries).
COLORS = {"reference": "#333333", "mse": "#d55e00", "crmse": "#0072b2"}
FLOOR_COLOR = "#8c8c8c"
NOMINAL_MD17_K = 500.0
CHEMICAL_ACCURACY = 1.0  # kcal/mol
DPI = 100

#: Figure keys of the per-run report, in order (each appears as ``<figure id="fig-<key>">`` in the HTML).
RUN_FIGURES = (
    "temperature", "spurious", "worst", "stability", "energy", "hr", "dihedral", "parity", "training", "chains",
    "hole-gradient", "audit",
)

#: What the MD17 test MAE does and does not say (a property of the data set, shown in every report).
CORRELATION_NOTE = (
    "MD17 frames are consecutive snapshots of one ab initio MD trajectory, so they are correlated in time "
    "(ethanol frames are ~40 MD steps apart, aspirin ~16). Test frames drawn at random from it sit between "
    "training frames and flatter every model: a low test MAE says little about how the model samples."
)


class ReportError(ValueError):
    """An input of the report is missing or malformed."""


# ----------------------------------------------------------------------------------------------------
# Style and output


def set_style() -> None:
    """One seaborn style for every figure: white grid, readable fonts."""
    import seaborn as sns

    sns.set_theme(
        context="notebook",
        style="whitegrid",
        rc={
            "axes.titlesize": 12,
            "axes.labelsize": 11,
            "xtick.labelsize": 10,
            "ytick.labelsize": 10,
            "legend.fontsize": 9,
            "legend.title_fontsize": 9,
            "figure.titlesize": 13,
            "axes.titleweight": "bold",
            "savefig.facecolor": "white",
        },
    )


def new_figure(
    nrows: int = 1, ncols: int = 1, width: float = 12.0, height: float = 4.0, **kw: Any
) -> tuple[Figure, Any]:
    """A pyplot-free figure (no global state, never auto-displayed) with a grid of axes."""
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    return fig, axes


def figure_png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def figure_html(fig: Figure, key: str, caption: str) -> str:
    """A ``<figure>`` with the PNG embedded as base64, alt text and caption = ``caption``."""
    data = base64.b64encode(figure_png(fig)).decode()
    cap = html.escape(caption)
    return (
        f'<figure id="fig-{html.escape(key)}" style="margin:0 0 1.5em 0">'
        f'<img alt="{cap}" style="max-width:100%;height:auto" src="data:image/png;base64,{data}"/>'
        f'<figcaption style="font-size:0.95em;color:#444;max-width:75em">{cap}</figcaption></figure>'
    )


def show(fig: Figure | None, key: str, caption: str) -> None:
    """Display a figure in the notebook (embedded PNG + caption); a note when there is nothing to draw."""
    from IPython.display import HTML, display

    if fig is None:
        display(HTML(f'<p id="fig-{html.escape(key)}-missing"><em>{html.escape(caption)}</em></p>'))
        return
    display(HTML(figure_html(fig, key, caption)))


def show_markdown(text: str) -> None:
    from IPython.display import Markdown, display

    display(Markdown(text))


def show_table(df: pd.DataFrame, table_id: str, escape: bool = True) -> None:
    from IPython.display import HTML, display

    display(HTML(table_html(df, table_id, escape)))


def table_html(df: pd.DataFrame, table_id: str, escape: bool = True) -> str:
    body = df.to_html(index=False, escape=escape, border=0, na_rep="—", classes="crmse-table")
    style = (
        "<style>table.crmse-table{border-collapse:collapse;font-size:0.95em}"
        "table.crmse-table th,table.crmse-table td{padding:3px 10px;border-bottom:1px solid #ddd;text-align:right;"
        "white-space:nowrap}"
        "table.crmse-table td:first-child,table.crmse-table th:first-child{text-align:left}</style>"
    )
    return f'{style}<div id="{html.escape(table_id)}">{body}</div>'


# ----------------------------------------------------------------------------------------------------
# Formatting


def fmt(x: Any, digits: int = 3, unit: str = "") -> str:
    """A number with ``digits`` significant-ish decimals, '—' for None/NaN."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, int | np.integer):
        s = str(int(x))
    else:
        ax = abs(float(x))
        d = digits if ax < 10 else max(digits - 2, 1) if ax < 100 else 0
        s = f"{float(x):.{d}f}"
    return f"{s} {unit}".strip()


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


# ----------------------------------------------------------------------------------------------------
# Loading one run


@dataclass
class ReplicaOccupancy:
    """Per-replica spurious-state facts of one model's samples (same detector and validity as evaluate).

    ``first_entry_ps`` (M,) NaN when the replica never enters; ``lowest_energy_rel`` (M,) the lowest model
    energy relative to the DFT minimum of the pool (kcal/mol); ``min_distance`` (M,) the shortest non-bonded
    distance (Å) over valid frames; ``worst`` the (frame, replica) of the lowest model energy.
    """

    time_ps: np.ndarray
    first_entry_ps: np.ndarray
    lowest_energy_rel: np.ndarray
    min_distance: np.ndarray
    worst: tuple[int, int] | None
    worst_R: np.ndarray | None
    worst_energy_rel: float | None
    z: np.ndarray

    @property
    def n_replicas(self) -> int:
        return len(self.first_entry_ps)

    @property
    def n_entered(self) -> int:
        return int(np.isfinite(self.first_entry_ps).sum())


@dataclass
class Detector:
    """The spurious-state detector and bond graph of a run's reference pool."""

    detector: Any  # crmse.observables.SpuriousDetector
    bonds: Any  # crmse.observables.BondReference


@dataclass
class RunData:
    """Everything the per-run report reads, loaded once."""

    root: Path
    molecule: str
    size: int
    seed: int
    rel: Path
    metrics: dict[str, Any]
    mse_metrics: dict[str, Any]
    mse_log: pd.DataFrame
    crmse_metrics: dict[str, Any]
    crmse_log: pd.DataFrame
    crmse_val: pd.DataFrame
    sample_info: dict[str, dict[str, Any]]
    params: dict[str, Any]
    audit: dict[str, Any] | None
    audit_frames: pd.DataFrame | None
    variant: str = ""  # temperature-ablation sub-folder (T<K>) of results/ and metrics/, "" = main run
    _tables: dict[str, pd.DataFrame | None] = field(default_factory=dict, repr=False)
    _occupancy: dict[str, ReplicaOccupancy] | None = field(default=None, repr=False)
    _detector: Detector | None = field(default=None, repr=False)

    @property
    def torsions(self) -> tuple[Torsion, ...]:
        return TORSIONS[self.molecule]

    @property
    def title(self) -> str:
        at = f", sampled at {self.variant[1:]} K (temperature ablation)" if self.variant else ""
        return f"{self.molecule}, n_train = {self.size}, seed {self.seed}{at}"

    @property
    def sampled(self) -> Path:
        """This run's folder below results/ and metrics/ (the ablation sub-folder for a variant)."""
        return self.rel / self.variant

    def table(self, kind: str, name: str) -> pd.DataFrame | None:
        """A plot table ``metrics/<run>/plots/<kind>/<name>.csv`` (None if absent: e.g. no valid frames)."""
        key = f"{kind}/{name}"
        if key not in self._tables:
            path = self.root / "metrics" / self.sampled / "plots" / kind / f"{name}.csv"
            self._tables[key] = pd.read_csv(path) if path.exists() else None
        return self._tables[key]

    def n_replicas(self, model: str) -> int:
        return int(self.metrics[model].get("n_replicas") or 0)

    def detector(self) -> Detector:
        """The reference pool's spurious-state detector (crmse.observables), built as evaluate builds it."""
        if self._detector is None:
            from crmse.observables import BondReference, SpuriousDetector

            ev = self.params["evaluate"]
            path = self.root / "data/splits" / self.rel / "reference.npz"
            with np.load(path) as d:
                z, R, E = d["z"], d["R"], d["E"].reshape(-1)
            bonds = BondReference.from_frames(z, R, ev["bond_factor"])
            det = SpuriousDetector.from_reference(
                z, R, E, bonds.bonds, ev["spurious_energy_margin"], ev["spurious_distance_margin"]
            )
            self._detector = Detector(det, bonds)
        return self._detector

    def occupancy(self) -> dict[str, ReplicaOccupancy]:
        """Per-replica spurious-state occupancy of each model's samples (computed once)."""
        if self._occupancy is None:
            self._occupancy = {
                m: replica_occupancy(
                    self.root / "results" / self.sampled / m / "samples.npz",
                    self.detector(),
                    self.params["evaluate"]["bond_tolerance"],
                )
                for m in MODELS
            }
        return self._occupancy


def _read_csv(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    if df.empty:
        raise ReportError(f"{path} has no rows")
    return df


def load_run(root: str | os.PathLike, molecule: str, size: int, seed: int, variant: str = "") -> RunData:
    """Load one run's inputs; raise :class:`ReportError` naming every missing required file.

    ``variant`` (``T<K>``): the temperature-ablation samples and metrics of the run (same models).
    """
    from crmse.params import load_params

    root = Path(root)
    if molecule not in TORSIONS:
        raise ReportError(f"unknown molecule {molecule!r}; known: {', '.join(sorted(TORSIONS))}")
    rel = run_dir("", molecule, size, seed)
    met, mod, res = root / "metrics" / rel / variant, root / "models" / rel, root / "results" / rel / variant
    required = [
        met / "metrics.json",
        met / "plots",
        mod / "mse_log.csv",
        mod / "mse_metrics.json",
        mod / "crmse_log.csv",
        mod / "crmse_val.csv",
        mod / "crmse_metrics.json",
        root / "data/splits" / rel / "reference.npz",
        root / "params.yaml",
        *(res / m / f for m in MODELS for f in ("samples.npz", "sample.json")),
    ]
    missing = [str(p.relative_to(root)) for p in required if not p.exists()]
    if missing:
        raise ReportError(
            f"report {molecule} n{size} s{seed}: missing inputs (run the stages before `report`): " + ", ".join(missing)
        )
    metrics = read_json(met / "metrics.json")
    for key in ("mse", "crmse", "reference", "noise_floor"):
        if key not in metrics:
            raise ReportError(f"{met / 'metrics.json'}: no section {key!r} (expected the evaluate stage's output)")
    audit, audit_frames = None, None
    if (met / "audit.json").exists():
        audit = read_json(met / "audit.json")
        if not audit.get("skipped") and (met / "audit_frames.csv").exists():
            frames = pd.read_csv(met / "audit_frames.csv")
            audit_frames = frames if not frames.empty else None
    return RunData(
        root=root,
        molecule=molecule,
        size=size,
        seed=seed,
        rel=rel,
        metrics=metrics,
        mse_metrics=read_json(mod / "mse_metrics.json"),
        mse_log=_read_csv(mod / "mse_log.csv"),
        crmse_metrics=read_json(mod / "crmse_metrics.json"),
        crmse_log=_read_csv(mod / "crmse_log.csv"),
        crmse_val=_read_csv(mod / "crmse_val.csv"),
        sample_info={m: read_json(res / m / "sample.json") for m in MODELS},
        params=load_params(root / "params.yaml", molecule=molecule),
        audit=audit,
        audit_frames=audit_frames,
        variant=variant,
    )


def replica_occupancy(samples_path: Path, det: Detector, bond_tolerance: float) -> ReplicaOccupancy:
    """Per-replica spurious-state facts of a samples.npz (frames before bond instability only, as in evaluate)."""
    from crmse.observables import first_unstable_frame, valid_mask

    with np.load(samples_path) as d:
        R, E, time_ps = d["R"], d["E"].astype(np.float64), d["time_ps"].astype(np.float64)
        uf_rec, z = d["unstable_frame"], d["z"]
    T, M = E.shape
    uf = first_unstable_frame(R, det.bonds, bond_tolerance, uf_rec)
    valid = valid_mask(uf, T) & np.isfinite(E) & np.isfinite(R).all((2, 3))
    low, close = det.detector.flags(R, E)
    spur = (low | close) & valid
    entered = spur.any(0)
    first = np.where(entered, time_ps[spur.argmax(0)], np.nan)
    E_rel = np.where(valid, E - det.detector.energy_min, np.inf)
    lowest = np.where(valid.any(0), E_rel.min(0), np.nan)
    dist = np.where(valid, det.detector.min_nonbonded_distance(R), np.inf)
    d_min = np.where(valid.any(0), dist.min(0), np.nan)
    worst = worst_R = worst_E = None
    if valid.any():
        t, m = np.unravel_index(np.argmin(E_rel), E_rel.shape)
        worst, worst_R, worst_E = (int(t), int(m)), np.asarray(R[t, m], dtype=np.float64), float(E_rel[t, m])
    return ReplicaOccupancy(time_ps, first, lowest, d_min, worst, worst_R, worst_E, np.asarray(z))


# ----------------------------------------------------------------------------------------------------
# Generated text


def _count(frac: Any, n: int) -> int | None:
    f = _num(frac)
    return None if f is None else int(round(f * n))


def _compare_sentence(name: str, unit: str, a: Any, b: Any, floor: Any, digits: int = 3) -> str:
    """'<name>: MSE a, CRMSE b <unit> (noise floor f); CRMSE is closer to / farther from the reference …'."""
    a, b, floor = _num(a), _num(b), _num(floor)
    u = f" {unit}" if unit else ""
    fl = f" (noise floor {fmt(floor, digits)})" if floor is not None else ""
    head = f"{name}: MSE {fmt(a, digits)}, CRMSE {fmt(b, digits)}{u}{fl}"
    if a is None or b is None:
        return head + "; a comparison is undefined (a model has no valid frames)."
    if b < a:
        verdict = "CRMSE is closer to the DFT reference"
    elif b > a:
        verdict = "CRMSE is farther from the DFT reference than MSE"
    else:
        verdict = "both are equally far from the DFT reference"
    if floor is not None:
        within = [LABELS[m] for m, v in (("mse", a), ("crmse", b)) if v <= floor]
        if len(within) == 2:
            verdict += ", and both are within the noise floor"
        elif within:
            verdict += f", and only {within[0]} is within the noise floor"
        else:
            verdict += ", and neither is within the noise floor"
    return f"{head}; {verdict}."


def summary_paragraph(run: RunData) -> str:
    """One short paragraph of what the numbers show, generated from metrics.json (no hand-written claims)."""
    m, c, nf = run.metrics["mse"], run.metrics["crmse"], run.metrics["noise_floor"]
    M_m, M_c = run.n_replicas("mse"), run.n_replicas("crmse")
    t_ps = _num(m.get("trajectory_ps"))
    a, b = _count(m.get("spurious_replica_fraction"), M_m), _count(c.get("spurious_replica_fraction"), M_c)
    parts = []
    span = f" over {fmt(t_ps, 1)} ps" if t_ps else ""
    if a is None or b is None:
        parts.append("Spurious-state occupancy is undefined for at least one model.")
    elif a == 0 and b == 0:
        parts.append(f"Neither model entered a spurious state (0/{M_m} and 0/{M_c} replicas{span}).")
    elif b < a:
        parts.append(f"CRMSE reduced spurious-state occupancy from {a}/{M_m} to {b}/{M_c} replicas{span}.")
    elif b > a:
        parts.append(f"CRMSE increased spurious-state occupancy from {a}/{M_m} to {b}/{M_c} replicas{span}.")
    else:
        parts.append(f"CRMSE did not change spurious-state occupancy ({a}/{M_m} replicas for both models{span}).")
    lm, lc = _num(m.get("lowest_energy_rel_dft_min")), _num(c.get("lowest_energy_rel_dft_min"))
    if lm is not None and lc is not None:
        parts.append(
            f"The lowest model energy reached, relative to the lowest DFT energy of the reference pool, was "
            f"{fmt(lm, 1)} kcal/mol for MSE and {fmt(lc, 1)} kcal/mol for CRMSE."
        )
    sm, sc = _count(m.get("stable_fraction"), M_m), _count(c.get("stable_fraction"), M_c)
    parts.append(f"Replicas bond-stable to the end: MSE {sm}/{M_m}, CRMSE {sc}/{M_c}.")
    parts.append(_compare_sentence("Energy distribution W1", "kcal/mol", m.get("energy_w1"), c.get("energy_w1"),
                                   nf.get("energy_w1"), 2))
    parts.append(_compare_sentence("h(r) MAE", "", m.get("hr_mae"), c.get("hr_mae"), nf.get("hr_mae")))
    better, names = 0, []
    for t in run.torsions:
        rm, rc = _num(m.get(f"dihedral_{t.name}_rmse")), _num(c.get(f"dihedral_{t.name}_rmse"))
        if rm is not None and rc is not None:
            names.append(t.name)
            better += rc < rm
    if names:
        parts.append(f"F(φ) RMSE is lower for CRMSE than for MSE on {better} of {len(names)} torsions.")
    em, ec = _num(m.get("test_energy_mae")), _num(c.get("test_energy_mae"))
    fm, fc = _num(m.get("test_forces_mae")), _num(c.get("test_forces_mae"))
    if None not in (em, ec, fm, fc):
        acc = [LABELS[k] for k, v in (("mse", em), ("crmse", ec)) if v <= CHEMICAL_ACCURACY]
        acc_txt = (
            "both within chemical accuracy (≤ 1 kcal/mol)" if len(acc) == 2
            else f"only {acc[0]} within chemical accuracy (≤ 1 kcal/mol)" if acc
            else "neither within chemical accuracy (≤ 1 kcal/mol)"
        )
        parts.append(
            f"Test energy MAE went from {fmt(em)} (MSE) to {fmt(ec)} kcal/mol (CRMSE), {acc_txt}; test force MAE "
            f"from {fmt(fm)} to {fmt(fc)} kcal/mol/Å ({100 * (fc - fm) / fm:+.1f} %)."
        )
    return " ".join(parts)


def run_header(run: RunData) -> str:
    """Markdown: title and what was run (from the stages' own records)."""
    mm, cm = run.mse_metrics, run.crmse_metrics
    s = {m: run.sample_info[m] for m in MODELS}
    st = s["mse"].get("settings", {})
    lines = [
        f"# crmse report: {run.title}",
        "",
        f"* **MSE pre-training:** {mm.get('epochs', '?')} epochs (best validation epoch {mm.get('best_epoch', '?')}; "
        f"{mm.get('stop_reason', '')}), {fmt(_num(mm.get('wall_s')), 0)} s on {mm.get('device', '?')}.",
        f"* **CRMSE post-training:** T_chain = {fmt(_num(cm.get('T_chain_K')), 0)} K, "
        f"{run.params['crmse']['iterations']} iterations, selected iteration {cm.get('selected_iteration', '?')} "
        f"({cm.get('selection', '')}), {fmt(_num(cm.get('wall_s')), 0)} s on {cm.get('device', '?')}.",
        f"* **Sampling:** {st.get('n_replicas', '?')} replicas × {fmt(_num(st.get('production_ps')), 1)} ps per model "
        f"(after {fmt(_num(st.get('equilibration_fs')), 0)} fs equilibration), BAOAB Langevin, dt = "
        f"{fmt(_num(st.get('dt')), 2)} fs, friction {fmt(_num(st.get('friction')), 3)} 1/fs, "
        f"T = {fmt(_num(s['mse'].get('temperature_K')), 0)} K (setting: {s['mse'].get('temperature_setting', '?')}).",
        f"* **DFT reference pool:** {run.metrics['reference'].get('n_frames')} MD17 frames not used for training or "
        "validation.",
    ]
    return "\n".join(lines)


def temperature_sentence(run: RunData) -> str:
    """ONE sentence: the temperature the comparison is made at, against the data's measured temperature."""
    T = {mm: _num(run.metrics[mm].get("T_set")) for mm in MODELS}
    setting = run.sample_info["mse"].get("temperature_setting")
    ref = _num(run.metrics["reference"].get("T_conf_mse_laplacian"))
    auto = _num(run.mse_metrics.get("T_auto_K"))
    Ts = T["mse"]
    if Ts is None:
        return "The set temperature of the samples is unknown."
    same = T["crmse"] is not None and abs(T["crmse"] - Ts) < 1e-6
    who = "both samplers" if same else f"the MSE sampler (CRMSE: {fmt(T['crmse'], 0)} K)"
    how = (
        f"set automatically to the data's configurational temperature ({fmt(auto, 0)} K, reference pool)"
        if setting == "auto" else "a fixed set temperature"
    )
    ref_txt = f"the reference pool's configurational temperature is {fmt(ref, 0)} K" if ref else (
        "the reference pool's configurational temperature is undefined"
    )
    if ref:
        rel = (Ts - ref) / ref
        verdict = (
            "so the comparison with DFT is like-for-like in temperature (within 5 %)" if abs(rel) <= 0.05
            else f"so samples run {abs(Ts - ref):.0f} K {'colder' if rel < 0 else 'hotter'} than the data and part "
            "of every distribution difference below is a temperature effect, not a model error"
        )
    else:
        verdict = "so whether the comparison is like-for-like in temperature cannot be said"
    return (
        f"All sampled observables in this report are compared at T = {fmt(Ts, 0)} K, the set temperature of "
        f"{who}, {how}; {ref_txt} (DFT forces, MSE-model Laplacian) and the nominal MD17 temperature is "
        f"{NOMINAL_MD17_K:.0f} K, {verdict}."
    )


# ----------------------------------------------------------------------------------------------------
# Metrics table


def metrics_table(run: RunData) -> pd.DataFrame:
    """Every headline number of the run: MSE, CRMSE and the noise floor (or reference value) beside it."""
    m, c, nf, ref = run.metrics["mse"], run.metrics["crmse"], run.metrics["noise_floor"], run.metrics["reference"]
    M_m, M_c = run.n_replicas("mse"), run.n_replicas("crmse")
    rows: list[tuple[str, str, str, str]] = []

    def value(sec: dict[str, Any], key: str, digits: int) -> str:
        sd = _num(sec.get(f"{key}_boot_sd"))  # sampling uncertainty: replica bootstrap (evaluate stage)
        return fmt(sec.get(key), digits) + (f" ± {fmt(sd, digits)}" if sd is not None else "")

    def add(label: str, key: str, floor: str, digits: int = 3, unit: str = "") -> None:
        rows.append((f"{label}" + (f" ({unit})" if unit else ""), value(m, key, digits), value(c, key, digits),
                     floor))

    def frac(label: str, key: str, floor: str) -> None:
        a, b = _count(m.get(key), M_m), _count(c.get(key), M_c)
        rows.append((label, f"{a}/{M_m}" if a is not None else "—", f"{b}/{M_c}" if b is not None else "—", floor))

    add("Test energy MAE", "test_energy_mae", f"chemical accuracy ≤ {CHEMICAL_ACCURACY:g}", unit="kcal/mol")
    add("Test force MAE", "test_forces_mae", "—", unit="kcal/mol/Å")
    frac("Replicas bond-stable to the end", "stable_fraction",
         f"DFT pool: max bond deviation {fmt(ref.get('max_bond_deviation'), 2)} Å "
         f"< {run.params['evaluate']['bond_tolerance']:g} Å")
    add("Median time to instability", "median_time_to_instability_ps", "—", 2, "ps")
    frac("Replicas entering a spurious state", "spurious_replica_fraction", "DFT pool: 0 by construction")
    add("Frames in spurious states", "spurious_frame_fraction", "0", 3, "fraction")
    add("Earliest spurious entry", "spurious_first_entry_min_ps", "—", 2, "ps")
    add("Lowest energy − DFT minimum", "lowest_energy_rel_dft_min",
        f"spurious below {fmt(ref.get('spurious_energy_threshold_rel_dft_min'), 1)}", 1, "kcal/mol")
    add("Shortest non-bonded distance", "min_nonbonded_distance",
        f"DFT pool {fmt(ref.get('min_nonbonded_distance'), 2)}; spurious below "
        f"{fmt(ref.get('spurious_distance_threshold'), 2)}", 2, "Å")
    add("Energy W1", "energy_w1", fmt(nf.get("energy_w1"), 2), 2, "kcal/mol")
    add("Energy mean shift", "energy_mean_shift", fmt(nf.get("energy_mean_shift"), 2), 2, "kcal/mol")
    add("h(r) MAE ∫|Δh|dr", "hr_mae", fmt(nf.get("hr_mae")), 3)
    for t in run.torsions:
        add(f"F(φ) RMSE, {t.label}", f"dihedral_{t.name}_rmse", fmt(nf.get(f"dihedral_{t.name}_rmse"), 2), 2,
            "kcal/mol")
        add(f"F(φ) unvisited reference bins, {t.name}", f"dihedral_{t.name}_unvisited",
            fmt(nf.get(f"dihedral_{t.name}_unvisited"), 2), 2, "fraction")
    add("Set temperature", "T_set", "—", 0, "K")
    add("Kinetic temperature of the samples", "T_kin", "—", 0, "K")
    add("Configurational temperature of the samples", "T_conf",
        f"DFT pool {fmt(ref.get('T_conf_mse_laplacian'), 0)} (MSE Lapl.), "
        f"{fmt(ref.get('T_conf_crmse_laplacian'), 0)} (CRMSE Lapl.)", 0, "K")
    return pd.DataFrame(rows, columns=["metric", "MSE", "CRMSE", "noise floor / DFT reference"])


def audit_table(run: RunData) -> pd.DataFrame | None:
    """Per-model DFT audit numbers (None when the audit was skipped or is absent)."""
    if run.audit is None or run.audit.get("skipped"):
        return None
    rows = []
    for name, a in run.audit.get("models", {}).items():
        rnd, sp = a.get("random", {}), a.get("spurious", {})
        rows.append({
            "model": LABELS.get(name, name),
            "random frames: E MAE vs DFT (kcal/mol)": fmt(rnd.get("energy_mae"), 2),
            "random frames: F MAE vs DFT (kcal/mol/Å)": fmt(rnd.get("forces_mae"), 2),
            "reference frames: E MAE vs DFT (floor)": fmt(a.get("reference_energy_mae"), 2),
            "spurious frames audited": sp.get("n", 0),
            "spurious: lowest model E − DFT min": fmt((sp.get("model_rel_dft_min") or {}).get("min"), 1),
            "spurious: lowest DFT E − DFT min": fmt((sp.get("dft_rel_dft_min") or {}).get("min"), 1),
        })
    return pd.DataFrame(rows) if rows else None


def audit_sentence(run: RunData) -> str:
    """What the audit section shows, or why it is absent."""
    if run.audit is None:
        return "No ab initio audit was run for this run (metrics/…/audit.json is absent)."
    if run.audit.get("skipped"):
        return f"The ab initio audit was skipped for this run: {run.audit.get('reason', 'no reason given')}."
    off = run.audit.get("offset", {})
    s = run.audit.get("settings", {})
    return (
        f"DFT single points ({s.get('xc', '?').upper()}/{s.get('basis', '?')}, PySCF) on frames each model sampled; "
        f"DFT energies are shifted onto the label scale by an offset fitted on {off.get('n', '?')} reference-pool "
        f"frames ({fmt(off.get('offset'), 1)} ± {fmt(off.get('std'), 2)} kcal/mol; the ± is the floor of every "
        "model − DFT energy comparison)."
    )


# ----------------------------------------------------------------------------------------------------
# Figures of one run


def _legend(ax: Any, **kw: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=True, framealpha=0.9, **kw)


def fig_temperatures(run: RunData) -> Figure:
    """Dot plot: T_conf of the reference pool, training and validation frames, T_kin and T_conf of each run, T_set."""
    ref, mm = run.metrics["reference"], run.metrics
    items = [
        ("DFT reference pool: T_conf (MSE Laplacian)", ref.get("T_conf_mse_laplacian"), "reference"),
        ("DFT reference pool: T_conf (CRMSE Laplacian)", ref.get("T_conf_crmse_laplacian"), "reference"),
        ("training frames: T_conf (MSE Laplacian)", run.mse_metrics.get("T_conf_train_K"), "reference"),
        ("validation frames: T_conf (MSE Laplacian)", run.mse_metrics.get("T_conf_val_K"), "reference"),
    ]
    for m in MODELS:
        items.append((f"{LABELS[m]} samples: T_kin", mm[m].get("T_kin"), m))
        items.append((f"{LABELS[m]} samples: T_conf", mm[m].get("T_conf"), m))
    fig, axes = new_figure(1, 1, 11, 0.45 * len(items) + 1.4)
    ax = axes[0, 0]
    vals = [_num(v) for _, v, _ in items]
    Ts = sorted({_num(mm[m].get("T_set")) for m in MODELS} - {None})
    # The axis spans the set and nominal temperatures and every value within a factor 2 of them; a value
    # beyond (a broken Laplacian gives absurd T_conf) is drawn at the edge with its number, not squashing the rest.
    anchor = [*Ts, NOMINAL_MD17_K]
    sane = [v for v in vals if v is not None and min(anchor) / 2 <= v <= 2 * max(anchor)]
    lo, hi = min(sane + anchor), max(sane + anchor)
    pad = max(0.08 * (hi - lo), 15.0)
    x_lo, x_hi = lo - pad, hi + 2.5 * pad
    for i, ((_label, _, src), v) in enumerate(zip(items, vals, strict=True)):
        if v is None:
            ax.text(0.01, i, "undefined", transform=ax.get_yaxis_transform(), va="center", color=FLOOR_COLOR)
            continue
        x = min(max(v, x_lo + 0.2 * pad), x_hi - 2.2 * pad)
        off = x != v
        ax.plot([x], [i], ">" if v > x else "<" if off else "o", ms=9, color=COLORS[src])
        ax.annotate(f"{v:.0f} K" + (" (off scale)" if off else ""), (x, i), xytext=(8, 0),
                    textcoords="offset points", va="center", fontsize=10)
    for k, T in enumerate(Ts):
        ax.axvline(T, color="#2ca02c", lw=2, label=f"T_set = {T:.0f} K" if k == 0 else None)
    ax.axvline(NOMINAL_MD17_K, color=FLOOR_COLOR, ls=":", lw=2, label=f"nominal MD17 {NOMINAL_MD17_K:.0f} K")
    ax.set_xlim(x_lo, x_hi)
    ax.set_yticks(range(len(items)), [label for label, _, _ in items])
    ax.invert_yaxis()
    ax.set_xlabel("temperature (K)")
    ax.set_title("Temperature audit")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def fig_spurious(run: RunData) -> Figure:
    """Spurious-state occupancy: replicas entered vs time, lowest energy and shortest distance per replica."""
    import seaborn as sns

    occ = run.occupancy()
    det = run.detector().detector
    fig, axes = new_figure(1, 3, 13, 4.2)
    ax = axes[0, 0]
    for m in MODELS:
        o = occ[m]
        entered = np.isfinite(o.first_entry_ps)[None, :] & (o.first_entry_ps[None, :] <= o.time_ps[:, None])
        ax.step(o.time_ps, entered.mean(1), where="post", color=COLORS[m], lw=2,
                label=f"{LABELS[m]}: {o.n_entered}/{o.n_replicas} replicas")
    ax.set_xlabel("simulation time t (ps)")
    ax.set_ylabel("fraction of replicas that entered")
    ax.set_ylim(-0.03, 1.03)
    ax.set_title("Entry into spurious states")
    _legend(ax, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=1)

    rows = []
    for m in MODELS:
        o = occ[m]
        for k in range(o.n_replicas):
            rows.append({"model": LABELS[m], "E": o.lowest_energy_rel[k], "d": o.min_distance[k],
                         "spurious": bool(np.isfinite(o.first_entry_ps[k]))})
    df = pd.DataFrame(rows)
    palette = {LABELS[m]: COLORS[m] for m in MODELS}
    for ax, col, thr, ylabel, title in (
        (axes[0, 1], "E", -det.energy_margin, "lowest E_model − E_DFT,min (kcal/mol)", "Lowest energy per replica"),
        (axes[0, 2], "d", det.distance_threshold, "shortest non-bonded distance (Å)", "Closest non-bonded pair"),
    ):
        sub = df[np.isfinite(df[col])]
        if len(sub):
            sns.stripplot(data=sub, x="model", y=col, hue="model", palette=palette, ax=ax, size=5, jitter=0.25,
                          alpha=0.75, legend=False, order=[LABELS[m] for m in MODELS])
        ax.axhline(thr, color="#c00000", ls="--", lw=1.5, label=f"spurious threshold ({thr:.2f})")
        if col == "E":
            ax.axhline(0, color=COLORS["reference"], lw=1, label="lowest DFT energy of the pool")
            if len(sub) and sub[col].min() < -20 * max(det.energy_margin, 1):  # a deep hole: keep the rest visible
                ax.set_yscale("symlog", linthresh=10)
        else:
            ax.axhline(det.distance_min, color=COLORS["reference"], lw=1,
                       label=f"DFT pool minimum ({det.distance_min:.2f})")
        ax.set_xlabel("")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        _legend(ax, loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=1)  # below: never over the dots
    fig.suptitle("Spurious-state occupancy (one dot per replica; frames before bond instability)")
    return fig


def draw_molecule(ax: Any, z: np.ndarray, R: np.ndarray, bonds: np.ndarray, pair: tuple[int, int] | None = None,
                  pair_flag: bool = False) -> None:
    """Ball-and-stick projection of one frame; the pair ``pair`` is drawn as a dashed line with its distance.

    The view direction is the one (of ~300 spread over a sphere) where the drawn atoms overlap least, among
    those that keep the highlighted pair at least 70 % of its length in the image plane (so a collapsed pair is
    visible, not hidden in depth).
    """
    from ase.data import covalent_radii
    from ase.data.colors import jmol_colors
    from matplotlib.patches import Circle

    X = np.asarray(R, dtype=float) - np.asarray(R, dtype=float).mean(0)
    radii = 0.4 * covalent_radii[np.asarray(z)] + 0.1
    _, _, Vt = np.linalg.svd(X, full_matrices=False)
    e1, view = Vt[0], Vt[2]  # default: look along the molecule's thinnest direction
    p = None
    if pair is not None:
        p = X[pair[1]] - X[pair[0]]
        p /= np.linalg.norm(p) + 1e-12
        e1 = p
    k = np.arange(600) + 0.5  # Fibonacci sphere; v and −v give mirror images, keep one hemisphere
    polar, azim = np.arccos(1 - 2 * k / 600), np.pi * (1 + 5**0.5) * k
    dirs = np.stack([np.cos(azim) * np.sin(polar), np.sin(azim) * np.sin(polar), np.cos(polar)], 1)
    dirs = dirs[dirs[:, 2] >= 0]
    if p is not None:
        dirs = dirs[np.abs(dirs @ p) <= 0.7]
    iu = np.triu_indices(len(X), 1)
    best = None
    for v in (view, *dirs):  # the default first: it wins ties
        a = e1 - (e1 @ v) * v
        if np.linalg.norm(a) < 1e-6:
            continue
        a /= np.linalg.norm(a)
        Q = np.stack([X @ a, X @ np.cross(v, a)], 1)
        d = np.linalg.norm(Q[iu[0]] - Q[iu[1]], axis=-1)
        score = float((np.clip(radii[iu[0]] + radii[iu[1]] - d, 0, None) ** 2).sum())
        if best is None or score < best[0] - 1e-9:
            best = (score, v)
    if best is not None:
        view = best[1]
    e1 = e1 - (e1 @ view) * view
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(view, e1)
    P = np.stack([X @ e1, X @ e2, X @ view], 1)
    order = [int(k) for k in np.argsort(P[:, 2])]  # far atoms first
    if pair is not None:  # the highlighted pair always on top
        order = [k for k in order if k not in pair] + list(pair)
    for i, j in np.asarray(bonds):
        ax.plot(P[[i, j], 0], P[[i, j], 1], color="#555555", lw=3, zorder=1, solid_capstyle="round")
    for rank, i in enumerate(order):
        ax.add_patch(Circle((P[i, 0], P[i, 1]), radii[i], facecolor=jmol_colors[z[i]], edgecolor="black", lw=1,
                            zorder=2 + rank))
    if pair is not None:
        i, j = pair
        d = float(np.linalg.norm(R[j] - R[i]))
        col = "#c00000" if pair_flag else "#555555"
        ax.plot(P[[i, j], 0], P[[i, j], 1], ls="--", color=col, lw=2.5, zorder=100)
        mid = 0.5 * (P[i, :2] + P[j, :2])
        ax.annotate(f"{d:.2f} Å", mid, xytext=(0, 14), textcoords="offset points", ha="center", color=col,
                    fontsize=11, fontweight="bold", zorder=101,
                    bbox={"boxstyle": "round", "fc": "white", "ec": col, "alpha": 0.9})
    pad = 1.0
    ax.set_xlim(P[:, 0].min() - pad, P[:, 0].max() + pad)
    ax.set_ylim(P[:, 1].min() - pad, P[:, 1].max() + pad + 0.5)  # room for the distance label
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def fig_worst(run: RunData) -> Figure:
    """The lowest-energy configuration each model sampled, its closest non-bonded pair highlighted."""
    occ = run.occupancy()
    det = run.detector()
    fig, axes = new_figure(1, 2, 11, 5.0)
    for ax, m in zip(axes[0], MODELS, strict=True):
        o = occ[m]
        if o.worst_R is None:
            ax.text(0.5, 0.5, "no valid frame", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        pairs = det.detector.pairs
        dist = np.linalg.norm(o.worst_R[pairs[:, 1]] - o.worst_R[pairs[:, 0]], axis=-1)
        k = int(np.argmin(dist))
        flagged = dist[k] < det.detector.distance_threshold or (o.worst_energy_rel or 0) < -det.detector.energy_margin
        draw_molecule(ax, o.z, o.worst_R, det.bonds.bonds, (int(pairs[k, 0]), int(pairs[k, 1])), bool(flagged))
        t, r = o.worst
        sym = _symbols(o.z)
        ax.set_title(
            f"{LABELS[m]}: lowest-energy frame ({'SPURIOUS' if flagged else 'not spurious'})\n"
            f"replica {r}, t = {o.time_ps[t]:.2f} ps, E − E_DFT,min = {o.worst_energy_rel:.1f} kcal/mol\n"
            f"closest non-bonded pair {sym[pairs[k, 0]]}{pairs[k, 0]}–{sym[pairs[k, 1]]}{pairs[k, 1]}: "
            f"{dist[k]:.2f} Å",
            fontsize=10.5,
        )
    fig.suptitle(f"Worst configuration per model\nDFT pool: shortest non-bonded distance "
                 f"{det.detector.distance_min:.2f} Å; spurious below {det.detector.distance_threshold:.2f} Å or "
                 f"{det.detector.energy_margin:g} kcal/mol below the DFT minimum", fontsize=11.5)
    return fig


def _symbols(z: np.ndarray) -> list[str]:
    from ase.data import chemical_symbols

    return [chemical_symbols[int(a)] for a in z]


def fig_stability(run: RunData) -> Figure:
    fig, axes = new_figure(1, 1, 10.5, 3.8)
    ax = axes[0, 0]
    for m in MODELS:
        df = run.table("stability", m)
        if df is None:
            continue
        n = _count(run.metrics[m].get("stable_fraction"), run.n_replicas(m))
        ax.step(df["time_ps"], df["stable_fraction"], where="post", color=COLORS[m], lw=2,
                label=f"{LABELS[m]}: {n}/{run.n_replicas(m)} stable to the end")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("simulation time t (ps)")
    ax.set_ylabel("fraction of replicas stable")
    tol = run.params["evaluate"]["bond_tolerance"]
    ax.set_title(f"Stability (a bond deviating > {tol:g} Å from its DFT mean ends a replica)")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def fig_energy(run: RunData) -> Figure:
    m, nf = run.metrics, run.metrics["noise_floor"]
    fig, axes = new_figure(1, 1, 12, 4.2)
    ax = axes[0, 0]
    for s in SOURCES:
        df = run.table("energy", s)
        if df is None:
            continue
        x, y = df["energy_rel_kcal_mol"].to_numpy(), df["density"].to_numpy()
        if s == "reference":
            ax.fill_between(x, y, step="mid", color=COLORS[s], alpha=0.18)
            label = f"{LABELS[s]} ({run.metrics['reference'].get('n_frames')} frames)"
        else:
            label = (f"{LABELS[s]}: W1 {fmt(m[s].get('energy_w1'), 2)}, shift {fmt(m[s].get('energy_mean_shift'), 2)}"
                     " kcal/mol")
        ax.step(x, y, where="mid", color=COLORS[s], lw=2, label=label)
    ax.set_xlabel("E − ⟨E_DFT⟩ of the reference pool (kcal/mol)")
    ax.set_ylabel("density (mol/kcal)")
    ax.set_title(f"Energy distributions (noise floor: W1 {fmt(nf.get('energy_w1'), 2)}, "
                 f"shift {fmt(nf.get('energy_mean_shift'), 2)} kcal/mol)")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def fig_hr(run: RunData) -> Figure:
    m, nf = run.metrics, run.metrics["noise_floor"]
    fig, axes = new_figure(2, 1, 12, 6.0, sharex=True, height_ratios=[2, 1.2])
    ax, ax_d = axes[0, 0], axes[1, 0]
    ref = run.table("hr", "reference")
    r_max = 0.0
    for s in SOURCES:
        df = run.table("hr", s)
        if df is None:
            continue
        nz = df.loc[df["h"] > 0, "r_A"]
        if len(nz):
            r_max = max(r_max, float(nz.max()))
        label = LABELS[s] if s == "reference" else f"{LABELS[s]}: MAE {fmt(m[s].get('hr_mae'))}"
        ax.plot(df["r_A"], df["h"], color=COLORS[s], lw=2 if s == "reference" else 1.6, label=label,
                ls="-" if s == "reference" else "--")
        if s != "reference" and ref is not None:
            ax_d.plot(df["r_A"], df["h"] - ref["h"], color=COLORS[s], lw=1.4, label=f"{LABELS[s]} − DFT")
    ax_d.axhline(0, color=COLORS["reference"], lw=1)
    ax.set_xlim(0, min(r_max + 0.5, 10.0) if r_max else 10.0)
    ax.set_ylabel("h(r) (1/Å)")
    ax.set_title(f"Interatomic distance distribution h(r) (noise floor MAE {fmt(nf.get('hr_mae'))})")
    ax_d.set_ylabel("Δh(r) (1/Å)")
    ax_d.set_xlabel("interatomic distance r (Å)")
    _legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _legend(ax_d, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def fig_dihedrals(run: RunData) -> Figure:
    m, nf = run.metrics, run.metrics["noise_floor"]
    ts = run.torsions
    ncols = min(len(ts), 2)
    nrows = math.ceil(len(ts) / ncols)
    fig, axes = new_figure(nrows, ncols, 12, 3.9 * nrows)
    T = _num(run.metrics["reference"].get("dihedral_temperature"))
    bins = int(run.params["evaluate"]["dihedral_bins"])
    for k, t in enumerate(ts):
        ax = axes[k // ncols, k % ncols]
        floor = _num(nf.get(f"dihedral_{t.name}_rmse"))
        for s in SOURCES:
            df = _full_grid(run.table("dihedral", f"{t.name}_{s}"), bins)
            if df is None:
                continue
            if s == "reference":
                if floor is not None:
                    ax.fill_between(df["phi_deg"], df["F_kcal_mol"] - floor, df["F_kcal_mol"] + floor,
                                    color=FLOOR_COLOR, alpha=0.25, lw=0, label=f"DFT ± noise floor ({floor:.2f})")
                ax.plot(df["phi_deg"], df["F_kcal_mol"], "-o", ms=3, color=COLORS[s], lw=2, label=LABELS[s])
            else:
                ax.plot(df["phi_deg"], df["F_kcal_mol"], "--s", ms=3, color=COLORS[s], lw=1.6,
                        label=f"{LABELS[s]}: RMSE {fmt(m[s].get(f'dihedral_{t.name}_rmse'), 2)}")
        ax.set_xlim(-180, 180)
        ax.set_xticks(range(-180, 181, 60))
        ax.set_xlabel("dihedral angle φ (degrees)")
        ax.set_ylabel("F(φ) (kcal/mol)")
        ax.set_title(f"{t.label}\nnoise floor RMSE {fmt(floor, 2)} kcal/mol", fontsize=11)
        _legend(ax, loc="upper center", ncols=2, fontsize=8)
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, -0.2), hi + 0.35 * (hi - lo))  # headroom for the legend
    for k in range(len(ts), nrows * ncols):
        axes[k // ncols, k % ncols].set_axis_off()
    fig.suptitle(f"Dihedral free energies F(φ) = −k_B T ln p(φ) at T = {fmt(T, 0)} K (min-shifted; "
                 "RMSE over bins populated in both)")
    return fig


def _full_grid(df: pd.DataFrame | None, bins: int) -> pd.DataFrame | None:
    """F(φ) on every bin centre, NaN where the source never went (so lines break instead of bridging gaps)."""
    if df is None:
        return None
    centres = -180.0 + (np.arange(bins) + 0.5) * 360.0 / bins
    k = np.clip(np.round((df["phi_deg"].to_numpy() + 180.0) * bins / 360.0 - 0.5).astype(int), 0, bins - 1)
    F = np.full(bins, np.nan)
    F[k] = df["F_kcal_mol"].to_numpy()
    return pd.DataFrame({"phi_deg": centres, "F_kcal_mol": F})


def fig_parity(run: RunData) -> Figure:
    fig, axes = new_figure(2, 2, 11, 9.5)
    for col, m in enumerate(MODELS):
        for row, (kind, key, unit) in enumerate(
            (("energy", "test_energy_mae", "kcal/mol"), ("forces", "test_forces_mae", "kcal/mol/Å"))
        ):
            ax = axes[row, col]
            df = run.table("parity", f"{kind}_{m}")
            if df is None:
                ax.set_axis_off()
                continue
            x, y = df["dft"].to_numpy(), df["model"].to_numpy()
            ax.scatter(x, y, s=5 if kind == "forces" else 9, alpha=0.35, color=COLORS[m], lw=0, rasterized=True)
            lim = [float(np.nanmin([x.min(), y.min()])), float(np.nanmax([x.max(), y.max()]))]
            ax.plot(lim, lim, color=COLORS["reference"], lw=1)
            ax.set_aspect("equal", adjustable="datalim")
            what = "E − ⟨E_DFT⟩_test" if kind == "energy" else "force component"
            ax.set_xlabel(f"DFT {what} ({unit})")
            ax.set_ylabel(f"{LABELS[m]} {what} ({unit})")
            ax.set_title(f"{LABELS[m]}, test {kind}: MAE {fmt(run.metrics[m].get(key))} {unit}", fontsize=11)
    fig.suptitle("Parity on the test split")
    return fig


def _log_y(ax: Any) -> None:
    """Log y axis with plain tick labels (0.5, 2, 30 rather than 5×10⁻¹)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter(""))


def _rolling(y: pd.Series, n: int) -> pd.Series:
    w = max(1, n // 50)
    return y.rolling(w, min_periods=1, center=True).mean()


def fig_training(run: RunData) -> Figure:
    """MSE pre-training log (per epoch) and CRMSE validation log (per evaluation)."""
    L, V = run.mse_log, run.crmse_val
    fig, axes = new_figure(2, 3, 13, 7.6)
    ax = axes[0, 0]
    ax.plot(L["epoch"], L["train_loss"], color="#999999", lw=1.2, label="train loss")
    ax.plot(L["epoch"], L["val_loss"], color=COLORS["mse"], lw=1.6, label="validation loss")
    _log_y(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss ρ_E·ΔE² + ρ_F·ΔF² (kcal/mol units)")
    ax.set_title("MSE: loss")
    _legend(ax)
    best = run.mse_metrics.get("best_epoch")
    for ax, col, unit, what in ((axes[0, 1], "val_energy_mae", "kcal/mol", "energy"),
                                (axes[0, 2], "val_force_mae", "kcal/mol/Å", "force")):
        ax.plot(L["epoch"], L[col], color="#bbbbbb", lw=0.6, label="per epoch")
        ax.plot(L["epoch"], _rolling(L[col], len(L)), color=COLORS["mse"], lw=1.8, label="running mean")
        if best is not None:
            ax.axvline(best, color=FLOOR_COLOR, ls=":", label=f"best epoch {best}")
        _log_y(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {what} MAE ({unit})")
        ax.set_title(f"MSE: validation {what} MAE")
        _legend(ax)
    ax = axes[1, 0]
    C = run.crmse_log
    ax.plot(C["iteration"], C["l_mse"], color="#bbbbbb", lw=0.6, label="L_MSE per iteration")
    ax.plot(C["iteration"], _rolling(C["l_mse"], len(C)), color=COLORS["crmse"], lw=1.8, label="running mean")
    _log_y(ax)
    ax.set_xlabel("CRMSE iteration")
    ax.set_ylabel("L_MSE on the batch (kcal/mol units)")
    ax.set_title("CRMSE: MSE term of the loss")
    _legend(ax)
    sel = run.crmse_metrics.get("selected_iteration")
    mse_val = run.mse_metrics.get("val", {})
    for ax, col, unit, what, ref in ((axes[1, 1], "val_energy_mae", "kcal/mol", "energy", mse_val.get("energy_mae")),
                                     (axes[1, 2], "val_force_mae", "kcal/mol/Å", "force", mse_val.get("force_mae"))):
        ax.plot(V["iteration"], V[col], "-o", ms=4, color=COLORS["crmse"], lw=1.6, label="CRMSE")
        if ref is not None:
            ax.axhline(ref, color=COLORS["mse"], ls="--", lw=1.4, label=f"MSE model ({ref:.3f})")
        if sel is not None:
            ax.axvline(sel, color=FLOOR_COLOR, ls=":", label=f"selected iteration {sel}")
        ax.set_xlabel("CRMSE iteration")
        ax.set_ylabel(f"validation {what} MAE ({unit})")
        ax.set_title(f"CRMSE: validation {what} MAE")
        _legend(ax)
    return fig


def fig_chains(run: RunData) -> Figure:
    """CRMSE persistent-chain diagnostics: gap, energies, losses, blow-ups/resets, spurious chains, chain age."""
    C = run.crmse_log
    it = C["iteration"]
    n = len(C)
    cp = run.params["crmse"]
    e0 = _num(run.metrics["reference"].get("energy_mean")) or 0.0
    fig, axes = new_figure(2, 3, 13, 7.6)
    ax = axes[0, 0]
    ax.plot(it, C["gap"], color="#bbbbbb", lw=0.6, label="per iteration")
    ax.plot(it, _rolling(C["gap"], n), color=COLORS["crmse"], lw=1.8, label="running mean")
    ax.axhline(0, color=COLORS["reference"], lw=1)
    mg = cp.get("max_gap")
    if mg:
        ax.axhspan(-mg, mg, color=FLOOR_COLOR, alpha=0.15, label=f"selection bound |gap| ≤ {mg:g}")
    ax.set_xlabel("CRMSE iteration")
    ax.set_ylabel("gap (kcal/mol)")
    ax.set_title("Contrastive gap ⟨E_θ⟩_data − ⟨E_θ⟩_chains")
    _legend(ax)
    ax = axes[0, 1]
    ax.plot(it, _rolling(C["e_data"] - e0, n), color=COLORS["reference"], lw=1.8, label="training batch")
    ax.plot(it, _rolling(C["e_chain"] - e0, n), color=COLORS["crmse"], lw=1.8, label="chains")
    ax.set_xlabel("CRMSE iteration")
    ax.set_ylabel("model energy − ⟨E_DFT⟩ (kcal/mol)")
    ax.set_title("Energies (running mean)")
    _legend(ax)
    ax = axes[0, 2]
    ax.plot(it, _rolling(C["l_c"], n), color=COLORS["crmse"], lw=1.8, label="L_C (running mean)")
    ax.axhline(0, color=COLORS["reference"], lw=1)
    ax.set_xlabel("CRMSE iteration")
    ax.set_ylabel("L_C = β·gap (1)")
    ax.set_title(f"Contrastive loss (λ = {cp.get('lam', float('nan')):g})")
    _legend(ax)
    ax = axes[1, 0]
    ax.plot(it, C["blowups"].cumsum(), color="#c00000", lw=1.8, label="blow-ups (chain restarted)")
    if "random_resets" in C:
        ax.plot(it, C["random_resets"].cumsum(), color=FLOOR_COLOR, lw=1.8, ls="--", label="random resets")
    ax.set_xlabel("CRMSE iteration")
    ax.set_ylabel("cumulative count")
    ax.set_title("Chain restarts")
    _legend(ax)
    ax = axes[1, 1]
    if "n_spurious" in C:
        ax.plot(it, C["n_spurious"], color="#bbbbbb", lw=0.6)
        ax.plot(it, _rolling(C["n_spurious"], n), color="#c00000", lw=1.8, label="running mean")
    if "holes_stored" in C:  # crmse.hole_memory > 0
        ax.plot(it, C["holes_stored"], color=FLOOR_COLOR, lw=1.5, ls="--", label="remembered holes")
        ax.plot(it, _rolling(C["holes_stored"] * C["holes_below_ceiling"], n), color="#7030a0", lw=1.5,
                label="… of which below the highest training energy")
    ax.set_ylim(bottom=-0.5)
    ax.set_xlabel("CRMSE iteration")
    ax.set_ylabel(f"chains in a spurious state (of {cp.get('n_chains')})")
    ax.set_title("Spurious chains")
    _legend(ax)
    ax = axes[1, 2]
    if "chain_age" in C:
        ax.plot(it, C["chain_age"] * cp.get("dt", 0.5) / 1000.0, color=COLORS["crmse"], lw=1.8)
    ax.set_xlabel("CRMSE iteration")
    ax.set_ylabel("mean chain age (ps)")
    ax.set_title("Chain persistence")
    fig.suptitle(f"CRMSE chains: {cp.get('n_chains')} persistent chains, {cp.get('steps_per_iter')} Langevin steps "
                 f"per iteration at T_chain = {fmt(_num(run.crmse_metrics.get('T_chain_K')), 0)} K")
    return fig


def fig_hole_gradient(run: RunData) -> Figure | None:
    """The remembered-hole hinge against the fit: gradient cosine and norms per iteration; None without a memory."""
    C = run.crmse_log
    if "grad_cos" not in C:
        return None
    it, n = C["iteration"], len(C)
    projected = bool(run.params["crmse"].get("hole_projection"))
    fig, axes = new_figure(1, 2, 13, 4.2)
    ax = axes[0, 0]
    ax.plot(it, C["grad_cos"], color="#bbbbbb", lw=0.6, label="per iteration")
    ax.plot(it, _rolling(C["grad_cos"], n), color=COLORS["crmse"], lw=1.8, label="running mean")
    if "grad_cos_energy" in C:  # crmse.energy_projection: the energy term's gradient, projected against too
        ax.plot(it, _rolling(C["grad_cos_energy"], n), color="#7030a0", lw=1.5, label="vs energy term ρ_E·∇MSE_E")
    ax.axhline(0, color=COLORS["reference"], lw=1)
    ax.set_ylim(-1.05, 1.05)
    ax.set_xlabel("CRMSE iteration")
    ax.set_ylabel("cos(∇L_H, ∇(L_MSE + λ·L_C))")
    ax.set_title("Hinge vs fit: < 0 means raising holes undoes the fit"
                 + (" (that part projected out)" if projected else ""))
    _legend(ax)
    ax = axes[0, 1]
    ax.plot(it, _rolling(C["grad_fit_norm"], n), color=COLORS["mse"], lw=1.8, label="fit: L_MSE + λ·L_C")
    ax.plot(it, _rolling(C["grad_hole_norm"], n), color="#7030a0", lw=1.8, label="hinge: μ·L_H")
    if "grad_norm" in C:
        ax.plot(it, _rolling(C["grad_norm"], n), color=FLOOR_COLOR, lw=1.5, ls="--", label="applied, before clipping")
    ax.set_yscale("log")
    ax.set_xlabel("CRMSE iteration")
    ax.set_ylabel("gradient norm (running mean)")
    ax.set_title("Gradient norms")
    _legend(ax)
    return fig


def fig_audit(run: RunData) -> Figure | None:
    """Model vs DFT energy on audited frames (spurious highlighted) and per-frame force errors; None if no audit."""
    df = run.audit_frames
    if df is None or run.audit is None or run.audit.get("skipped"):
        return None
    df = df[df["status"] == "ok"].copy()
    if df.empty:
        return None
    off_std = _num(run.audit.get("offset", {}).get("std"))
    fig, axes = new_figure(1, 2, 13, 5.2)
    ax = axes[0, 0]
    markers = {"reference": "o", "random": "s", "lowest": "v", "spurious": "X"}
    for m in MODELS:
        sub = df[df["model"] == m]
        for kind, mk in markers.items():
            k = sub[sub["kind"] == kind]
            if k.empty:
                continue
            ax.scatter(k["dft_rel_dft_min"], k["model_rel_dft_min"], marker=mk, s=55, color=COLORS[m], alpha=0.8,
                       edgecolor="white", lw=0.6, label=f"{LABELS[m]}, {kind}")
        sp = sub[sub["spurious"].astype(str).str.lower() == "true"]
        if not sp.empty:
            ax.scatter(sp["dft_rel_dft_min"], sp["model_rel_dft_min"], s=150, facecolor="none", edgecolor="#c00000",
                       lw=1.8, label=f"{LABELS[m]}: flagged spurious (red ring)")
    vals = np.concatenate([df["dft_rel_dft_min"].to_numpy(float), df["model_rel_dft_min"].to_numpy(float)])
    vals = vals[np.isfinite(vals)]
    lim = [float(vals.min()) - 2, float(vals.max()) + 2] if len(vals) else [-1, 1]
    ax.plot(lim, lim, color=COLORS["reference"], lw=1, label="model = DFT")
    if off_std:
        ax.fill_between(lim, [v - off_std for v in lim], [v + off_std for v in lim], color=FLOOR_COLOR, alpha=0.2,
                        lw=0, label=f"± offset spread ({off_std:.2f})")
    ax.set_xlabel("DFT energy (aligned) − lowest pool label (kcal/mol)")
    ax.set_ylabel("model energy − lowest pool label (kcal/mol)")
    ax.set_title("Ab initio audit: model vs DFT on sampled frames")
    _legend(ax, loc="upper left", fontsize=8)
    ax = axes[0, 1]
    import seaborn as sns

    sub = df[np.isfinite(df["forces_mae"].astype(float))]
    if len(sub):
        sub = sub.assign(Model=sub["model"].map(LABELS))
        order = [k for k in markers if k in set(sub["kind"])]
        sns.stripplot(data=sub, x="kind", y="forces_mae", hue="Model", dodge=True, ax=ax, size=6,
                      palette={LABELS[m]: COLORS[m] for m in MODELS}, order=order)
    ax.set_xlabel("frame kind")
    ax.set_ylabel("force MAE, model vs DFT (kcal/mol/Å)")
    ax.set_title("Per-frame force error")
    return fig


# ----------------------------------------------------------------------------------------------------
# The index: every run, and the sweep over training-set sizes

#: Headline metrics of the sweep: (key in metrics.json, label, unit, what the floor line is).
HEADLINE = (
    ("test_energy_mae", "test energy MAE", "kcal/mol", "chemical"),
    ("test_forces_mae", "test force MAE", "kcal/mol/Å", None),
    ("stable_fraction", "replicas bond-stable", "fraction", "one"),
    ("spurious_replica_fraction", "replicas entering a spurious state", "fraction", "zero"),
    ("energy_w1", "energy W1", "kcal/mol", "floor"),
    ("hr_mae", "h(r) MAE", "∫|Δh|dr", "floor"),
)


@dataclass(frozen=True)
class RunKey:
    """One run found on disk: ``rel`` = path below metrics/ (``<mol>/n<size>/s<seed>[/<variant>…]``)."""

    molecule: str
    size: int
    seed: int
    variant: str
    rel: str

    @property
    def report_html(self) -> str:
        """Report path relative to reports/ (where index.html lives)."""
        return f"{self.rel}.html"


_RUN_RE = re.compile(r"^(?P<mol>[^/]+)/n(?P<size>\d+)/s(?P<seed>\d+)(?:/(?P<variant>.+))?$")


def discover_runs(root: str | os.PathLike, declared: Mapping[str, Any] | None = None) -> list[RunKey]:
    """Every ``metrics/**/metrics.json`` below root as a :class:`RunKey`, sorted.

    ``declared`` (params.yaml as a dict): keep only runs whose molecule, size and seed are in its
    ``molecules``, ``train_sizes`` and ``seeds`` — outputs of removed sizes stay on disk but leave the index.
    Extra path levels below ``s<seed>`` become the run's ``variant`` (e.g. a temperature ablation).
    """
    base = Path(root) / "metrics"
    runs = []
    for p in sorted(base.glob("**/metrics.json")):
        rel = p.parent.relative_to(base).as_posix()
        mt = _RUN_RE.match(rel)
        if not mt:
            continue
        key = RunKey(mt["mol"], int(mt["size"]), int(mt["seed"]), mt["variant"] or "", rel)
        if declared is not None and not (
            key.molecule in declared["molecules"] and key.size in declared["train_sizes"]
            and key.seed in declared["seeds"]
        ):
            continue
        runs.append(key)
    return sorted(runs, key=lambda k: (k.molecule, k.variant, k.size, k.seed))


AUTO_GROUP = "auto T (T_conf of the data)"


def temperature_group(root: Path, key: RunKey, metrics: Mapping[str, Any]) -> str:
    """:data:`AUTO_GROUP` when the samples ran at the data's T_conf (``auto``), else 'T = <T_set> K'."""
    T = _num(metrics.get("mse", {}).get("T_set"))
    mm = root / "models" / key.rel / "mse_metrics.json"
    if not key.variant and T is not None and mm.exists():
        t_auto = _num(read_json(mm).get("T_auto_K"))
        if t_auto is not None and abs(t_auto - T) < 1e-3:
            return AUTO_GROUP
    return f"T = {T:.0f} K" if T is not None else "T unknown"


def collect_runs(root: str | os.PathLike, runs: Sequence[RunKey]) -> pd.DataFrame:
    """One row per (run, source) with every numeric metric; source ∈ mse, crmse, floor, reference.

    Columns: molecule, size, seed, variant, group (temperature/variant label for side-by-side display),
    rel, report, source, and the metric keys of metrics.json (``floor`` rows carry the noise floor).
    """
    root = Path(root)
    rows = []
    for key in runs:
        met = read_json(root / "metrics" / key.rel / "metrics.json")
        group = temperature_group(root, key, met)  # a temperature-ablation variant is told apart by its T_set
        base = {"molecule": key.molecule, "size": key.size, "seed": key.seed, "variant": key.variant,
                "group": group, "rel": key.rel, "report": key.report_html,
                "T_conf_reference": _num(met.get("reference", {}).get("T_conf_mse_laplacian"))}
        for src, sec in (("mse", "mse"), ("crmse", "crmse"), ("floor", "noise_floor")):
            vals = {k: _num(v) for k, v in met.get(sec, {}).items()}
            rows.append({**base, "source": src, **vals})
    return pd.DataFrame(rows)


def index_table(df: pd.DataFrame) -> pd.DataFrame:
    """Table of every run (HTML links in the first column): headline numbers MSE → CRMSE (floor)."""
    out = []
    for rel, g in df.groupby("rel", sort=False):
        row0 = g.iloc[0]
        by = {r["source"]: r for _, r in g.iterrows()}
        m, c, f = by.get("mse"), by.get("crmse"), by.get("floor")

        def pair(k: str, d: int = 3, m=m, c=c, f=f) -> str:
            s = f"{fmt(m.get(k) if m is not None else None, d)} → {fmt(c.get(k) if c is not None else None, d)}"
            fv = f.get(k) if f is not None else None
            return s + (f" ({fmt(fv, d)})" if fv is not None and not (isinstance(fv, float) and math.isnan(fv)) else "")

        out.append({
            "run": f'<a href="{html.escape(row0["report"])}">{html.escape(rel)}</a>',
            "n_train": int(row0["size"]), "seed": int(row0["seed"]),
            "sampling": html.escape(row0["group"]),
            "T_set (K)": fmt(m.get("T_set") if m is not None else None, 0),
            "test E MAE": pair("test_energy_mae"),
            "test F MAE": pair("test_forces_mae"),
            "stable": pair("stable_fraction", 2),
            "spurious replicas": pair("spurious_replica_fraction", 2),
            "energy W1": pair("energy_w1", 2),
            "h(r) MAE": pair("hr_mae"),
        })
    return pd.DataFrame(out)


def sweep_metrics(df: pd.DataFrame, molecule: str) -> list[tuple[str, str, str, str | None]]:
    """Headline metrics plus each torsion's F(φ) RMSE and the temperatures, for one molecule."""
    items = list(HEADLINE)
    for t in TORSIONS.get(molecule, ()):
        items.append((f"dihedral_{t.name}_rmse", f"F(φ) RMSE, {t.name}", "kcal/mol", "floor"))
    items.append(("T_conf", "T_conf of the samples", "K", "tref"))
    return [it for it in items if it[0] in df.columns]


def _agg(values: pd.Series) -> tuple[float, float]:
    v = values.dropna().to_numpy(float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def sweep_table(df: pd.DataFrame) -> pd.DataFrame:
    """Per molecule, sampling group and training size: each headline metric as MSE → CRMSE, mean ± standard
    deviation over seeds (the number of seeds in its own column), with the seed-mean noise floor."""
    out = []
    for (mol, group, size), d in df.groupby(["molecule", "group", "size"], sort=True):
        row: dict[str, Any] = {"molecule": mol, "sampling": group, "n_train": int(size), "seeds": d["seed"].nunique()}
        for key, label, _unit, floor_kind in sweep_metrics(d, mol):
            cells = []
            for src in MODELS:
                mu, sd = _agg(d.loc[d["source"] == src, key])
                digits = 2 if abs(mu) >= 10 or "fraction" in key else 3
                cells.append(fmt(mu, digits) + (f" ± {fmt(sd, digits)}" if row["seeds"] > 1 else ""))
            cell = " → ".join(cells)
            if floor_kind == "floor":
                cell += f" ({fmt(_agg(d.loc[d['source'] == 'floor', key])[0], 3)})"
            row[label] = cell
        out.append(row)
    return pd.DataFrame(out)


def fig_sweep(df: pd.DataFrame, molecule: str) -> Figure | None:
    """Every headline metric vs training-set size for MSE and CRMSE (mean ± std over seeds, seeds as dots),
    the noise floor (or reference level) as a grey line; several sampling groups are told apart by line style."""
    d = df[df["molecule"] == molecule]
    if d.empty:
        return None
    items = sweep_metrics(d, molecule)
    ncols = 4
    nrows = math.ceil(len(items) / ncols)
    fig, axes = new_figure(nrows, ncols, 15, 3.5 * nrows)
    groups = sorted(d["group"].unique())
    styles = ["-", "--", ":", "-."]
    sizes = sorted(d["size"].unique())
    for k, (key, label, unit, floor_kind) in enumerate(items):
        ax = axes[k // ncols, k % ncols]
        for gi, g in enumerate(groups):
            dg = d[d["group"] == g]
            ls = styles[gi % len(styles)]
            gl = f" [{g}]" if len(groups) > 1 else ""
            for src in MODELS:
                ds = dg[dg["source"] == src]
                stats = [(s, *_agg(ds.loc[ds["size"] == s, key])) for s in sizes if (ds["size"] == s).any()]
                if not stats:
                    continue
                x, mu, sd = (np.array(v, dtype=float) for v in zip(*stats, strict=True))
                ax.errorbar(x, mu, yerr=sd, color=COLORS[src], ls=ls, marker="o", ms=5, lw=1.8, capsize=3,
                            label=f"{LABELS[src]}{gl}")
                ax.scatter(ds["size"], ds[key], color=COLORS[src], s=10, alpha=0.35, lw=0)
            if floor_kind == "floor":
                ds = dg[dg["source"] == "floor"]
                stats = [(s, _agg(ds.loc[ds["size"] == s, key])[0]) for s in sizes if (ds["size"] == s).any()]
                if stats:
                    x, mu = zip(*stats, strict=True)
                    ax.plot(x, mu, color=FLOOR_COLOR, ls=ls, lw=1.5, marker="_", ms=10, label=f"noise floor{gl}")
            elif floor_kind == "tref" and "T_conf_reference" in dg:
                ds = dg[dg["source"] == "mse"]
                stats = [(s, _agg(ds.loc[ds["size"] == s, "T_conf_reference"])[0]) for s in sizes
                         if (ds["size"] == s).any()]
                if stats:
                    x, mu = zip(*stats, strict=True)
                    ax.plot(x, mu, color=FLOOR_COLOR, ls=ls, lw=1.5, marker="_", ms=10, label=f"DFT pool T_conf{gl}")
                Tset = [(s, _agg(ds.loc[ds["size"] == s, "T_set"])[0]) for s in sizes if (ds["size"] == s).any()]
                if Tset and "T_set" in ds:
                    x, mu = zip(*Tset, strict=True)
                    ax.plot(x, mu, color="#2ca02c", ls=ls, lw=1.2, marker="|", ms=10, label=f"T_set{gl}")
        if floor_kind == "chemical":
            ax.axhline(CHEMICAL_ACCURACY, color=FLOOR_COLOR, ls="--", lw=1.2, label="chemical accuracy")
        elif floor_kind == "one":
            ax.axhline(1.0, color=FLOOR_COLOR, ls="--", lw=1.2, label="DFT reference")
            ax.set_ylim(-0.05, 1.05)
        elif floor_kind == "zero":
            ax.axhline(0.0, color=FLOOR_COLOR, ls="--", lw=1.2, label="DFT reference")
            ax.set_ylim(-0.05, 1.05)
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("training-set size n_train (frames)")
        ax.set_ylabel(f"{label} ({unit})" if unit != "fraction" else f"{label} (fraction)", fontsize=9.5)
        ax.set_title(label, fontsize=11)
    for k in range(len(items), nrows * ncols):
        axes[k // ncols, k % ncols].set_axis_off()
    handles: dict[str, Any] = {}  # one legend for the figure: every distinct line of every panel
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(len(handles), 4),
                   frameon=False)
    n_seeds = d.groupby(["size", "group"])["seed"].nunique().max()
    spread = "mean ± standard deviation over seeds (faint dots: single seeds)" if n_seeds > 1 else "one seed per size"
    fig.suptitle(f"{molecule}: metrics vs training-set size — {spread}")
    return fig


def index_paragraph(df: pd.DataFrame) -> str:
    """Generated: what runs exist and, per molecule and size, spurious occupancy MSE → CRMSE (seed means)."""
    if df.empty:
        return "No evaluated runs were found below metrics/."
    n_runs = df["rel"].nunique()
    parts = [f"{n_runs} evaluated run{'s' if n_runs != 1 else ''}."]
    for mol, d in df.groupby("molecule"):
        for g, dg in d.groupby("group"):
            bits = []
            for size, ds in dg.groupby("size"):
                a = _agg(ds.loc[ds["source"] == "mse", "spurious_replica_fraction"])[0]
                b = _agg(ds.loc[ds["source"] == "crmse", "spurious_replica_fraction"])[0]
                bits.append(f"n_train = {size}: {fmt(a, 2)} → {fmt(b, 2)}")
            parts.append(f"{mol} [{g}]: fraction of replicas entering a spurious state, MSE → CRMSE (mean over "
                         f"seeds): " + "; ".join(bits) + ".")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------------
# Executing and rendering notebooks


@contextmanager
def kernel_environment() -> Iterator[str]:
    """A Jupyter kernel spec that runs THIS interpreter (the project's venv), whatever else is installed.

    A kernel named "python3" elsewhere on JUPYTER_PATH or in ~/.local/share/jupyter could point at another
    Python; a private spec prepended to JUPYTER_PATH for the duration cannot. Yields the kernel name.
    """
    name = "crmse-python"
    with tempfile.TemporaryDirectory(prefix="crmse-kernel-") as tmp:
        spec = Path(tmp) / "kernels" / name
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            # The kernel's own log (a warning about unencrypted local TCP, and an "error" when it is shut down
            # with SIGINT at the end) is noise in a stage's output; cell errors still fail the stage.
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}",
                     "--IPKernelApp.log_level=CRITICAL"],
            "display_name": "crmse (project venv)",
            "language": "python",
        }))
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = tmp + (os.pathsep + old if old else "")
        try:
            yield name
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old


def render_html(nb: Any, title: str) -> str:
    """Standalone HTML of an executed notebook: outputs only (code hidden), images embedded."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    return body


def _relative(path: Path, base: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), base.resolve())).as_posix()
    except ValueError:  # another drive (Windows)
        return str(path)


def execute_report(
    template: str | os.PathLike,
    out_ipynb: str | os.PathLike,
    parameters: Mapping[str, Any],
    title: str,
    cwd: str | os.PathLike = ".",
    progress: bool = True,
) -> tuple[Path, Path]:
    """Execute ``template`` with papermill, write the executed notebook and its HTML (same stem), atomically.

    Nothing is written when a cell fails (papermill's error names the cell and shows its traceback).
    Returns (ipynb path, html path).
    """
    import nbformat
    import papermill as pm

    out_ipynb = Path(out_ipynb)
    out_html = out_ipynb.with_suffix(".html")
    with kernel_environment() as kernel, tempfile.TemporaryDirectory(prefix="crmse-report-") as tmp:
        executed = Path(tmp) / out_ipynb.name
        pm.execute_notebook(
            str(template), str(executed), parameters=dict(parameters), kernel_name=kernel, cwd=str(cwd),
            progress_bar=progress, report_mode=True,
        )
        nb = nbformat.read(executed, as_version=4)
    # Open in Jupyter with the ordinary kernel name, and record paths relative to the project, not temp paths.
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"}
    pm_meta = nb.metadata.get("papermill", {})
    pm_meta["input_path"] = _relative(Path(template), Path(cwd))
    pm_meta["output_path"] = _relative(out_ipynb, Path(cwd))
    page = render_html(nb, title)
    with atomic_path(out_ipynb) as tmp_nb:
        nbformat.write(nb, tmp_nb)
    with atomic_path(out_html) as tmp_html:
        tmp_html.write_text(page, encoding="utf-8")
    return out_ipynb, out_html
