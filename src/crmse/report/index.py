"""The index: every report on disk (run × temperature setting), one row per arm, tables and a paragraph.

Reads ``metrics/<run>/<T>/<arm>/metrics.json`` (and audit.json, audit_frames.csv beside it),
``metrics/<run>/<T>/reference/metrics.json`` and ``models/<run>/mse_metrics.json``.
"""

from __future__ import annotations

import html
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from crmse.artifacts import RunPaths, temperature_folder
from crmse.io import read_json
from crmse.molecules import TORSIONS
from crmse.report.run import audit_errors
from crmse.report.style import fmt, fmt_pm, label, num

#: Metrics the index compares: (key, label, unit, reference kind). Kinds: "chemical" (1 kcal/mol line),
#: "one"/"zero" (a fraction whose DFT value is 1/0), "floor" (the noise floor), "tref" (T_conf, as %
#: from the reference pool's), None (no reference).
HEADLINE = (
    ("test_energy_mae", "test energy MAE", "kcal/mol", "chemical"),
    ("test_forces_mae", "test force MAE", "kcal/mol/Å", None),
    ("stable_fraction", "bond-stable replicas", "fraction", "one"),
    ("spurious_replica_fraction", "replicas entering a spurious state", "fraction", "zero"),
    ("energy_w1", "energy W1", "kcal/mol", "floor"),
    ("hr_mae", "h(r) MAE", "∫|Δh|dr", "floor"),
    ("audit_random_mae", "DFT audit |ΔE|, random frames", "kcal/mol", None),
)
#: Metrics the training-time spurious-state detector defines (the others are independent of it).
DETECTOR_KEYS = frozenset({"spurious_replica_fraction", "lowest_energy_rel_dft_min"})
FLOOR = "floor"


@dataclass(frozen=True)
class ReportKey:
    """One report found on disk: a run at one temperature setting (as written in params.yaml), its arms."""

    molecule: str
    size: int
    seed: int
    temperature: str
    arms: tuple[str, ...]

    @property
    def rel(self) -> str:
        return f"{self.molecule}/n{self.size}/s{self.seed}"

    @property
    def report_html(self) -> str:
        """Report page relative to reports/ (where index.html lives)."""
        return f"{self.rel}/{temperature_folder(self.temperature)}.html"


def t_rank(setting: str) -> float:
    """Sort key of a temperature setting: ``auto`` first, then by K."""
    v = num(setting)
    return -1.0 if v is None else v


_PATH_RE = re.compile(r"^(?P<mol>[^/]+)/n(?P<size>\d+)/s(?P<seed>\d+)/T(?P<T>[^/]+)/(?P<arm>[^/]+)/metrics\.json$")


def discover_runs(root: str | os.PathLike, declared: Mapping[str, Any] | None = None) -> list[ReportKey]:
    """Every report whose arms were evaluated, sorted by molecule, temperature, size, seed.

    ``declared`` (validated params.yaml): only its molecules, train_sizes, seeds, md.temperatures and arms
    (per-molecule overrides applied); outputs of removed settings stay on disk but leave the index.
    Without it, every ``metrics/<mol>/n<size>/s<seed>/T<T>/<arm>/metrics.json`` on disk.
    """
    root = Path(root)
    found: dict[tuple[str, int, int, str], list[str]] = {}
    if declared is not None:
        from crmse.params import for_molecule

        for mol in declared["molecules"]:
            p = for_molecule(dict(declared), mol) if "per_molecule" in declared else declared
            for size in p["train_sizes"]:
                for seed in p["seeds"]:
                    paths = RunPaths(mol, int(size), int(seed), root)
                    for T in p["md"]["temperatures"]:
                        arms = [a for a in p["arms"] if (paths.metrics_dir(T, a) / "metrics.json").exists()]
                        if arms:
                            found[(mol, int(size), int(seed), temperature_folder(T)[1:])] = arms
    else:
        base = root / "metrics"
        for path in sorted(base.glob("*/n*/s*/T*/*/metrics.json")):
            m = _PATH_RE.match(path.relative_to(base).as_posix())
            if m and m["arm"] != "reference":
                found.setdefault((m["mol"], int(m["size"]), int(m["seed"]), m["T"]), []).append(m["arm"])
    keys = [ReportKey(mol, size, seed, T, tuple(arms)) for (mol, size, seed, T), arms in found.items()]
    return sorted(keys, key=lambda k: (k.molecule, t_rank(k.temperature), k.size, k.seed))


def collect_runs(root: str | os.PathLike, keys: Sequence[ReportKey]) -> pd.DataFrame:
    """One row per (report, source), source ∈ the report's arms and ``floor`` (the noise floor).

    Columns: molecule, size, seed, temperature, rel, report, source, T_conf_reference (K), every numeric
    key of the arm's metrics.json, and the DFT audit's |E_model − E_DFT| on random unflagged frames
    (audit_random_mae, audit_random_sd, audit_random_n; kcal/mol).
    """
    root = Path(root)
    rows = []
    for key in keys:
        paths = RunPaths(key.molecule, key.size, key.seed, root)
        ref_file = paths.reference_dir(key.temperature) / "metrics.json"
        ref = read_json(ref_file) if ref_file.exists() else {}
        mse_row = paths.metrics_dir(key.temperature, "mse") / "metrics.json"
        t_ref = num(read_json(mse_row).get("T_conf_pool_laplacian")) if mse_row.exists() else None
        if t_ref is None and paths.train_metrics("mse").exists():
            t_ref = num(read_json(paths.train_metrics("mse")).get("T_conf_pool_K"))
        base = {"molecule": key.molecule, "size": key.size, "seed": key.seed, "temperature": key.temperature,
                "rel": key.rel, "report": key.report_html, "T_conf_reference": t_ref}
        for arm in key.arms:
            d = paths.metrics_dir(key.temperature, arm)
            vals = {k: num(v) for k, v in read_json(d / "metrics.json").items()}
            audit = read_json(d / "audit.json") if (d / "audit.json").exists() else None
            frames = pd.read_csv(d / "audit_frames.csv") if audit and (d / "audit_frames.csv").exists() else None
            rnd = audit_errors(audit, frames, arm).get("random", {})
            rows.append({**base, "source": arm, **vals, "audit_random_mae": num(rnd.get("mean")),
                         "audit_random_sd": num(rnd.get("sd")), "audit_random_n": rnd.get("n")})
        if "noise_floor" in ref:
            rows.append({**base, "source": FLOOR, **{k: num(v) for k, v in ref["noise_floor"].items()}})
    return pd.DataFrame(rows)


def metric_items(df: pd.DataFrame, molecule: str) -> list[tuple[str, str, str, str | None]]:
    """The headline metrics, each torsion's F(φ) RMSE and T_conf, for one molecule (those present in ``df``)."""
    items = list(HEADLINE)
    items += [(f"dihedral_{t.name}_rmse", f"F(φ) RMSE, {t.name}", "kcal/mol", "floor") for t in TORSIONS[molecule]]
    items.append(("T_conf", "T_conf of the samples", "% from the pool's", "tref"))
    return [it for it in items if it[0] in df.columns and df.loc[df["source"] != FLOOR, it[0]].notna().any()]


def temperature_text(setting: str, T_set: Any = None) -> str:
    """'auto (632 K)' or '500 K'."""
    if str(setting) == "auto":
        return f"auto ({fmt(T_set, 0)} K)" if num(T_set) is not None else "auto"
    return f"{setting} K"


def mean_sd(values: pd.Series) -> tuple[float, float]:
    """(mean, sample sd; 0 for one value; NaN for none) of the finite values."""
    v = pd.to_numeric(values, errors="coerce").dropna().to_numpy(float)
    if not len(v):
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


#: Columns of the runs table: (key, header, digits).
RUN_COLUMNS = (
    ("test_energy_mae", "test E MAE (kcal/mol)", 3), ("test_forces_mae", "test F MAE (kcal/mol/Å)", 3),
    ("stable_fraction", "bond-stable replicas", 2), ("spurious_replica_fraction", "spurious replicas ‡", 2),
    ("lowest_energy_rel_dft_min", "lowest E − DFT min ‡ (kcal/mol)", 1), ("energy_w1", "energy W1 (kcal/mol)", 2),
    ("hr_mae", "h(r) MAE", 3), ("audit_random_mae", "DFT audit |ΔE| random (kcal/mol)", 2),
)


def index_table(df: pd.DataFrame) -> pd.DataFrame:
    """Every report, one row per arm plus its noise floor; the first row of a report links to it (HTML)."""
    out = []
    for _, g in df.groupby(["molecule", "temperature", "size", "seed"], sort=False):
        first = g.iloc[0]
        T_set = g.loc[g["source"] != FLOOR, "T_set"].dropna() if "T_set" in g else pd.Series(dtype=float)
        for i, (_, r) in enumerate(g.iterrows()):
            cells = {}
            for key, head, digits in RUN_COLUMNS:
                v = r.get(key)
                cells[head] = fmt_pm(v, r.get("audit_random_sd") if key == "audit_random_mae" else None, digits)
            link = f'<a href="{html.escape(first["report"])}">{html.escape(first["rel"])}</a>'
            out.append({
                "report": link if i == 0 else "",
                "T": html.escape(temperature_text(first["temperature"], T_set.iloc[0] if len(T_set) else None))
                if i == 0 else "",
                "arm": html.escape(label(r["source"])), **cells,
            })
    return pd.DataFrame(out)


def seed_table(df: pd.DataFrame, molecule: str) -> pd.DataFrame:
    """Per temperature, training size and arm: every metric as mean ± sd over seeds (seeds counted)."""
    d = df[df["molecule"] == molecule]
    if d.empty:
        return pd.DataFrame()
    items = [it for it in metric_items(d, molecule) if it[3] != "tref"] + [("T_conf", "T_conf", "K", None)]
    rank = {s: i for i, s in enumerate(sources(d))}
    d = d.assign(_t=d["temperature"].map(t_rank), _a=d["source"].map(rank))
    d = d.sort_values(["_t", "size", "_a", "seed"], kind="stable")
    out = []
    for (T, size, src), g in d.groupby(["temperature", "size", "source"], sort=False):
        row: dict[str, Any] = {"T": temperature_text(T), "n_train": int(size), "arm": label(src),
                               "seeds": g["seed"].nunique()}
        for key, name, unit, _ in items:
            if key not in g:
                continue
            mu, sd = mean_sd(g[key])
            digits = 2 if "fraction" in key or abs(mu) >= 10 else 3
            cell = fmt_pm(mu, sd if row["seeds"] > 1 else None, digits)
            row[name if unit in ("fraction", "") else f"{name} ({unit})"] = cell
        out.append(row)
    return pd.DataFrame(out)


def several_seeds(df: pd.DataFrame) -> bool:
    """Whether some (molecule, temperature, size) setting has more than one seed."""
    return not df.empty and df.groupby(["molecule", "temperature", "size"])["seed"].nunique().max() > 1


def sources(df: pd.DataFrame) -> list[str]:
    """The arms of ``df`` in first-seen order, then the noise floor when present."""
    srcs = list(dict.fromkeys(df["source"]))
    return [s for s in srcs if s != FLOOR] + [s for s in srcs if s == FLOOR]


def index_paragraph(df: pd.DataFrame) -> str:
    """Generated Markdown: how many reports, then one bullet per setting with the detector's count next to
    independent evidence."""
    if df.empty:
        return "No evaluated runs were found below metrics/."
    n = df.groupby(["rel", "temperature"]).ngroups
    parts = [f"{n} report{'s' if n != 1 else ''} (run × temperature setting)."]
    for (mol, T, size), d in df.groupby(["molecule", "temperature", "size"], sort=False):
        arms = [s for s in dict.fromkeys(d["source"]) if s != FLOOR]
        seeds = d["seed"].nunique()

        def listing(key: str, digits: int, d: pd.DataFrame = d, arms: list[str] = arms) -> str:
            return ", ".join(f"{label(a)} {fmt(mean_sd(d.loc[d['source'] == a, key])[0], digits)}" for a in arms)

        bits = [f"replicas entering a spurious state (detector-defined) {listing('spurious_replica_fraction', 2)}"]
        if "energy_w1" in d:
            bits.append(f"energy W1 (independent) {listing('energy_w1', 2)} kcal/mol")
        if "audit_random_mae" in d and d["audit_random_mae"].notna().any():
            bits.append(f"DFT audit |ΔE| on random frames (independent) {listing('audit_random_mae', 2)} kcal/mol")
        parts.append(f"**{mol}, T = {temperature_text(T)}, n_train = {size}** (mean over {seeds} "
                     f"seed{'s' if seeds != 1 else ''}): " + "; ".join(bits) + ".")
    return parts[0] + "\n\n" + "\n".join(f"- {p}" for p in parts[1:])
