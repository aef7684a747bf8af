"""Drawing one configuration: a ball-and-stick projection, and each arm's worst (lowest-energy) frame."""

from __future__ import annotations

from typing import Any

import numpy as np
from matplotlib.figure import Figure

from crmse.report.run import RunData
from crmse.report.style import THRESHOLD_COLOR, fmt, label, new_figure, num


def symbols(z: np.ndarray) -> list[str]:
    """Chemical symbols of atomic numbers ``z``."""
    from ase.data import chemical_symbols

    return [chemical_symbols[int(a)] for a in z]


def _view(X: np.ndarray, radii: np.ndarray, e1: np.ndarray, default: np.ndarray, p: np.ndarray | None) -> np.ndarray:
    """The view direction (of ~300 on a hemisphere) where the atoms overlap least; with a highlighted pair
    direction ``p``, only views keeping ≥ 70 % of its length in the image plane."""
    k = np.arange(600) + 0.5  # Fibonacci sphere; v and −v give mirror images, keep one hemisphere
    polar, azim = np.arccos(1 - 2 * k / 600), np.pi * (1 + 5**0.5) * k
    dirs = np.stack([np.cos(azim) * np.sin(polar), np.sin(azim) * np.sin(polar), np.cos(polar)], 1)
    dirs = dirs[dirs[:, 2] >= 0]
    if p is not None:
        dirs = dirs[np.abs(dirs @ p) <= 0.7]
    iu = np.triu_indices(len(X), 1)
    best = None
    for v in (default, *dirs):  # the default first: it wins ties
        a = e1 - (e1 @ v) * v
        if np.linalg.norm(a) < 1e-6:
            continue
        a /= np.linalg.norm(a)
        Q = np.stack([X @ a, X @ np.cross(v, a)], 1)
        d = np.linalg.norm(Q[iu[0]] - Q[iu[1]], axis=-1)
        score = float((np.clip(radii[iu[0]] + radii[iu[1]] - d, 0, None) ** 2).sum())
        if best is None or score < best[0] - 1e-9:
            best = (score, v)
    return default if best is None else best[1]


def draw_molecule(ax: Any, z: np.ndarray, R: np.ndarray, bonds: np.ndarray, pair: tuple[int, int] | None = None,
                  pair_flag: bool = False) -> None:
    """Ball-and-stick projection of one frame (R in Å); ``pair`` drawn dashed with its distance (red if flagged)."""
    from ase.data import covalent_radii
    from ase.data.colors import jmol_colors
    from matplotlib.patches import Circle

    z = np.asarray(z, dtype=int)
    X = np.asarray(R, dtype=float) - np.asarray(R, dtype=float).mean(0)
    radii = 0.4 * covalent_radii[z] + 0.1
    _, _, Vt = np.linalg.svd(X, full_matrices=False)
    e1, p = Vt[0], None  # default: look along the molecule's thinnest direction
    if pair is not None:
        p = X[pair[1]] - X[pair[0]]
        p /= np.linalg.norm(p) + 1e-12
        e1 = p
    view = _view(X, radii, e1, Vt[2], p)
    e1 = e1 - (e1 @ view) * view
    e1 /= np.linalg.norm(e1)
    P = np.stack([X @ e1, X @ np.cross(view, e1), X @ view], 1)
    order = [int(k) for k in np.argsort(P[:, 2])]  # far atoms first
    if pair is not None:  # the highlighted pair always on top
        order = [k for k in order if k not in pair] + list(pair)
    for i, j in np.asarray(bonds, dtype=int).reshape(-1, 2):
        ax.plot(P[[i, j], 0], P[[i, j], 1], color="#555555", lw=3, zorder=1, solid_capstyle="round")
    for rank, i in enumerate(order):
        ax.add_patch(Circle((P[i, 0], P[i, 1]), radii[i], facecolor=jmol_colors[z[i]], edgecolor="black", lw=1,
                            zorder=2 + rank))
    if pair is not None:
        i, j = pair
        d = float(np.linalg.norm(np.asarray(R[j]) - np.asarray(R[i])))
        col = THRESHOLD_COLOR if pair_flag else "#555555"
        ax.plot(P[[i, j], 0], P[[i, j], 1], ls="--", color=col, lw=2.5, zorder=100)
        ax.annotate(f"{d:.2f} Å", 0.5 * (P[i, :2] + P[j, :2]), xytext=(0, 14), textcoords="offset points",
                    ha="center", color=col, fontsize=11, fontweight="bold", zorder=101,
                    bbox={"boxstyle": "round", "fc": "white", "ec": col, "alpha": 0.9})
    ax.set_xlim(P[:, 0].min() - 1.0, P[:, 0].max() + 1.0)
    ax.set_ylim(P[:, 1].min() - 1.0, P[:, 1].max() + 1.5)  # room for the distance label
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)


def fig_worst(run: RunData) -> Figure:
    """Each arm's lowest-energy valid frame (worst_frame.json), its closest non-bonded pair highlighted."""
    ref = run.reference
    d_thr, e_thr = num(ref.get("spurious_distance_threshold")), num(ref.get("spurious_energy_threshold_rel_dft_min"))
    n = len(run.arms)
    fig, axes = new_figure(1, n, min(4.4 * n, 13), 5.0)
    for ax, a in zip(axes[0], run.arms, strict=True):
        w = run.worst[a]
        if not w:
            ax.text(0.5, 0.5, f"{label(a)}: no valid frame", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        z, R = np.asarray(w["z"], dtype=int), np.asarray(w["R"], dtype=float)
        i, j = (int(k) for k in w["closest_pair"])
        d = float(np.linalg.norm(R[j] - R[i]))
        e = num(w.get("energy_rel_dft_min"))
        flagged = (d_thr is not None and d < d_thr) or (e is not None and e_thr is not None and e < e_thr)
        draw_molecule(ax, z, R, np.asarray(w.get("bonds", []), dtype=int), (i, j), bool(flagged))
        sym = symbols(z)
        ax.set_title(f"{label(a)}: {'SPURIOUS' if flagged else 'not spurious'}\nreplica {w.get('replica')}, "
                     f"t = {fmt(num(w.get('time_ps')), 2)} ps, E − E_DFT,min = {fmt(e, 1)} kcal/mol\n"
                     f"closest non-bonded pair {sym[i]}{i}–{sym[j]}{j}: {d:.2f} Å", fontsize=10)
    fig.suptitle(f"Lowest-energy frame per arm. DFT pool: shortest non-bonded distance "
                 f"{fmt(ref.get('min_nonbonded_distance'), 2)} Å; spurious below {fmt(d_thr, 2)} Å or "
                 f"{fmt(e_thr, 1)} kcal/mol from the DFT minimum", fontsize=11)
    return fig
