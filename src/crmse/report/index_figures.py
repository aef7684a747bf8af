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
from crmse.report.style import CHEMICAL_ACCURACY, FLOOR_COLOR, color, label, new_figure, relative_change

NCOLS = 4
#: Offset between neighbouring arms' x positions in the size sweep, as a fraction of the (log) size range, so
#: equal values stay visible.
DODGE = 0.015
AXES_NOTE = "axes start at zero (fractions span 0–1); T_conf as % deviation from the reference pool's T_conf"
#: Short in-panel names of the reference lines (the figure legend names only the arms).
REFERENCE_TAGS = {"floor": "noise floor", "chemical": "chem. accuracy", "one": "DFT: all stable",
                  "zero": "DFT: none", "tref": "pool T_conf"}


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


TAG_STYLE = {"fontsize": 8, "color": "#555555", "bbox": {"fc": "white", "ec": "none", "alpha": 0.6, "pad": 0.3}}
#: Room a reference-line tag takes in a sweep panel (axes fractions: width, height).
TAG_BOX = (0.24, 0.12)


def _vline_reference(ax: Any, kind: str | None, value: float, label_: str) -> None:
    """The grey dashed reference line of a dot-plot panel, its short name at the panel's foot.

    Call after the limits are set (the name goes on the side of the line with more room). The line keeps
    ``label_``; the figure legend names only the arms.
    """
    ax.axvline(value, color=FLOOR_COLOR, ls="--", lw=1.5, label=label_)
    lo, hi = ax.get_xlim()
    far = hi != lo and (value - lo) / (hi - lo) > 0.6
    ax.annotate(REFERENCE_TAGS.get(kind or "", label_), (value, 0.0), xycoords=("data", "axes fraction"),
                xytext=(-3 if far else 3, 3), textcoords="offset points", ha="right" if far else "left",
                va="bottom", **TAG_STYLE)


def clear_corner(ax: Any, ends: tuple[float, float], series: list[tuple[Any, Any]]) -> tuple[str, str]:
    """Where a tag of a horizontal line through ``ends`` (its y at the left and right edge) meets the least data.

    ``series``: the (x, y) data polylines of the panel. Returns (``"right"`` | ``"left"``, ``"above"`` |
    ``"below"``); ties go to right, then above. Call after the scales and limits are set.
    """
    to_axes = ax.transData + ax.transAxes.inverted()
    pts = [np.empty((0, 2))]
    for x, y in series:
        xy = np.column_stack([np.asarray(x, float), np.asarray(y, float)])
        xy = to_axes.transform(xy[np.isfinite(xy).all(1)])
        if len(xy) > 1:  # the segments too, not only the markers
            t = np.linspace(0, 1, 25)[:, None, None]
            xy = (xy[:-1][None] * (1 - t) + xy[1:][None] * t).reshape(-1, 2)
        pts.append(xy)
    p = np.concatenate(pts)
    lo, hi = ax.get_xlim()
    best: tuple[int, str, str] | None = None
    for side_x, v in (("right", ends[1]), ("left", ends[0])):
        vy = to_axes.transform([(lo if side_x == "left" else hi, v)])[0, 1]
        x0, x1 = (1.0 - TAG_BOX[0], 1.02) if side_x == "right" else (-0.02, TAG_BOX[0])
        for side_y in ("above", "below"):
            y0, y1 = (vy - 0.02, vy + TAG_BOX[1]) if side_y == "above" else (vy - TAG_BOX[1], vy + 0.02)
            if (y1 > 1.0 and side_y == "above") or (y0 < 0.0 and side_y == "below"):
                continue
            hits = int(((p[:, 0] >= x0) & (p[:, 0] <= x1) & (p[:, 1] >= y0) & (p[:, 1] <= y1)).sum())
            if best is None or hits < best[0]:
                best = (hits, side_x, side_y)
    return (best[1], best[2]) if best else ("right", "below")


def _tag_line(ax: Any, text: str, ends: tuple[float, float], series: list[tuple[Any, Any]]) -> None:
    """Name a horizontal reference line inside the panel, in the corner beside it with the least data."""
    side_x, side_y = clear_corner(ax, ends, series)
    right = side_x == "right"
    ax.annotate(text, (1.0 if right else 0.0, ends[1] if right else ends[0]), xycoords=("axes fraction", "data"),
                xytext=(-3 if right else 3, 3 if side_y == "above" else -3), textcoords="offset points",
                ha="right" if right else "left", va="bottom" if side_y == "above" else "top", **TAG_STYLE)


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
    """A 13 in wide grid of :data:`NCOLS` panels per row, ``height`` in per row plus room for the two-line title
    and the legend; padded so neighbouring tick labels never touch."""
    nrows = math.ceil(n / NCOLS)
    fig, axes = new_figure(nrows, NCOLS, 13, height * nrows + 1.1)
    fig.get_layout_engine().set(w_pad=0.12, h_pad=0.12, wspace=0.04, hspace=0.06)
    for k in range(n, nrows * NCOLS):
        axes[k // NCOLS, k % NCOLS].set_axis_off()
    return fig, axes


def _figure_legend(fig: Figure, axes: Any, arms: list[str]) -> None:
    """One legend row of the arms below the panels (reference lines are tagged inside each panel)."""
    names = {label(a) for a in arms}
    handles: dict[str, Any] = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab in names:
                handles.setdefault(lab, h)
    if handles:
        fig.legend(handles.values(), handles.keys(), loc="outside lower center", ncols=len(handles), frameon=False)


def fig_arms(df: pd.DataFrame, molecule: str, temperature: str) -> Figure | None:
    """At one training size: a dot plot per metric, the arms on the y axis (mean ± sd over seeds, seeds as
    faint dots), the noise floor or DFT reference as a grey line; x axes start at zero."""
    d = df[(df["molecule"] == molecule) & (df["temperature"] == temperature)]
    if d.empty:
        return None
    arms = [s for s in sources(d) if s != FLOOR]
    items = metric_items(d, molecule)
    fig, axes = _grid(len(items), 0.5 * len(arms) + 1.4)
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
            change = relative_change(mu, base) if i and kind not in ("one", "zero", "tref") else ""
            if change:
                ax.annotate(change, (mu, i), xytext=(0, 7), textcoords="offset points", ha="center", fontsize=8,
                            color=color(a), bbox={"fc": "white", "ec": "none", "alpha": 0.7, "pad": 0.3})
            shown += [mu + sd, *v.tolist()]
        floor = mean_sd(d.loc[d["source"] == FLOOR, key])[0] if kind == "floor" and key in d else math.nan
        ref, ref_label = _reference_line(kind, floor)
        _limits(ax, kind, shown if ref is None else [*shown, ref], "x")
        if ref is not None:
            _vline_reference(ax, kind, ref, ref_label)
        ax.set_yticks(range(len(arms)), [label(a) for a in arms])
        ax.tick_params(axis="y", labelleft=k % NCOLS == 0)
        ax.set_ylim(len(arms) - 0.3, -0.9)  # room for the % above a dot and the reference name below
        ax.set_title(_title(name, unit, key), fontsize=10.5)
    _figure_legend(fig, axes, arms)
    size = int(d["size"].iloc[0])
    seeds = d["seed"].nunique()
    spread = f"mean ± sd over {seeds} seeds (faint: single seeds)" if seeds > 1 else "one seed"
    first = label(arms[0])
    fig.suptitle(f"{molecule}, T = {temperature_text(temperature)}, n_train = {size}: arms side by side, {spread}\n"
                 f"{AXES_NOTE}; % = change from {first}; ‡ defined by the training-time detector", fontsize=11.5)
    return fig


def fig_sweep(df: pd.DataFrame, molecule: str, temperature: str) -> Figure | None:
    """Every metric against training-set size, one line per arm (mean ± sd over seeds), y axes from zero.

    Arms are dodged slightly along x and drawn from widest (first arm) to narrowest, so equal values stay visible.
    """
    d = df[(df["molecule"] == molecule) & (df["temperature"] == temperature)]
    if d.empty:
        return None
    arms = [s for s in sources(d) if s != FLOOR]
    items = metric_items(d, molecule)
    sizes = sorted(d["size"].unique())
    fig, axes = _grid(len(items), 3.0)
    for k, (key, name, unit, kind) in enumerate(items):
        ax = axes[k // NCOLS, k % NCOLS]
        ax.set_xscale("log")
        ax.set_xlim(sizes[0] / 1.25, sizes[-1] * 1.25)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.minorticks_off()
        shown: list[float] = []
        series: list[tuple[Any, Any]] = []
        for i, a in enumerate(arms):
            da = d[d["source"] == a]
            stats = [(s, *mean_sd(_values(da[da["size"] == s], key, kind))) for s in sizes]
            stats = [st for st in stats if math.isfinite(st[1])]
            if not stats:
                continue
            x, mu, sd = (np.array(v, dtype=float) for v in zip(*stats, strict=True))
            dodge = (sizes[-1] / sizes[0]) ** (DODGE * (i - (len(arms) - 1) / 2))  # arms side by side
            under = len(arms) - 1 - i  # earlier arms drawn wider beneath: equal curves stay visible
            ax.errorbar(x * dodge, mu, yerr=sd, color=color(a), marker="o", ms=4.5 + 1.8 * under, lw=1.5 + 0.6 * under,
                        capsize=3, label=label(a))
            ax.scatter(da["size"] * dodge, _values(da, key, kind), color=color(a), s=10, alpha=0.35, lw=0)
            shown += (mu + sd).tolist()
            series.append((x * dodge, mu))
        ref: list[tuple[float, float]] = []
        ref_label = ""
        if kind == "floor" and key in d:
            df_ = d[d["source"] == FLOOR]
            ref = [(s, mean_sd(df_.loc[df_["size"] == s, key])[0]) for s in sizes]
            ref = [f for f in ref if math.isfinite(f[1])]
        else:
            value, ref_label = _reference_line(kind, math.nan)
            ref = [] if value is None else [(sizes[0] / 1.25, value), (sizes[-1] * 1.25, value)]
        _limits(ax, kind, shown + [y for _, y in ref], "y")
        if ref:
            x, y = zip(*ref, strict=True)
            if kind == "floor":
                ax.plot(x, y, color=FLOOR_COLOR, ls="--", lw=1.5, marker="_", ms=10, label="noise floor")
            else:
                ax.axhline(y[0], color=FLOOR_COLOR, ls="--", lw=1.5, label=ref_label)
            _tag_line(ax, REFERENCE_TAGS.get(kind or "", ref_label), (y[0], y[-1]), series)
        ax.set_xlabel("n_train (frames)")
        ax.set_title(_title(name, unit, key), fontsize=10.5)
    _figure_legend(fig, axes, arms)
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
                       f"dashed, named in each panel: noise floor or DFT reference; {AXES_NOTE}.")
                key = f"arms-{tag}"
            else:
                fig = fig_sweep(df, mol, T)
                cap = (f"{mol}, T = {temperature_text(T)}: each metric against training-set size (log axis), one "
                       f"line per arm. Grey dashed, named in each panel: noise floor or DFT reference; {AXES_NOTE}.")
                key = f"sweep-{tag}"
            if fig is not None:
                out.append((key, fig, cap))
    return out
