"""The look of every report: arm names and colours, number formatting, the seaborn theme, figure helpers.

Units in labels and text: Å, kcal/mol, kcal/mol/Å, ps, K.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

#: Display names of the arms and of the reference data.
LABELS = {"reference": "DFT reference", "mse": "MSE", "crmse": "CRMSE", "crmse_memory": "CRMSE + memory",
          "floor": "noise floor"}
#: One colour per source in every figure (Okabe–Ito, colour-blind safe).
COLORS = {"reference": "#333333", "mse": "#d55e00", "crmse": "#0072b2", "crmse_memory": "#009e73"}
_SPARE = ("#cc79a7", "#e69f00", "#56b4e9", "#f0e442")
FLOOR_COLOR = "#8c8c8c"
THRESHOLD_COLOR = "#c00000"
SET_T_COLOR = "#2ca02c"
NOMINAL_MD17_K = 500.0
CHEMICAL_ACCURACY = 1.0  # kcal/mol
DPI = 100


def label(source: str) -> str:
    """Display name of an arm (or ``reference``); unknown names are shown as they are."""
    return LABELS.get(source, source)


def color(source: str) -> str:
    """Colour of an arm in every figure; unknown arms get a stable spare colour."""
    if source in COLORS:
        return COLORS[source]
    return _SPARE[sum(map(ord, source)) % len(_SPARE)]


def set_style() -> None:
    """One seaborn theme for every figure: white grid, readable fonts."""
    import seaborn as sns

    sns.set_theme(context="notebook", style="whitegrid", rc={
        "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10, "ytick.labelsize": 10,
        "legend.fontsize": 9, "legend.title_fontsize": 9, "figure.titlesize": 13, "axes.titleweight": "bold",
        "savefig.facecolor": "white",
    })


def new_figure(nrows: int = 1, ncols: int = 1, width: float = 12.0, height: float = 4.0,
               **kw: Any) -> tuple[Figure, Any]:
    """A pyplot-free figure (no global state, never auto-displayed) with an (nrows, ncols) array of axes.

    ``width`` ≤ 13 in keeps a figure within a 1300 px page at :data:`DPI`.
    """
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kw)


def legend(ax: Any, **kw: Any) -> None:
    """A legend when the axes has labelled artists."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(frameon=True, framealpha=0.9, **kw)


def log_y(ax: Any) -> None:
    """Log y axis with plain tick labels (0.5, 2, 30 rather than 5×10⁻¹)."""
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter(""))


def rolling(y: pd.Series, n: int) -> pd.Series:
    """Centred running mean over ~2 % of ``n`` points."""
    return y.rolling(max(1, n // 50), min_periods=1, center=True).mean()


def num(x: Any) -> float | None:
    """``x`` as a finite float, None for None, NaN, ±inf or non-numbers."""
    if x is None or isinstance(x, bool):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def decimals(x: float, digits: int = 3) -> int:
    """Decimals :func:`fmt` shows for ``x``: ``digits`` below 10, fewer for larger values."""
    return digits if abs(x) < 10 else max(digits - 2, 1) if abs(x) < 100 else 0


def fmt(x: Any, digits: int = 3, unit: str = "") -> str:
    """A number with ``digits`` decimals (fewer for large values), '—' when undefined."""
    if isinstance(x, int | np.integer) and not isinstance(x, bool):
        s = str(int(x))
    else:
        v = num(x)
        if v is None:
            return "—"
        s = f"{v:.{decimals(v, digits)}f}"
        if s.startswith("-") and not s.strip("-0."):  # -0.0 reads as a sign that is not there
            s = s[1:]
    return f"{s} {unit}".strip()


def fmt_pm(mean: Any, sd: Any, digits: int = 3) -> str:
    """'mean ± sd' with the sd at the mean's decimals; the mean alone when sd is undefined."""
    m, s = num(mean), num(sd)
    if m is None:
        return "—"
    return fmt(m, digits) + (f" ± {s:.{decimals(m, digits)}f}" if s is not None else "")


def count(fraction: Any, n: int) -> int | None:
    """A fraction of ``n`` replicas as a count (None when undefined)."""
    f = num(fraction)
    return None if f is None else int(round(f * n))


def relative_change(value: float, base: float) -> str:
    """'+4.9 %' for the change of ``value`` from ``base``; '±0.0 %' when it rounds to zero; '' when undefined."""
    if not (math.isfinite(value) and math.isfinite(base)) or base == 0:
        return ""
    pct = 100.0 * (value - base) / abs(base)
    return "±0.0 %" if abs(pct) < 0.05 else f"{pct:+.1f} %"
