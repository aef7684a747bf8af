"""Figures of one report, every arm side by side: each function takes a :class:`RunData`, returns a Figure.

A function returns None when there is nothing to draw (e.g. no arm was audited).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from crmse.report.run import RunData, audited
from crmse.report.style import (
    COLORS,
    FLOOR_COLOR,
    NOMINAL_MD17_K,
    SET_T_COLOR,
    THRESHOLD_COLOR,
    color,
    count,
    fmt,
    label,
    legend,
    new_figure,
    num,
)


def entered_curve(run: RunData, arm: str) -> tuple[np.ndarray, np.ndarray]:
    """(time ps, fraction of the arm's replicas that entered a spurious state by then), from replicas.csv."""
    stab = run.curve(arm, "stability")
    if stab is not None and len(stab):
        t = stab["time_ps"].to_numpy(float)
    else:
        t = np.array([num(run.rows[arm].get("trajectory_ps")) or 0.0])
    t = np.concatenate([[0.0], t[t > 0]])
    first = run.replicas[arm]["first_spurious_ps"].to_numpy(float)
    entered = np.isfinite(first)[None, :] & (first[None, :] <= t[:, None])
    return t, entered.mean(1) if len(first) else np.zeros(len(t))


def draw_energy(ax, run: RunData) -> None:
    """Energy distributions of the reference pool and every arm's samples on ``ax`` (legend below the axes).

    An arm without samples (no frame before bond instability) is named in the legend, drawn as nothing. Arms
    are drawn from widest (first) to narrowest, so equal distributions stay visible.
    """
    for s in ("reference", *run.arms):
        df = run.curve(s, "energy")
        lw = 2.0 if s == "reference" else 1.6 + 1.2 * (len(run.arms) - 1 - run.arms.index(s))  # equal curves show
        if s == "reference":
            if df is None:
                continue
            x, y = df["energy_rel_kcal_mol"].to_numpy(), df["density"].to_numpy()
            ax.fill_between(x, y, step="mid", color=COLORS["reference"], alpha=0.18)
            name = f"{label(s)} ({run.reference.get('n_frames')} frames)"
            ax.step(x, y, where="mid", color=color(s), lw=2, label=name)
        elif df is None:
            ax.plot([], [], color=color(s), lw=lw, label=f"{label(s)}: no valid frame")
        else:
            ax.step(df["energy_rel_kcal_mol"].to_numpy(), df["density"].to_numpy(), where="mid", color=color(s), lw=lw,
                    label=f"{label(s)}: W1 {fmt(run.rows[s].get('energy_w1'), 2)}")
    nf = run.noise_floor
    ax.set_xlabel("E − ⟨E_DFT⟩ of the reference pool (kcal/mol)")
    ax.set_ylabel("density (mol/kcal)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Energy distributions (noise floor W1 {fmt(nf.get('energy_w1'), 2)} kcal/mol)")
    legend(ax, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=2, fontsize=9)


def fig_overview(run: RunData) -> Figure:
    """The page's opening figure: spurious-state occupancy over time per arm, and the energy distributions.

    Left: the fraction of each arm's replicas that have entered a spurious state by time t; the legend gives
    the count and the fraction of frames spent in spurious states. Arms with equal curves stay visible: the
    first arm is drawn widest, each next one narrower on top.
    """
    fig, axes = new_figure(1, 2, 13, 5.0)
    ax = axes[0, 0]
    n_arms = len(run.arms)
    for i, a in enumerate(run.arms):
        t, frac = entered_curve(run, a)
        n, k = run.n_replicas(a), int(np.isfinite(run.replicas[a]["first_spurious_ps"].to_numpy(float)).sum())
        frames = num(run.rows[a].get("spurious_frame_fraction"))
        occ = f"; {100 * frames:.0f} % of frames" if frames is not None else ""
        if num(run.rows[a].get("n_valid_frames")) == 0:  # a fraction of no frames says nothing
            occ = "; no valid frame"
        ax.step(t, frac, where="post", color=color(a), lw=1.8 + 1.6 * (n_arms - 1 - i),
                label=f"{label(a)}: {k}/{n} replicas entered{occ}")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlim(left=0)
    ax.set_xlabel("simulation time t (ps)")
    ax.set_ylabel("fraction of replicas that entered")
    ax.set_title("Spurious-state occupancy over time (training-time detector)")
    legend(ax, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncols=1, fontsize=9)
    draw_energy(axes[0, 1], run)
    return fig


def fig_temperatures(run: RunData) -> Figure:
    """Dot plot: T_conf of the reference pool, training and validation frames, T_kin and T_conf per arm, T_set."""
    mm = run.train["mse"]
    items = [(f"DFT reference pool: T_conf ({label(a)} Laplacian)", run.rows[a].get("T_conf_pool_laplacian"),
              "reference") for a in run.arms]
    if "mse" not in run.arms:
        items.insert(0, ("DFT reference pool: T_conf (MSE Laplacian)", mm.get("T_conf_pool_K"), "reference"))
    items += [("training frames: T_conf (MSE Laplacian)", mm.get("T_conf_train_K"), "reference"),
              ("validation frames: T_conf (MSE Laplacian)", mm.get("T_conf_val_K"), "reference")]
    for a in run.arms:
        items += [(f"{label(a)} samples: T_kin", run.rows[a].get("T_kin"), a),
                  (f"{label(a)} samples: T_conf", run.rows[a].get("T_conf"), a)]
    fig, axes = new_figure(1, 1, 11, 0.42 * len(items) + 1.4)
    ax = axes[0, 0]
    vals = [num(v) for _, v, _ in items]
    Ts = sorted({num(run.rows[a].get("T_set")) for a in run.arms} - {None})
    # The axis spans the set and nominal temperatures and every value within a factor 2 of them; a value
    # beyond (a broken Laplacian gives absurd T_conf) is drawn at the edge with its number.
    anchor = [*Ts, NOMINAL_MD17_K]
    sane = [v for v in vals if v is not None and min(anchor) / 2 <= v <= 2 * max(anchor)]
    lo, hi = min(sane + anchor), max(sane + anchor)
    pad = max(0.08 * (hi - lo), 15.0)
    x_lo, x_hi = lo - pad, hi + 2.5 * pad
    for i, ((_, _, src), v) in enumerate(zip(items, vals, strict=True)):
        if v is None:
            ax.text(0.01, i, "undefined", transform=ax.get_yaxis_transform(), va="center", color=FLOOR_COLOR,
                    bbox={"fc": "white", "ec": "none", "pad": 1})
            continue
        x = min(max(v, x_lo + 0.2 * pad), x_hi - 2.2 * pad)
        off = x != v
        ax.plot([x], [i], (">" if v > x else "<") if off else "o", ms=9, color=color(src))
        ax.annotate(f"{v:.0f} K" + (" (off scale)" if off else ""), (x, i), xytext=(8, 0),
                    textcoords="offset points", va="center", fontsize=10)
    for k, T in enumerate(Ts):
        ax.axvline(T, color=SET_T_COLOR, lw=2, label=f"T_set = {T:.0f} K" if k == 0 else None)
    ax.axvline(NOMINAL_MD17_K, color=FLOOR_COLOR, ls=":", lw=2, label=f"nominal MD17 {NOMINAL_MD17_K:.0f} K")
    ax.set_xlim(x_lo, x_hi)
    ax.set_yticks(range(len(items)), [name for name, _, _ in items])
    ax.invert_yaxis()
    ax.set_xlabel("temperature (K)")
    ax.set_title("Temperature audit")
    legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def _strip(ax, run: RunData, column: str) -> None:
    """One dot per replica per arm (x = arm, jittered); spurious replicas ringed in red."""
    rng = np.random.default_rng(0)
    ringed = False
    for i, a in enumerate(run.arms):
        df = run.replicas[a]
        y = df[column].to_numpy(float)
        ok = np.isfinite(y)
        x = i + rng.uniform(-0.25, 0.25, len(y))
        ax.scatter(x[ok], y[ok], s=22, color=color(a), alpha=0.75, lw=0)
        spur = ok & np.isfinite(df["first_spurious_ps"].to_numpy(float))
        if spur.any():
            ax.scatter(x[spur], y[spur], s=60, facecolor="none", edgecolor=THRESHOLD_COLOR, lw=1.2,
                       label=None if ringed else "replica that entered a spurious state")
            ringed = True
    ax.set_xticks(range(len(run.arms)), [label(a) for a in run.arms])
    ax.set_xlim(-0.6, len(run.arms) - 0.4)


def fig_spurious(run: RunData) -> Figure:
    """Per replica: lowest energy relative to the DFT minimum and shortest non-bonded distance, thresholds drawn."""
    ref = run.reference
    fig, axes = new_figure(1, 2, 12, 4.4)
    ax = axes[0, 0]
    _strip(ax, run, "lowest_energy_rel_dft_min")
    thr = num(ref.get("spurious_energy_threshold_rel_dft_min"))
    if thr is not None:
        ax.axhline(thr, color=THRESHOLD_COLOR, ls="--", lw=1.5, label=f"spurious below {fmt(thr, 1)}")
    ax.axhline(0, color=COLORS["reference"], lw=1, label="lowest DFT energy of the pool")
    low = np.concatenate([run.replicas[a]["lowest_energy_rel_dft_min"].to_numpy(float) for a in run.arms])
    low = low[np.isfinite(low)]
    if len(low) and low.min() < -20 * max(abs(thr or 5.0), 1.0):  # a deep hole: keep the rest readable
        ax.set_yscale("symlog", linthresh=10)
    ax.set_ylabel("lowest E_model − E_DFT,min (kcal/mol)")
    ax.set_title("Lowest energy per replica")
    legend(ax, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, fontsize=8.5)
    ax = axes[0, 1]
    _strip(ax, run, "min_nonbonded_distance_A")
    d_thr, d_min = num(ref.get("spurious_distance_threshold")), num(ref.get("min_nonbonded_distance"))
    if d_thr is not None:
        ax.axhline(d_thr, color=THRESHOLD_COLOR, ls="--", lw=1.5, label=f"spurious below {d_thr:.2f}")
    if d_min is not None:
        ax.axhline(d_min, color=COLORS["reference"], lw=1, label=f"DFT pool minimum ({d_min:.2f})")
    ax.set_ylabel("shortest non-bonded distance (Å)")
    ax.set_title("Closest non-bonded pair per replica")
    legend(ax, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, fontsize=8.5)
    fig.suptitle("Spurious-state occupancy (one dot per replica; frames before bond instability)")
    return fig


def fig_stability(run: RunData) -> Figure:
    """Fraction of each arm's replicas still bond-stable at time t."""
    fig, axes = new_figure(1, 1, 11, 3.8)
    ax = axes[0, 0]
    for a in run.arms:
        df = run.curve(a, "stability")
        if df is None:
            continue
        n = run.n_replicas(a)
        ax.step(df["time_ps"], df["stable_fraction"], where="post", color=color(a), lw=2,
                label=f"{label(a)}: {count(run.rows[a].get('stable_fraction'), n)}/{n} stable to the end")
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("simulation time t (ps)")
    ax.set_ylabel("fraction of replicas stable")
    tol = run.params["evaluate"]["bond_tolerance"]
    ax.set_title(f"Stability (a bond deviating > {tol:g} Å from its DFT mean ends a replica)")
    legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def fig_hr(run: RunData) -> Figure:
    """h(r) of the reference and every arm (top) and each arm's difference from the reference (bottom)."""
    fig, axes = new_figure(2, 1, 12, 6.0, sharex=True, height_ratios=[2, 1.2])
    ax, ax_d = axes[0, 0], axes[1, 0]
    ref = run.curve("reference", "hr")
    r_max = 0.0
    for s in ("reference", *run.arms):
        df = run.curve(s, "hr")
        if df is None:
            continue
        nz = df.loc[df["h"] > 0, "r_A"]
        r_max = max(r_max, float(nz.max())) if len(nz) else r_max
        is_ref = s == "reference"
        name = label(s) if is_ref else f"{label(s)}: MAE {fmt(run.rows[s].get('hr_mae'))}"
        ax.plot(df["r_A"], df["h"], color=color(s), lw=2 if is_ref else 1.6, ls="-" if is_ref else "--", label=name)
        if not is_ref and ref is not None:
            ax_d.plot(df["r_A"], df["h"] - ref["h"], color=color(s), lw=1.4, label=f"{label(s)} − DFT")
    ax_d.axhline(0, color=COLORS["reference"], lw=1)
    ax.set_xlim(0, min(r_max + 0.5, 10.0) if r_max else 10.0)
    ax.set_ylabel("h(r) (1/Å)")
    ax.set_title(f"Interatomic distance distribution h(r) (noise floor MAE {fmt(run.noise_floor.get('hr_mae'))})")
    ax_d.set_ylabel("Δh(r) (1/Å)")
    ax_d.set_xlabel("interatomic distance r (Å)")
    legend(ax, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    legend(ax_d, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def full_grid(df: pd.DataFrame | None, bins: int) -> pd.DataFrame | None:
    """F(φ) on every bin centre, NaN where the source never went (so lines break instead of bridging gaps)."""
    if df is None:
        return None
    centres = -180.0 + (np.arange(bins) + 0.5) * 360.0 / bins
    k = np.clip(np.round((df["phi_deg"].to_numpy() + 180.0) * bins / 360.0 - 0.5).astype(int), 0, bins - 1)
    F = np.full(bins, np.nan)
    F[k] = df["F_kcal_mol"].to_numpy()
    return pd.DataFrame({"phi_deg": centres, "F_kcal_mol": F})


def fig_dihedrals(run: RunData) -> Figure:
    """F(φ) per torsion: reference with its noise-floor band, every arm dashed."""
    ts = run.torsions
    ncols = min(len(ts), 2)
    nrows = math.ceil(len(ts) / ncols)
    fig, axes = new_figure(nrows, ncols, 12, 3.9 * nrows)
    bins = int(run.params["evaluate"]["dihedral_bins"])
    for k, t in enumerate(ts):
        ax = axes[k // ncols, k % ncols]
        floor = num(run.noise_floor.get(f"dihedral_{t.name}_rmse"))
        for s in ("reference", *run.arms):
            df = full_grid(run.curve(s, "dihedral", f"{t.name}_{s}"), bins)
            if df is None:
                continue
            if s == "reference":
                if floor is not None:
                    ax.fill_between(df["phi_deg"], df["F_kcal_mol"] - floor, df["F_kcal_mol"] + floor,
                                    color=FLOOR_COLOR, alpha=0.25, lw=0, label=f"DFT ± noise floor ({floor:.2f})")
                ax.plot(df["phi_deg"], df["F_kcal_mol"], "-o", ms=3, color=color(s), lw=2, label=label(s))
            else:
                ax.plot(df["phi_deg"], df["F_kcal_mol"], "--s", ms=3, color=color(s), lw=1.6,
                        label=f"{label(s)}: RMSE {fmt(run.rows[s].get(f'dihedral_{t.name}_rmse'), 2)}")
        ax.set_xlim(-180, 180)
        ax.set_xticks(range(-180, 181, 60))
        ax.set_xlabel("dihedral angle φ (degrees)")
        ax.set_ylabel("F(φ) (kcal/mol)")
        ax.set_title(f"{t.label}\nnoise floor RMSE {fmt(floor, 2)} kcal/mol", fontsize=11)
        legend(ax, loc="upper center", ncols=2, fontsize=8)
        lo, hi = ax.get_ylim()
        ax.set_ylim(min(lo, -0.2), hi + 0.45 * (hi - lo))  # headroom for the legend
    for k in range(len(ts), nrows * ncols):
        axes[k // ncols, k % ncols].set_axis_off()
    T = num(run.reference.get("dihedral_temperature"))
    fig.suptitle(f"Dihedral free energies F(φ) = −k_B T ln p(φ) at T = {fmt(T, 0)} K (min-shifted; "
                 "RMSE over bins populated in both)")
    return fig


def fig_parity(run: RunData) -> Figure:
    """Model vs DFT on the test split: energies (top row) and force components (bottom), one column per arm."""
    n = len(run.arms)
    fig, axes = new_figure(2, n, min(4.3 * n, 13), 8.8)
    for col, a in enumerate(run.arms):
        for row, (kind, key, unit) in enumerate((("energy", "test_energy_mae", "kcal/mol"),
                                                 ("forces", "test_forces_mae", "kcal/mol/Å"))):
            ax = axes[row, col]
            df = run.curve(a, "parity", f"{kind}_{a}")
            if df is None:
                ax.set_axis_off()
                continue
            x, y = df["dft"].to_numpy(), df["model"].to_numpy()
            ax.scatter(x, y, s=5 if kind == "forces" else 9, alpha=0.35, color=color(a), lw=0, rasterized=True)
            lim = [float(np.nanmin([x.min(), y.min()])), float(np.nanmax([x.max(), y.max()]))]
            ax.plot(lim, lim, color=COLORS["reference"], lw=1)
            ax.set_aspect("equal", adjustable="datalim")
            what = "E − ⟨E_DFT⟩_test" if kind == "energy" else "force component"
            ax.set_xlabel(f"DFT {what} ({unit})")
            ax.set_ylabel(f"{label(a)} {what} ({unit})")
            ax.set_title(f"{label(a)}, test {kind}: MAE {fmt(run.rows[a].get(key))}", fontsize=11)
    fig.suptitle("Parity on the test split")
    return fig


AUDIT_MARKERS = {"reference": "o", "random": "s", "lowest": "v", "spurious": "X"}


def fig_audit(run: RunData) -> Figure | None:
    """Model vs DFT energy on every audited frame, and |ΔE| per arm and frame kind; None when no arm was audited."""
    frames = [run.audit_frames[a] for a in audited(run) if a in run.audit_frames]
    if not frames:
        return None
    df = pd.concat(frames, ignore_index=True)
    df = df[df["status"].astype(str) == "ok"]
    if df.empty:
        return None
    off_std = num((run.audit[audited(run)[0]].get("offset") or {}).get("std"))
    fig, axes = new_figure(1, 2, 13, 5.2)
    ax = axes[0, 0]
    flagged = df["spurious"].astype(str).str.lower().isin(("true", "1"))
    for a in run.arms:
        sub = df[df["model"] == a]
        for kind, mk in AUDIT_MARKERS.items():
            k = sub[sub["kind"] == kind]
            if len(k):
                ax.scatter(k["dft_rel_dft_min"], k["model_rel_dft_min"], marker=mk, s=50, color=color(a), alpha=0.8,
                           edgecolor="white", lw=0.6, label=f"{label(a)}, {kind}")
    sp = df[flagged]
    if len(sp):
        ax.scatter(sp["dft_rel_dft_min"], sp["model_rel_dft_min"], s=150, facecolor="none",
                   edgecolor=THRESHOLD_COLOR, lw=1.8, label="flagged by the detector (red ring)")
    vals = np.concatenate([df["dft_rel_dft_min"].to_numpy(float), df["model_rel_dft_min"].to_numpy(float)])
    vals = vals[np.isfinite(vals)]
    lim = [float(vals.min()) - 2, float(vals.max()) + 2] if len(vals) else [-1.0, 1.0]
    ax.plot(lim, lim, color=COLORS["reference"], lw=1, label="model = DFT")
    if off_std:
        ax.fill_between(lim, [v - off_std for v in lim], [v + off_std for v in lim], color=FLOOR_COLOR, alpha=0.2,
                        lw=0, label=f"± offset spread ({off_std:.2f})")
    ax.set_xlabel("DFT energy (aligned) − lowest pool label (kcal/mol)")
    ax.set_ylabel("model energy − lowest pool label (kcal/mol)")
    ax.set_title("Model vs DFT on audited frames")
    legend(ax, loc="upper left", fontsize=7.5, ncols=2)
    ax = axes[0, 1]
    kinds = [k for k in AUDIT_MARKERS if k in set(df["kind"])]
    width = 0.8 / max(len(run.arms), 1)
    for i, a in enumerate(run.arms):
        sub = df[df["model"] == a]
        for j, kind in enumerate(kinds):
            y = sub.loc[sub["kind"] == kind, "model_minus_dft"].astype(float).abs().to_numpy()
            if not len(y):
                continue
            x = j - 0.4 + (i + 0.5) * width
            named = label(a) in ax.get_legend_handles_labels()[1]
            ax.scatter(np.full(len(y), x), y, marker=AUDIT_MARKERS[kind], s=30, color=color(a), alpha=0.7, lw=0,
                       label=None if named else label(a))
            ax.errorbar([x], [y.mean()], yerr=[y.std(ddof=1) if len(y) > 1 else 0.0], fmt="_", ms=18, color="black",
                        capsize=3, lw=1.2)
    ax.set_xticks(range(len(kinds)), kinds)
    err = df["model_minus_dft"].astype(float).abs()
    if err.max() > 20 * max(float(err.median()), 0.1):  # a flagged frame's error would flatten the rest
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("frame kind (black: mean ± sd)")
    ax.set_ylabel("|E_model − E_DFT| (kcal/mol)")
    ax.set_title("Energy error per audited frame")
    legend(ax, loc="upper left")
    fig.suptitle("Ab initio audit")
    return fig
