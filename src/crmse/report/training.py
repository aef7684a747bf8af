"""Training figures: MSE pre-training, each post-trained arm's validation and chains, the memory arm's holes.

The post-trained arms' log columns are fixed per term (crmse.contrastive): every post-trained arm has the
contrastive term's columns; the crmse_memory arm also has the hole term's.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from crmse.report.run import RunData
from crmse.report.style import (
    COLORS,
    FLOOR_COLOR,
    THRESHOLD_COLOR,
    color,
    fmt,
    label,
    legend,
    log_y,
    new_figure,
    num,
    rolling,
)

MEMORY_ARM = "crmse_memory"


def fig_training(run: RunData) -> Figure:
    """Top: MSE pre-training per epoch. Bottom (with post-trained arms): their L_MSE and validation errors."""
    L, mm = run.logs["mse"], run.train["mse"]
    post = run.posttrained
    fig, axes = new_figure(2 if post else 1, 3, 13, 7.6 if post else 3.9)
    ax = axes[0, 0]
    ax.plot(L["epoch"], L["train_loss"], color="#999999", lw=1.2, label="train loss")
    ax.plot(L["epoch"], L["val_loss"], color=COLORS["mse"], lw=1.6, label="validation loss")
    log_y(ax)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss ρ_E·ΔE² + ρ_F·ΔF² (kcal/mol units)")
    ax.set_title("MSE: loss")
    legend(ax)
    best = mm.get("best_epoch")
    for ax, col, unit, what in ((axes[0, 1], "val_energy_mae", "kcal/mol", "energy"),
                                (axes[0, 2], "val_force_mae", "kcal/mol/Å", "force")):
        ax.plot(L["epoch"], L[col], color="#bbbbbb", lw=0.6, label="per epoch")
        ax.plot(L["epoch"], rolling(L[col], len(L)), color=COLORS["mse"], lw=1.8, label="running mean")
        if best is not None:
            ax.axvline(best, color=FLOOR_COLOR, ls=":", label=f"best epoch {best}")
        log_y(ax)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"validation {what} MAE ({unit})")
        ax.set_title(f"MSE: validation {what} MAE")
        legend(ax)
    if not post:
        return fig
    ax = axes[1, 0]
    for a in post:
        C = run.logs[a]
        ax.plot(C["iteration"], rolling(C["l_mse"], len(C)), color=color(a), lw=1.8, label=label(a))
    log_y(ax)
    ax.set_xlabel("post-training iteration")
    ax.set_ylabel("L_MSE on the batch, running mean")
    ax.set_title("Post-training: MSE term of the loss")
    legend(ax)
    mse_val = mm.get("val", {})
    for ax, col, unit, what, ref in ((axes[1, 1], "val_energy_mae", "kcal/mol", "energy", mse_val.get("energy_mae")),
                                     (axes[1, 2], "val_force_mae", "kcal/mol/Å", "force", mse_val.get("force_mae"))):
        for a in post:
            V, sel = run.val[a], run.train[a].get("selected_iteration")
            ax.plot(V["iteration"], V[col], "-o", ms=3.5, color=color(a), lw=1.5, label=label(a))
            if sel is not None:
                ax.axvline(sel, color=color(a), ls=":", lw=1.4, label=f"{label(a)}: selected {sel}")
        if ref is not None:
            ax.axhline(ref, color=COLORS["mse"], ls="--", lw=1.4, label=f"MSE model ({ref:.3f})")
        ax.set_xlabel("post-training iteration")
        ax.set_ylabel(f"validation {what} MAE ({unit})")
        ax.set_title(f"Post-training: validation {what} MAE")
        legend(ax, fontsize=8)
    return fig


def fig_chains(run: RunData) -> Figure | None:
    """Persistent-chain diagnostics of every post-trained arm; None without one."""
    post = run.posttrained
    if not post:
        return None
    cp = run.params["crmse"]
    ch = cp["chains"]
    e0 = num(run.reference.get("energy_mean")) or 0.0
    fig, axes = new_figure(2, 3, 13, 7.6)
    d_thr = num(run.reference.get("spurious_distance_threshold"))
    for a in post:
        C = run.logs[a]
        it, n, c = C["iteration"], len(C), color(a)
        axes[0, 0].plot(it, rolling(C["gap"], n), color=c, lw=1.8, label=label(a))
        axes[0, 1].plot(it, rolling(C["e_chain"] - e0, n), color=c, lw=1.8, label=f"{label(a)}: chains")
        axes[0, 1].plot(it, rolling(C["e_chain_min"] - e0, n), color=c, lw=1.0, ls="--",
                        label=f"{label(a)}: lowest chain")
        axes[0, 2].plot(it, C["chain_age"] * ch["dt"] / 1000.0, color=c, lw=1.8, label=label(a))
        axes[1, 0].plot(it, C["blowups"].cumsum(), color=c, lw=1.8, label=f"{label(a)}: blow-ups")
        axes[1, 0].plot(it, C["random_resets"].cumsum(), color=c, lw=1.2, ls="--", label=f"{label(a)}: random resets")
        axes[1, 1].plot(it, rolling(C["n_spurious"], n), color=c, lw=1.8, label=label(a))
        axes[1, 2].plot(it, rolling(C["d_chain_min"], n), color=c, lw=1.8, label=label(a))
    data = run.logs[post[0]]
    axes[0, 1].plot(data["iteration"], rolling(data["e_data"] - e0, len(data)), color=COLORS["reference"], lw=1.8,
                    label="training batch")
    ax = axes[0, 0]
    ax.axhline(0, color=COLORS["reference"], lw=1)
    mg = cp["selection"]["max_gap"]
    ax.axhspan(-mg, mg, color=FLOOR_COLOR, alpha=0.15, label=f"selection bound |gap| ≤ {mg:g}")
    if d_thr is not None:
        axes[1, 2].axhline(d_thr, color=THRESHOLD_COLOR, ls="--", lw=1.4, label=f"spurious below {d_thr:.2f}")
    labels = (("gap (kcal/mol), running mean", "Contrastive gap ⟨E_θ⟩_data − ⟨E_θ⟩_chains"),
              ("model energy − ⟨E_DFT⟩ (kcal/mol)", "Energies (running mean)"),
              ("mean chain age (ps)", "Chain persistence"),
              ("cumulative count", "Chain restarts"),
              (f"chains flagged spurious (of {ch['n']})", "Spurious chains (running mean)"),
              ("closest non-bonded pair over chains (Å)", "Closest approach (running mean)"))
    for ax, (ylab, title) in zip(axes.flat, labels, strict=True):
        ax.set_xlabel("post-training iteration")
        ax.set_ylabel(ylab)
        ax.set_title(title)
        legend(ax, fontsize=8)
    axes[1, 1].set_ylim(bottom=-0.2)
    T = num(run.train[post[0]].get("T_chain_K"))
    fig.suptitle(f"Post-training chains: {ch['n']} persistent chains, {ch['steps_per_iter']} Langevin steps per "
                 f"iteration at T_chain = {fmt(T, 0)} K, λ = {cp['lam']:g}")
    return fig


def fig_holes(run: RunData) -> Figure | None:
    """The memory arm's hole term: holes stored, its loss, scout finds, and its gradient against the fit.

    None when the report has no memory arm.
    """
    if MEMORY_ARM not in run.posttrained:
        return None
    C = run.logs[MEMORY_ARM]
    it, n, c = C["iteration"], len(C), color(MEMORY_ARM)
    projection = run.params.get(MEMORY_ARM, {}).get("projection", "off")
    fig, axes = new_figure(2, 2, 13, 7.4)
    ax = axes[0, 0]
    ax.plot(it, C["holes_stored"], color=c, lw=1.8, label="holes remembered")
    ax.plot(it, rolling(C["holes_stored"] * C["holes_below_ceiling"], n), color="#7030a0", lw=1.5, ls="--",
            label="… of which below the highest training energy")
    ax.plot(it, C["scout_spurious"].cumsum(), color=FLOOR_COLOR, lw=1.5, label="scout finds (cumulative)")
    ax.plot(it, C["scout_blowups"].cumsum(), color=THRESHOLD_COLOR, lw=1.2, ls=":", label="scout blow-ups (cumulative)")
    ax.set_ylabel("count")
    ax.set_title("Hole memory")
    ax = axes[0, 1]
    ax.plot(it, C["l_hole"], color="#bbbbbb", lw=0.6, label="per iteration")
    ax.plot(it, rolling(C["l_hole"], n), color=c, lw=1.8, label="running mean")
    ax.set_ylabel("L_H (hinge on remembered holes)")
    ax.set_title("Hole loss")
    ax = axes[1, 0]
    ax.plot(it, C["grad_cos"], color="#bbbbbb", lw=0.6, label="per iteration")
    ax.plot(it, rolling(C["grad_cos"], n), color=c, lw=1.8, label="vs fit: L_MSE + λ·L_C")
    ax.plot(it, rolling(C["grad_cos_energy"], n), color="#7030a0", lw=1.5, label="vs energy term ρ_E·∇MSE_E")
    ax.axhline(0, color=COLORS["reference"], lw=1)
    ax.set_ylim(-1.05, 1.05)
    ax.set_ylabel("cos(∇L_H, ∇fit)")
    ax.set_title(f"Hinge vs fit (< 0: raising holes undoes the fit; projection: {projection})")
    ax = axes[1, 1]
    ax.plot(it, rolling(C["grad_fit_norm"], n), color=COLORS["mse"], lw=1.8, label="fit: L_MSE + λ·L_C")
    ax.plot(it, rolling(C["grad_hole_norm"], n), color="#7030a0", lw=1.8, label="hinge: μ·L_H")
    ax.plot(it, rolling(C["grad_norm"], n), color=FLOOR_COLOR, lw=1.5, ls="--", label="applied, before clipping")
    ax.set_yscale("log")
    ax.set_ylabel("gradient norm (running mean)")
    ax.set_title("Gradient norms")
    for ax in axes.flat:
        ax.set_xlabel("post-training iteration")
        legend(ax, fontsize=8)
    fig.suptitle(f"{label(MEMORY_ARM)}: the hole term")
    return fig
