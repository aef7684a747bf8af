"""Index figures: the arms side by side per metric at one training size, or every metric against size.

Axes show the size of a difference honestly: every axis of an absolute metric starts at zero (fractions
span 0–1), and T_conf is drawn as the relative deviation (%) from the reference pool's T_conf.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from crmse.artifacts import temperature_folder
from crmse.report.index import DETECTOR_KEYS, FLOOR, mean_sd, metric_items, sources, t_rank, temperature_text
from crmse.report.style import CHEMICAL_ACCURACY, FLOOR_COLOR, color, label, new_figure

NCOLS = 4
AXES_NOTE = "axes start at zero (fractions span 0–1); T_conf as % deviation from the reference pool's T_conf"


def _values(d: pd.DataFrame, key: str, kind: str | None) -> pd.Series:
    """The metric column, T_conf as % deviation from the pool's."""
    if kind == "tref":
        return 100.0 * (d[key] - d["T_conf_reference"]) / d["T_conf_reference"]
    return d[key]


def _reference_line(kind: str | None, floor: float) -> tuple[float | None, str]:
    """(value, legend label) of the reference line drawn in a panel."""
    if kind == "floor" and math.isfinite(floor):
        return floor, "noise floor (two halves of the DFT pool)"
    return {"chemical": (CHEMICAL_ACCURACY, "chemical accuracy"), "one": (1.0, "DFT reference"),
            "zero": (0.0, "DFT reference"), "tref": (0.0, "reference pool's T_conf")}.get(kind, (None, ""))


def _title(name: str, unit: str, key: str) -> str:
    """Panel title, wrapped to fit a quarter of the page; ‡ marks a detector-defined metric."""
    tag = " ‡" if key in DETECTOR_KEYS else ""
    return textwrap.fill(name + tag, 26) + (f"\n({unit})" if unit else "")


def _limits(ax: Any, kind: str | None, values: list[float], axis: str) -> None:
    """Zero-based limits for absolute metrics, 0–1 for fractions, symmetric about zero for T_conf (%)."""
    v = [x for x in values if math.isfinite(x)]
    hi = max(v, default=1.0)
    if kind in ("one", "zero"):
        lim = (-0.03, 1.03)
    elif kind == "tref":
        m = max((abs(x) for x in v), default=5.0)
        lim = (-1.15 * max(m, 1.0), 1.15 * max(m, 1.0))
    else:
        lim = (0.0, 1.1 * hi if hi > 0 else 1.0)
    (ax.set_xlim if axis == "x" else ax.set_ylim)(*lim)


def _grid(n: int, height: float) -> tuple[Figure, Any]:
    nrows = math.ceil(n / NCOLS)
    fig, axes = new_figure(nrows, NCOLS, 13, height * nrows)
    for k in range(n, nrows * NCOLS):
        axes[k // NCOLS, k % NCOLS].set_axis_off()
    return fig, axes


def _figure_legend(fig: Figure, axes: Any) -> None:
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(lab, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=min(len(handles), 5),
                   frameon=False)


def fig_arms(df: pd.DataFrame, molecule: str, temperature: str) -> Figure | None:
    """At one training size: a dot plot per metric, the arms on the y axis (mean ± sd over seeds, seeds as
    faint dots), the noise floor or DFT reference as a grey line; x axes start at zero."""
    d = df[(df["molecule"] == molecule) & (df["temperature"] == temperature)]
    if d.empty:
        return None
    arms = [s for s in sources(d) if s != FLOOR]
    items = metric_items(d, molecule)
    fig, axes = _grid(len(items), 0.45 * len(arms) + 1.9)
    for k, (key, name, unit, kind) in enumerate(items):
        ax = axes[k // NCOLS, k % NCOLS]
        shown = []
        base = mean_sd(_values(d[d["source"] == arms[0]], key, kind))[0]
        for i, a in enumerate(arms):
            v = _values(d[d["source"] == a], key, kind).dropna()
            if not len(v):
                ax.text(0.02, i, "undefined", va="center", color=FLOOR_COLOR, transform=ax.get_yaxis_transform())
                continue
            mu, sd = mean_sd(v)
            ax.scatter(v, np.full(len(v), i), color=color(a), s=14, alpha=0.35, lw=0)
            ax.errorbar([mu], [i], xerr=[sd], fmt="o", ms=8, color=color(a), capsize=3, lw=1.6, label=label(a))
            if i and kind not in ("one", "zero", "tref") and base and math.isfinite(base):
                ax.annotate(f"{100 * (mu - base) / base:+.1f} %", (mu, i), xytext=(0, 7), textcoords="offset points",
                            ha="center", fontsize=8, color=color(a))
            shown += [mu + sd, *v.tolist()]
        floor = mean_sd(d.loc[d["source"] == FLOOR, key])[0] if kind == "floor" and key in d else math.nan
        ref, ref_label = _reference_line(kind, floor)
        if ref is not None:
            ax.axvline(ref, color=FLOOR_COLOR, ls="--", lw=1.5, label=ref_label)
            shown.append(ref)
        _limits(ax, kind, shown, "x")
        ax.set_yticks(range(len(arms)), [label(a) for a in arms])
        ax.tick_params(axis="y", labelleft=k % NCOLS == 0)
        ax.set_ylim(len(arms) - 0.5, -0.7)
        ax.set_title(_title(name, unit, key), fontsize=10.5)
    _figure_legend(fig, axes)
    size = int(d["size"].iloc[0])
    seeds = d["seed"].nunique()
    spread = f"mean ± sd over {seeds} seeds (faint: single seeds)" if seeds > 1 else "one seed"
    first = label(arms[0])
    fig.suptitle(f"{molecule}, T = {temperature_text(temperature)}, n_train = {size}: arms side by side, {spread}\n"
                 f"{AXES_NOTE}; % = change from {first}; ‡ defined by the training-time detector", fontsize=11.5)
    return fig


def fig_sweep(df: pd.DataFrame, molecule: str, temperature: str) -> Figure | None:
    """Every metric against training-set size, one line per arm (mean ± sd over seeds), y axes from zero."""
    d = df[(df["molecule"] == molecule) & (df["temperature"] == temperature)]
    if d.empty:
        return None
    arms = [s for s in sources(d) if s != FLOOR]
    items = metric_items(d, molecule)
    sizes = sorted(d["size"].unique())
    fig, axes = _grid(len(items), 3.3)
    for k, (key, name, unit, kind) in enumerate(items):
        ax = axes[k // NCOLS, k % NCOLS]
        shown: list[float] = []
        for a in arms:
            da = d[d["source"] == a]
            stats = [(s, *mean_sd(_values(da[da["size"] == s], key, kind))) for s in sizes]
            stats = [st for st in stats if math.isfinite(st[1])]
            if not stats:
                continue
            x, mu, sd = (np.array(v, dtype=float) for v in zip(*stats, strict=True))
            ax.errorbar(x, mu, yerr=sd, color=color(a), marker="o", ms=5, lw=1.8, capsize=3, label=label(a))
            ax.scatter(da["size"], _values(da, key, kind), color=color(a), s=10, alpha=0.35, lw=0)
            shown += (mu + sd).tolist()
        if kind == "floor" and key in d:
            df_ = d[d["source"] == FLOOR]
            fl = [(s, mean_sd(df_.loc[df_["size"] == s, key])[0]) for s in sizes]
            fl = [f for f in fl if math.isfinite(f[1])]
            if fl:
                x, y = zip(*fl, strict=True)
                ax.plot(x, y, color=FLOOR_COLOR, ls="--", lw=1.5, marker="_", ms=10, label="noise floor")
                shown += list(y)
        else:
            ref, ref_label = _reference_line(kind, math.nan)
            if ref is not None:
                ax.axhline(ref, color=FLOOR_COLOR, ls="--", lw=1.5, label=ref_label)
                shown.append(ref)
        _limits(ax, kind, shown, "y")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        ax.set_xlabel("n_train (frames)")
        ax.set_title(_title(name, unit, key), fontsize=10.5)
    _figure_legend(fig, axes)
    seeds = d.groupby("size")["seed"].nunique().max()
    spread = "mean ± sd over seeds (faint: single seeds)" if seeds > 1 else "one seed per size"
    fig.suptitle(f"{molecule}, T = {temperature_text(temperature)}: metrics against training-set size, {spread}\n"
                 f"{AXES_NOTE}; ‡ defined by the training-time detector", fontsize=11.5)
    return fig


def index_figures(df: pd.DataFrame) -> list[tuple[str, Figure, str]]:
    """(key, figure, caption) per molecule and temperature setting: the arms side by side when the setting has
    one training size (key ``arms-…``), the size sweep when it has several (``sweep-…``)."""
    out: list[tuple[str, Figure, str]] = []
    if df.empty:
        return out
    for mol in sorted(df["molecule"].unique()):
        dm = df[df["molecule"] == mol]
        for T in sorted(dm["temperature"].unique(), key=t_rank):
            dt = dm[dm["temperature"] == T]
            tag = f"{mol}-{temperature_folder(T)}"
            if dt["size"].nunique() == 1:
                fig = fig_arms(df, mol, T)
                cap = (f"{mol}, T = {temperature_text(T)}: each metric per arm, at the one training size. Grey "
                       f"dashed: noise floor or DFT reference; {AXES_NOTE}.")
                key = f"arms-{tag}"
            else:
                fig = fig_sweep(df, mol, T)
                cap = (f"{mol}, T = {temperature_text(T)}: each metric against training-set size (log axis), one "
                       f"line per arm. Grey dashed: noise floor or DFT reference; {AXES_NOTE}.")
                key = f"sweep-{tag}"
            if fig is not None:
                out.append((key, fig, cap))
    return out
