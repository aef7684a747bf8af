"""Generated text and tables of one report: every number comes from the stages' tables, no claim is typed.

Units: Å, kcal/mol, kcal/mol/Å, ps, K.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from crmse.report.run import RunData, audit_errors, audit_model, audited
from crmse.report.style import CHEMICAL_ACCURACY, NOMINAL_MD17_K, count, fmt, fmt_pm, label, num, relative_change

#: What each arm is, in one phrase (see docs/method.md).
ARM_DESCRIPTIONS = {
    "mse": "force-and-energy MSE pre-training only",
    "crmse": "the paper's CRMSE: the MSE model post-trained with L_MSE + λ·L_C on persistent Langevin chains",
    "crmse_memory": "CRMSE plus a memory of configurations the detector flagged, held above the training energies "
                    "by a hinge (with scout chains and a gradient projection)",
}

#: What the MD17 test MAE does and does not say (a property of the data set, shown in every report).
CORRELATION_NOTE = (
    "MD17 frames are consecutive snapshots of one ab initio MD trajectory, so they are correlated in time "
    "(ethanol frames are ~40 MD steps apart, aspirin ~16). Test frames drawn at random from it sit between "
    "training frames and flatter every model: a low test MAE says little about how the model samples."
)
FLOOR_COLUMN = "noise floor / DFT reference"
DETECTOR_COLUMN = "training-time detector"


def _values(run: RunData, key: str) -> dict[str, float | None]:
    return {a: num(run.rows[a].get(key)) for a in run.arms}


def _listing(cells: dict[str, str]) -> str:
    return ", ".join(f"{label(a)} {v}" for a, v in cells.items())


def _names(arms: list[str]) -> str:
    names = [label(a) for a in arms]
    return " and ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else (names[0] if names else "none")


def compare_sentence(run: RunData, name: str, key: str, unit: str, digits: int = 3) -> str:
    """'<name>: MSE a, CRMSE b, … (noise floor f); closest to the DFT reference: X; within the floor: …'."""
    vals = _values(run, key)
    floor = num(run.noise_floor.get(key))
    u = f" {unit}" if unit else ""
    head = f"{name}: {_listing({a: fmt(v, digits) for a, v in vals.items()})}{u}"
    head += f" (noise floor {fmt(floor, digits)})" if floor is not None else ""
    defined = {a: v for a, v in vals.items() if v is not None}
    undefined = [a for a in vals if a not in defined]
    parts = [head]
    if len(defined) > 1:
        best = min(defined.values())
        parts.append(f"closest to the DFT reference: {_names([a for a, v in defined.items() if v == best])}")
    if floor is not None and defined:
        parts.append(f"within the noise floor: {_names([a for a, v in defined.items() if v <= floor])}")
    if undefined:
        parts.append(f"undefined for {_names(undefined)} (no valid frames)")
    return "; ".join(parts) + "."


def _occupancy_sentences(run: RunData) -> list[str]:
    M = {a: run.n_replicas(a) for a in run.arms}
    k = {a: count(run.rows[a].get("spurious_replica_fraction"), M[a]) for a in run.arms}
    t_ps = num(run.rows[run.arms[0]].get("trajectory_ps"))
    span = f" over {t_ps:g} ps" if t_ps else ""
    if any(v is None for v in k.values()):
        return [f"Spurious-state occupancy is undefined for {_names([a for a, v in k.items() if v is None])}."]
    if all(v == 0 for v in k.values()):
        return [f"No arm entered a spurious state (0 replicas of {_listing({a: str(M[a]) for a in run.arms})}"
                f"{span})."]
    out = [f"Replicas entering a spurious state{span}: {_listing({a: f'{k[a]}/{M[a]}' for a in run.arms})}."]
    if "mse" in run.arms:
        base = f"{k['mse']}/{M['mse']}"
        for a in run.arms:
            if a == "mse":
                continue
            if k[a] < k["mse"]:
                out.append(f"{label(a)} reduced spurious-state occupancy from {base} (MSE) to {k[a]}/{M[a]} replicas.")
            elif k[a] > k["mse"]:
                out.append(f"{label(a)} increased spurious-state occupancy from {base} (MSE) to {k[a]}/{M[a]} "
                           "replicas.")
            else:
                out.append(f"{label(a)} did not change spurious-state occupancy ({k[a]}/{M[a]} replicas, as MSE).")
    return out


def _test_sentence(run: RunData) -> str | None:
    e, f = _values(run, "test_energy_mae"), _values(run, "test_forces_mae")
    if any(v is None for v in (*e.values(), *f.values())):
        return None
    acc = [a for a, v in e.items() if v <= CHEMICAL_ACCURACY]
    within = ("every arm" if len(acc) == len(e) else f"only {_names(acc)}" if acc else "no arm")
    forces = {a: fmt(v) + (f" ({relative_change(v, f['mse'])} vs MSE)" if "mse" in f and a != "mse" else "")
              for a, v in f.items()}
    return (f"Test energy MAE: {_listing({a: fmt(v) for a, v in e.items()})} kcal/mol, {within} within chemical "
            f"accuracy (≤ {CHEMICAL_ACCURACY:g} kcal/mol); test force MAE: {_listing(forces)} kcal/mol/Å.")


def audit_cell(err: dict[str, Any], digits: int = 2) -> str:
    """'mean ± sd (n = k)' of an :func:`crmse.report.run.audit_errors` group, '—' when empty."""
    if not err or num(err.get("mean")) is None:
        return "—"
    n = err.get("n")
    return fmt_pm(err["mean"], err.get("sd"), digits) + (f" (n = {n})" if n is not None else "")


def summary_paragraph(run: RunData) -> str:
    """One short paragraph of what the numbers show, every arm side by side."""
    parts = _occupancy_sentences(run)
    low = _values(run, "lowest_energy_rel_dft_min")
    parts.append("Lowest model energy reached, relative to the lowest DFT energy of the reference pool: "
                 f"{_listing({a: fmt(v, 1) for a, v in low.items()})} kcal/mol.")
    stable = {a: f"{count(run.rows[a].get('stable_fraction'), run.n_replicas(a))}/{run.n_replicas(a)}"
              for a in run.arms}
    parts.append(f"Replicas bond-stable to the end: {_listing(stable)}.")
    parts.append(compare_sentence(run, "Energy distribution W1", "energy_w1", "kcal/mol", 2))
    parts.append(compare_sentence(run, "h(r) MAE", "hr_mae", ""))
    if "mse" in run.arms and len(run.arms) > 1:
        bits = []
        for a in (x for x in run.arms if x != "mse"):
            keys = [f"dihedral_{t.name}_rmse" for t in run.torsions]
            pairs = [(num(run.rows["mse"].get(k)), num(run.rows[a].get(k))) for k in keys]
            pairs = [(m, v) for m, v in pairs if m is not None and v is not None]
            if pairs:
                bits.append(f"for {label(a)} on {sum(v < m for m, v in pairs)} of {len(pairs)} torsions")
        if bits:
            parts.append("F(φ) RMSE is lower than MSE's " + " and ".join(bits) + ".")
    test = _test_sentence(run)
    if test:
        parts.append(test)
    aud = {a: audit_errors(run.audit.get(a), run.audit_frames.get(a), a).get("random", {}) for a in audited(run)}
    if aud:
        parts.append("DFT audit, |E_model − E_DFT| on randomly chosen unflagged sampled frames (mean ± sd): "
                     f"{_listing({a: audit_cell(e) for a, e in aud.items()})} kcal/mol.")
    return " ".join(parts)


def run_header(run: RunData) -> str:
    """Markdown: title, the arms, and what was run (from the stages' own records and params.yaml)."""
    mm, md = run.train["mse"], run.params["md"]
    lines = [f"# crmse report: {run.title}", ""]
    for a in run.arms:
        lines.append(f"* **{label(a)}:** {ARM_DESCRIPTIONS.get(a, a)}.")
    lines.append(f"* **MSE pre-training:** {mm.get('epochs', '?')} epochs (best validation epoch "
                 f"{mm.get('best_epoch', '?')}; {mm.get('stop_reason', '')}) on {mm.get('device', '?')}.")
    for a in run.posttrained:
        cm = run.train[a]
        lines.append(f"* **{label(a)} post-training:** T_chain = {fmt(num(cm.get('T_chain_K')), 0)} K, "
                     f"{int(run.logs[a]['iteration'].max())} iterations, selected iteration "
                     f"{cm.get('selected_iteration', '?')} ({cm.get('selection', '')}).")
    row = run.rows[run.arms[0]]
    t_ps = num(row.get("trajectory_ps"))
    lines.append(f"* **Sampling:** {row.get('n_replicas', '?')} replicas × {'—' if t_ps is None else f'{t_ps:g}'} ps "
                 f"per arm (after {fmt(num(md.get('equilibration_fs')), 0)} fs equilibration), BAOAB Langevin, dt = "
                 f"{fmt(num(md.get('dt')), 2)} fs, friction {fmt(num(md.get('friction')), 3)} 1/fs, T = "
                 f"{fmt(num(row.get('T_set')), 0)} K (setting: {run.temperature}).")
    lines.append(f"* **DFT reference pool:** {run.reference.get('n_frames')} MD17 frames not used for training or "
                 "validation.")
    return "\n".join(lines)


def reference_T_conf(run: RunData) -> float | None:
    """T_conf (K) of the reference pool: DFT forces, MSE-model Laplacian (the ``auto`` temperature's definition)."""
    ev = num(run.rows["mse"].get("T_conf_pool_laplacian")) if "mse" in run.rows else None
    return ev if ev is not None else num(run.train["mse"].get("T_conf_pool_K"))


def temperature_sentence(run: RunData) -> str:
    """ONE sentence: the temperature the comparison is made at, against the data's measured temperature."""
    T = _values(run, "T_set")
    Ts = next((v for v in T.values() if v is not None), None)
    if Ts is None:
        return "The set temperature of the samples is unknown."
    others = {a: v for a, v in T.items() if v is None or abs(v - Ts) > 1e-6}
    who = "every arm's sampler" if not others else (
        "the samplers, except " + _listing({a: f"{fmt(v, 0)} K" for a, v in others.items()}))
    auto = num(run.train["mse"].get("T_auto_K"))
    how = (f"set automatically to the data's configurational temperature ({fmt(auto, 0)} K, reference pool)"
           if run.temperature == "auto" else "a fixed set temperature")
    ref = reference_T_conf(run)
    if ref:
        rel = (Ts - ref) / ref
        ref_txt = f"the reference pool's configurational temperature is {fmt(ref, 0)} K"
        verdict = ("so the comparison with DFT is like-for-like in temperature (within 5 %)" if abs(rel) <= 0.05
                   else f"so samples run {abs(Ts - ref):.0f} K {'colder' if rel < 0 else 'hotter'} than the data and "
                   "part of every distribution difference below is a temperature effect, not a model error")
    else:
        ref_txt = "the reference pool's configurational temperature is undefined"
        verdict = "so whether the comparison is like-for-like in temperature cannot be said"
    return (f"All sampled observables in this report are compared at T = {fmt(Ts, 0)} K, the set temperature of "
            f"{who}, {how}; {ref_txt} (DFT forces, MSE-model Laplacian) and the nominal MD17 temperature is "
            f"{NOMINAL_MD17_K:.0f} K, {verdict}.")


def _value(row: dict[str, Any], key: str, digits: int) -> str:
    # sampling uncertainty: the replica bootstrap's sd (evaluate stage)
    return fmt_pm(row.get(key), row.get(f"{key}_boot_sd"), digits)


class _Table:
    """Rows of a per-arm table: a metric, optional leading cells, one cell per arm, a floor cell."""

    def __init__(self, run: RunData, lead: tuple[str, ...] = ()) -> None:
        self.run, self.lead, self.rows = run, lead, []

    def add(self, name: str, key: str, floor: str, digits: int = 3, unit: str = "", *lead: str) -> None:
        cells = [_value(self.run.rows[a], key, digits) for a in self.run.arms]
        self.rows.append([name + (f" ({unit})" if unit else ""), *lead, *cells, floor])

    def frac(self, name: str, key: str, floor: str, *lead: str) -> None:
        cells = []
        for a in self.run.arms:
            n, k = self.run.n_replicas(a), count(self.run.rows[a].get(key), self.run.n_replicas(a))
            cells.append(f"{k}/{n}" if k is not None else "—")
        self.rows.append([name, *lead, *cells, floor])

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows, columns=["metric", *self.lead, *(label(a) for a in self.run.arms),
                                                FLOOR_COLUMN])


def metrics_table(run: RunData) -> pd.DataFrame:
    """Every headline number: one column per arm and the noise floor (or reference value) beside it."""
    ref, nf, tol = run.reference, run.noise_floor, run.params["evaluate"]["bond_tolerance"]
    t = _Table(run)
    t.add("Test energy MAE", "test_energy_mae", f"chemical accuracy ≤ {CHEMICAL_ACCURACY:g}", unit="kcal/mol")
    t.add("Test force MAE", "test_forces_mae", "—", unit="kcal/mol/Å")
    t.frac("Replicas bond-stable to the end", "stable_fraction",
           f"DFT pool: max bond deviation {fmt(ref.get('max_bond_deviation'), 2)} Å < {tol:g} Å")
    t.add("Median time to instability", "median_time_to_instability_ps", "—", 2, "ps")
    t.frac("Replicas entering a spurious state", "spurious_replica_fraction", "DFT pool: 0 by construction")
    t.add("Frames in spurious states", "spurious_frame_fraction", "0", 3, "fraction")
    t.add("Earliest spurious entry", "spurious_first_entry_min_ps", "—", 2, "ps")
    t.add("Lowest energy − DFT minimum", "lowest_energy_rel_dft_min",
          f"spurious below {fmt(ref.get('spurious_energy_threshold_rel_dft_min'), 1)}", 1, "kcal/mol")
    t.add("Shortest non-bonded distance", "min_nonbonded_distance",
          f"DFT pool {fmt(ref.get('min_nonbonded_distance'), 2)}; spurious below "
          f"{fmt(ref.get('spurious_distance_threshold'), 2)}", 2, "Å")
    t.add("Energy W1", "energy_w1", fmt(nf.get("energy_w1"), 2), 2, "kcal/mol")
    t.add("Energy mean shift", "energy_mean_shift", fmt(nf.get("energy_mean_shift"), 2), 2, "kcal/mol")
    t.add("h(r) MAE ∫|Δh|dr", "hr_mae", fmt(nf.get("hr_mae")), 3)
    for tor in run.torsions:
        t.add(f"F(φ) RMSE, {tor.label}", f"dihedral_{tor.name}_rmse", fmt(nf.get(f"dihedral_{tor.name}_rmse"), 2), 2,
              "kcal/mol")
        t.add(f"F(φ) unvisited reference bins, {tor.name}", f"dihedral_{tor.name}_unvisited",
              fmt(nf.get(f"dihedral_{tor.name}_unvisited"), 2), 2, "fraction")
    t.add("Set temperature", "T_set", "—", 0, "K")
    t.add("Kinetic temperature of the samples", "T_kin", "—", 0, "K")
    t.add("Configurational temperature of the samples", "T_conf", f"DFT pool {fmt(reference_T_conf(run), 0)}", 0,
          "K")
    return t.frame()


def evidence_table(run: RunData) -> pd.DataFrame:
    """The metrics the training-time detector defines, then those it does not, per arm, with their floors.

    The DFT audit rows are |E_model − E_DFT| (kcal/mol) as mean ± sd over frames (n frames).
    """
    ref, nf = run.reference, run.noise_floor
    t = _Table(run, (DETECTOR_COLUMN,))
    t.frac("Replicas entering a spurious state", "spurious_replica_fraction", "0", "defines it")
    t.add("Lowest energy − DFT minimum", "lowest_energy_rel_dft_min",
          f"flag below {fmt(ref.get('spurious_energy_threshold_rel_dft_min'), 1)}", 1, "kcal/mol",
          "defines its flag")
    t.frac("Replicas bond-stable to the end", "stable_fraction", "all", "independent")
    t.add("Energy W1", "energy_w1", fmt(nf.get("energy_w1"), 2), 2, "kcal/mol", "independent")
    t.add("h(r) MAE", "hr_mae", fmt(nf.get("hr_mae")), 3, "", "independent")
    for tor in run.torsions:
        t.add(f"F(φ) RMSE, {tor.name}", f"dihedral_{tor.name}_rmse", fmt(nf.get(f"dihedral_{tor.name}_rmse"), 2), 2,
              "kcal/mol", "independent")
    errs = {a: audit_errors(run.audit.get(a), run.audit_frames.get(a), a) for a in run.arms}
    if any(errs.values()):
        floor = [audit_cell(e.get("reference", {})) for e in errs.values() if e]
        t.rows.append(["DFT audit |E_model − E_DFT|, random sampled frames (kcal/mol)", "independent",
                       *(audit_cell(errs[a].get("random", {})) for a in run.arms),
                       f"model on pool frames: {floor[0]}" if floor else "—"])
        t.rows.append(["DFT audit |E_model − E_DFT|, frames it flags (kcal/mol)", "flags them",
                       *(audit_cell(errs[a].get("flagged", {})) for a in run.arms), "—"])
    return t.frame()


def detector_sentence(run: RunData) -> str:
    """Which metrics the training-time spurious-state detector defines, which it does not, and why it matters."""
    ref = run.reference
    rule = run.params["crmse"]["selection"]["rule"]
    uses = []
    if run.posttrained and rule == "fewest_chain_failures":
        uses.append(f"{_names(list(run.posttrained))} chose {'their' if len(run.posttrained) > 1 else 'its'} "
                    "checkpoint by the chain failures it counts")
    if "crmse_memory" in run.arms:
        uses.append(f"{label('crmse_memory')} raised the energy of every configuration it flagged")
    use = (" During post-training " + " and ".join(uses) + ", so these two numbers alone cannot show a repair.") if (
        uses) else ""
    return (
        "The spurious-state detector flags a frame whose model energy lies below "
        f"{fmt(ref.get('spurious_energy_threshold_rel_dft_min'), 1)} kcal/mol relative to the lowest DFT energy of "
        f"the reference pool, or whose closest non-bonded pair is nearer than "
        f"{fmt(ref.get('spurious_distance_threshold'), 2)} Å (the pool's shortest is "
        f"{fmt(ref.get('min_nonbonded_distance'), 2)} Å). It defines the spurious-replica count and the lowest-energy "
        f"flag.{use} It does not define the energy W1, h(r), F(φ), bond stability, or the DFT audit's energy error "
        "on randomly chosen sampled frames: that evidence is measured without it."
    )


def audit_table(run: RunData) -> pd.DataFrame | None:
    """Per-arm DFT audit numbers (None when no arm's audit ran)."""
    rows = []
    for a in audited(run):
        m = audit_model(run, a)
        e = audit_errors(run.audit[a], run.audit_frames.get(a), a)
        sp = m.get("spurious") or {}
        rows.append({
            "arm": label(a),
            "random frames: |ΔE| vs DFT (kcal/mol)": audit_cell(e.get("random", {})),
            "random frames: F MAE vs DFT (kcal/mol/Å)": fmt((m.get("random") or {}).get("forces_mae"), 2),
            "flagged frames: |ΔE| vs DFT (kcal/mol)": audit_cell(e.get("flagged", {})),
            "pool frames: |ΔE| vs DFT (floor)": audit_cell(e.get("reference", {})),
            "flagged: lowest model E − DFT min": fmt((sp.get("model_rel_dft_min") or {}).get("min"), 1),
            "flagged: lowest DFT E − DFT min": fmt((sp.get("dft_rel_dft_min") or {}).get("min"), 1),
        })
    return pd.DataFrame(rows) if rows else None


def audit_sentence(run: RunData) -> str:
    """What the audit section shows, or why it is absent (per arm)."""
    notes = []
    for a in run.arms:
        if a not in run.audit:
            notes.append(f"{label(a)}: no audit.json")
        elif run.audit[a].get("skipped"):
            notes.append(f"{label(a)}: skipped ({run.audit[a].get('reason', 'no reason given')})")
    done = audited(run)
    if not done:
        return "No ab initio audit ran for this report (" + "; ".join(notes) + ")."
    aud = run.audit[done[0]]
    off, s = aud.get("offset", {}), aud.get("settings", {})
    text = (f"DFT single points ({str(s.get('xc', '?')).upper()}/{s.get('basis', '?')}, PySCF) on frames each arm "
            f"sampled; DFT energies are shifted onto the label scale by an offset fitted on {off.get('n', '?')} "
            f"reference-pool frames ({fmt(off.get('offset'), 1)} ± {fmt(off.get('std'), 2)} kcal/mol; the ± is the "
            "floor of every model − DFT energy comparison). The random-frame error counts randomly chosen valid "
            "sampled frames the detector does not flag; the frames it flags are reported apart.")
    return text + (" Not audited: " + "; ".join(notes) + "." if notes else "")
