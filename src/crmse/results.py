"""README's result block, generated from the committed metrics, and whether those metrics are stale.

Three commands (``python -m crmse.results <command>``; ``make results``, ``make check-readme``,
``make check-results``):

* ``write``: build the block from the small metrics files the pipeline writes (paths from
  :class:`crmse.artifacts.RunPaths`) for every run params.yaml declares — molecules × train_sizes × seeds
  × md.temperatures, each with its arms — and put it between :data:`START` and :data:`END` in README.md.
  Per run and temperature setting, one table: a row per metric, a column per arm and one for the noise
  floor. Inputs: ``metrics/<run>/<T>/<arm>/metrics.json`` (evaluate), ``.../<arm>/audit.json`` and
  ``audit_frames.csv`` (audit, when present), ``metrics/<run>/<T>/reference/metrics.json`` (its
  ``noise_floor``) and, for ``auto``, ``models/<run>/mse_metrics.json`` (the resolved temperature). The
  block names the commit that last changed ``dvc.lock`` and says "stale" when ``dvc status`` reports a
  changed dependency, parameter, command or output of a stage the tables show (:func:`classify_status`).
  Same inputs → same text: nothing in the block depends on the clock or the machine. It also draws
  :data:`FIGURE`, every table's energy distributions (reference pool and arms, from the committed
  ``plots/energy`` curves), which the block shows.
* ``check``: exit 1, printing a diff, when README's block or :data:`FIGURE` differs from what ``write`` would
  put there.
* ``fresh``: exit 1 when the committed ``dvc.lock`` does not match the code and params at HEAD for a stage
  behind the tables (:data:`RESULT_STAGES`): changed deps, params or commands fail; outputs that are
  merely absent (data, models and samples are not in git) do not.

Units: kcal/mol, kcal/mol/Å, K; h(r) MAE is ∫|Δh| dr.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import io
import json
import math
import subprocess
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crmse.artifacts import ArtifactError, RunPaths, resolve_temperature, temperature_folder
from crmse.io import read_json, write_bytes
from crmse.molecules import TORSIONS
from crmse.params import ParamsError, load_params
from crmse.report.style import fmt, fmt_pm, num

START = "<!-- results:start -->"
END = "<!-- results:end -->"
#: README's generated figure, below the project root.
FIGURE = "docs/figures/results.png"
#: Stages whose outputs the tables show, and every stage upstream of them (report and report_index are not).
RESULT_STAGES = ("check_params", "download", "split", "pretrain", "posttrain", "sample", "reference", "evaluate",
                 "audit")
#: Display names of the arms (as in the reports).
ARM_LABELS = {"mse": "MSE", "crmse": "CRMSE", "crmse_memory": "CRMSE + memory"}
DASH = "—"
#: Output states that only mean "not on this machine" (data, models, samples are not in git).
ABSENT = frozenset({"deleted", "not in cache"})


class ResultsError(ValueError):
    """A metrics file of a declared run is missing or unreadable, or README has no (valid) marker pair."""


# ----------------------------------------------------------------------------------------------------
# Reading the metrics


@dataclass(frozen=True)
class RunResults:
    """The metrics of one run at one temperature setting: what one table shows.

    ``arms[arm]`` is the arm's evaluate row; ``audits[arm]`` its audit.json (None: absent);
    ``audit_sd[arm]`` the sample sd (kcal/mol) of |model − DFT| over its converged random audited frames
    from audit_frames.csv (None: no table or fewer than two frames); ``temperature_K`` the resolved setting.
    """

    paths: RunPaths
    temperature: str
    temperature_K: float
    reference: dict[str, Any]
    arms: dict[str, dict[str, Any]]
    audits: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    audit_sd: dict[str, float | None] = field(default_factory=dict)


def declared_runs(params: Mapping[str, Any]) -> list[tuple[RunPaths, str]]:
    """(run, temperature setting) of every table, in params.yaml's order (molecule, size, seed, temperature)."""
    return [
        (RunPaths(mol, int(size), int(seed)), str(t))
        for mol in params["molecules"]
        for size in params["train_sizes"]
        for seed in params["seeds"]
        for t in params["md"]["temperatures"]
    ]


def _read(path: Path) -> dict[str, Any]:
    try:
        data = read_json(path)
    except (OSError, ValueError) as exc:
        raise ResultsError(f"{path}: unreadable metrics file ({exc})") from exc
    if not isinstance(data, dict):
        raise ResultsError(f"{path}: expected a JSON object")
    return data


def _random_audit_sd(path: Path, arm: str) -> float | None:
    """Sample sd (kcal/mol) of |model − DFT| over ``arm``'s converged, unflagged random frames in audit_frames.csv."""
    if not path.exists():
        return None
    errs = []
    with open(path, newline="") as fh:
        for row in csv.DictReader(fh):
            if (row.get("model") == arm and row.get("kind") == "random" and row.get("status") == "ok"
                    and str(row.get("spurious")).lower() not in ("true", "1")):
                value = num(row.get("model_minus_dft"))
                if value is not None:
                    errs.append(abs(value))
    if len(errs) < 2:
        return None
    mean = sum(errs) / len(errs)
    return math.sqrt(sum((e - mean) ** 2 for e in errs) / (len(errs) - 1))


def collect(params: Mapping[str, Any], root: str | Path = ".") -> list[RunResults]:
    """The metrics of every declared run below ``root``; raise :class:`ResultsError` naming every missing file."""
    runs, missing = [], []
    for run, t in declared_runs(params):
        paths = RunPaths(run.molecule, run.size, run.seed, Path(root))
        needed = [paths.reference_dir(t) / "metrics.json"]
        needed += [paths.metrics_dir(t, arm) / "metrics.json" for arm in params["arms"]]
        if t == "auto":
            needed.append(paths.train_metrics("mse"))
        absent = [str(p) for p in needed if not p.exists()]
        if absent:
            missing += absent
            continue
        try:
            t_K = resolve_temperature(t, paths)
        except (ArtifactError, KeyError, ValueError) as exc:
            raise ResultsError(f"temperature {t} of {paths.rel}: {exc}") from exc
        arms, audits, sds = {}, {}, {}
        for arm in params["arms"]:
            folder = paths.metrics_dir(t, arm)
            arms[arm] = _read(folder / "metrics.json")
            audits[arm] = _read(folder / "audit.json") if (folder / "audit.json").exists() else None
            sds[arm] = _random_audit_sd(folder / "audit_frames.csv", arm)
        runs.append(RunResults(paths, t, t_K, _read(needed[0]), arms, audits, sds))
    if missing:
        raise ResultsError("metrics of declared runs are missing (run `make repro`, or commit its metrics): "
                           + ", ".join(missing))
    return runs


# ----------------------------------------------------------------------------------------------------
# Formatting


def fmt_count(fraction: Any, n: Any) -> str:
    """A fraction of ``n`` replicas as 'k/n' (k = round(fraction × n)); '—' when undefined."""
    f, m = num(fraction), num(n)
    if f is None or m is None:
        return DASH
    return f"{round(f * m)}/{int(m)}"


def _audit_cell(audit: Mapping[str, Any] | None, arm: str, sd: float | None) -> str:
    """'mean ± sd (n=k)' of |model − DFT| (kcal/mol) on the arm's random audited frames."""
    if audit is None:
        return DASH
    if audit.get("skipped"):
        return "not audited"
    models = audit.get("models") or {}
    rnd = (models.get(arm) or {}).get("random") or {}
    n = int(rnd.get("n") or 0) - int(rnd.get("n_failed") or 0)
    if num(rnd.get("energy_mae")) is None or n < 1:
        return DASH
    return f"{fmt_pm(rnd['energy_mae'], sd)} (n={n})"


def _audit_floor(audits: Mapping[str, Mapping[str, Any] | None]) -> str:
    """|label − aligned DFT| (kcal/mol) on the pool frames that fix the audit's offset: the audit's floor."""
    for audit in audits.values():
        off = (audit or {}).get("offset") or {}
        if num(off.get("label_energy_mae")) is not None:
            return f"{fmt(off['label_energy_mae'])} (n={off.get('n', '?')})"
    return DASH


def render_table(run: RunResults) -> str:
    """One run's markdown table: a row per metric, a column per arm, then the noise floor."""
    arms = list(run.arms)
    floor = run.reference.get("noise_floor") or {}
    rows: list[tuple[str, list[str], str]] = []

    def row(label: str, cell: Any, floor_cell: str = DASH) -> None:
        rows.append((label, [cell(arm, run.arms[arm]) for arm in arms], floor_cell))

    def pm(key: str) -> Any:
        return lambda _arm, m: fmt_pm(m.get(key), m.get(f"{key}_boot_sd"))

    row("test energy MAE (kcal/mol)", lambda _a, m: fmt(m.get("test_energy_mae")))
    row("test force MAE (kcal/mol/Å)", lambda _a, m: fmt(m.get("test_forces_mae")))
    row("replicas entering a spurious state", lambda _a, m: fmt_count(m.get("spurious_replica_fraction"),
                                                                       m.get("n_replicas")))
    row("lowest sampled energy − DFT minimum (kcal/mol)", lambda _a, m: fmt(m.get("lowest_energy_rel_dft_min")))
    row("bond-stable replicas", lambda _a, m: fmt_count(m.get("stable_fraction"), m.get("n_replicas")))
    row("energy W1 (kcal/mol)", pm("energy_w1"), fmt(floor.get("energy_w1")))
    row("h(r) MAE", pm("hr_mae"), fmt(floor.get("hr_mae")))
    for torsion in TORSIONS.get(run.paths.molecule, ()):
        key = f"dihedral_{torsion.name}_rmse"
        row(f"F(φ) RMSE, {torsion.name} (kcal/mol)", pm(key), fmt(floor.get(key)))
    row("DFT audit energy MAE, random frames (kcal/mol)",
        lambda arm, _m: _audit_cell(run.audits.get(arm), arm, run.audit_sd.get(arm)), _audit_floor(run.audits))
    head = ["", *(ARM_LABELS.get(a, a) for a in arms), "noise floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([label, *cells, fl]) + " |" for label, cells, fl in rows]
    return "\n".join(lines)


def run_title(run: RunResults) -> str:
    """The heading line of a table: molecule, training size, seed, temperature setting and its value in K."""
    p = run.paths
    return (f"**{p.molecule}** — n_train {p.size}, seed {p.seed}, sampled at `{temperature_folder(run.temperature)}`"
            f" = {run.temperature_K:.1f} K")


def render_figure(runs: Sequence[RunResults]) -> bytes:
    """PNG of every table's energy distributions, one panel per table, two per row (same inputs → same bytes)."""
    from crmse.report.figures import draw_energy
    from crmse.report.run import RunData
    from crmse.report.style import DPI, new_figure

    ncols = min(2, max(1, len(runs)))
    nrows = max(1, math.ceil(len(runs) / ncols))
    fig, axes = new_figure(nrows, ncols, 6.5 * ncols, 4.6 * nrows)
    for ax, run in zip(axes.flat, runs, strict=False):
        # draw_energy reads only the energy curves, the reference pool's size, each arm's W1 and the noise floor
        data = RunData(paths=run.paths, temperature=run.temperature, arms=tuple(run.arms), params={}, rows=run.arms,
                       reference=run.reference.get("reference") or {}, noise_floor=run.reference.get("noise_floor")
                       or {}, train={}, logs={}, val={}, replicas={}, worst={})
        draw_energy(ax, data)
        ax.set_title(f"{run.paths.molecule}, n_train {run.paths.size}, seed {run.paths.seed}, "
                     f"{temperature_folder(run.temperature)} = {run.temperature_K:.0f} K\n" + ax.get_title(),
                     fontsize=10)
    for ax in list(axes.flat)[len(runs):]:
        ax.set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})  # no matplotlib version in the bytes
    return buf.getvalue()


def render_block(runs: Sequence[RunResults], commit: str, stale: bool) -> str:
    """The text between the markers (without them): provenance line, one table per run, the legend."""
    source = (f"commit `{commit}`, the last to change `dvc.lock`" if commit
              else "a `dvc.lock` that no commit holds yet")
    parts = ["<!-- Generated by `make results` from the committed metrics; edit src/crmse/results.py, not this. -->",
             f"Numbers from the run recorded in {source}."
             + (" **Stale:** code or params changed since that run (`make check-results` names the stages; "
                "`make repro` redoes it)." if stale else "")]
    for run in runs:
        parts += [run_title(run), render_table(run)]
    if runs:
        parts.append(f"![Energy distributions of the DFT reference pool and of every arm's samples]({FIGURE})")
    parts.append("k/M: replicas of M. ± : standard deviation over bootstrap resamples of the replicas (audit: "
                 "sample sd over the n converged random frames). Noise floor: the same metric between two halves "
                 "of the DFT reference pool (audit: |label − DFT| on the pool frames that fix the DFT offset).")
    return "\n\n".join(parts) + "\n"


def replace_block(text: str, block: str) -> str:
    """``text`` with everything between :data:`START` and :data:`END` replaced by ``block``; the rest untouched."""
    n_start, n_end = text.count(START), text.count(END)
    if n_start != 1 or n_end != 1:
        raise ResultsError(f"README needs exactly one {START} and one {END} line (found {n_start} and {n_end})")
    i, j = text.index(START) + len(START), text.index(END)
    if j < i:
        raise ResultsError(f"README: {END} comes before {START}")
    return text[:i] + "\n" + block + text[j:]


# ----------------------------------------------------------------------------------------------------
# Freshness: dvc status --json


@dataclass(frozen=True)
class Change:
    """One entry of ``dvc status --json`` for one stage.

    ``kind``: code (a dependency file), params (a declared parameter, or a whole params file), data (an
    upstream output differs from dvc.lock), output (an output of the stage differs), command, not locked
    (the stage has no dvc.lock entry), absent (a dependency or output not on this machine), always changed,
    other. ``failing``: whether it makes the committed results stale.
    """

    stage: str
    kind: str
    path: str
    status: str
    failing: bool

    def describe(self) -> str:
        return f"{self.kind}: {self.path} ({self.status})" if self.path else f"{self.kind} ({self.status})"


@dataclass(frozen=True)
class Freshness:
    """The classified entries of the result stages that ``dvc status`` lists (stages up to date are not listed)."""

    changes: tuple[Change, ...]

    @property
    def failures(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if c.failing)

    @property
    def ok(self) -> bool:
        return not self.failures

    def report(self) -> str:
        """Failures grouped by what changed (each naming its stages), then a one-line summary."""
        groups: dict[str, list[str]] = {}
        for c in self.failures:
            groups.setdefault(c.describe(), []).append(c.stage)
        lines = [f"STALE {what}: {', '.join(stages)}" for what, stages in groups.items()]
        absent = sorted({c.stage for c in self.changes if c.kind == "absent"})
        if absent:
            lines.append(f"ok: {len(absent)} stage(s) only miss outputs or inputs that are not in git (data, "
                         "models, samples): not a failure")
        lines.append("results are stale: dvc.lock does not match HEAD for the stages above" if self.failures
                     else "results are fresh: dvc.lock matches the code and params at HEAD for every result stage")
        return "\n".join(lines)


def stage_base(name: str) -> str:
    """``evaluate`` of ``evaluate@ethanol-200-0-auto-mse`` (and of ``dvc.yaml:evaluate@…``)."""
    return name.rsplit(":", 1)[-1].split("@", 1)[0]


def _under(path: str, roots: Collection[str]) -> bool:
    path = path.rstrip("/")
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def classify_status(
    status: Mapping[str, Any],
    stages: Collection[str] = RESULT_STAGES,
    produced: Collection[str] | None = None,
    locked: Collection[str] | None = None,
    params_files: Collection[str] = ("params.yaml",),
) -> Freshness:
    """Classify ``dvc status --json`` (parsed) for the stages whose base name is in ``stages``.

    DVC's format (3.x): ``{stage: [{"changed deps": {path: state, params_file: {key: state}}},
    {"changed outs": {path: state}}, "changed command", "always changed"]}``; states are modified, new,
    deleted and (outs) not in cache. Failing: a changed dependency file or parameter, a changed command, an
    output that differs from dvc.lock, a stage with no dvc.lock entry (when ``locked`` is given). Not
    failing: outputs deleted or not in cache, deleted dependencies that a stage produces (``produced``:
    out paths from dvc.lock; None = every deleted dependency counts as absent data), always changed.
    """
    changes: list[Change] = []
    for stage, entries in status.items():
        if stage_base(stage) not in stages:
            continue
        if locked is not None and stage not in locked:
            changes.append(Change(stage, "not locked", "", "no dvc.lock entry: never run, or its run not committed",
                                  True))
            continue
        for entry in entries if isinstance(entries, list) else [entries]:
            if isinstance(entry, str):
                kind = {"always changed": "always changed", "changed command": "command"}.get(entry, "other")
                changes.append(Change(stage, kind, "", entry, kind != "always changed"))
                continue
            if not isinstance(entry, Mapping):
                changes.append(Change(stage, "other", "", repr(entry), True))
                continue
            for group, items in entry.items():
                for path, state in (items or {}).items():
                    changes += _classify_item(stage, group, path, state, produced, params_files)
    return Freshness(tuple(changes))


def _classify_item(stage: str, group: str, path: str, state: Any, produced: Collection[str] | None,
                   params_files: Collection[str]) -> list[Change]:
    if isinstance(state, Mapping):  # a params file: {key: state}
        return [Change(stage, "params", f"{path}:{key}", str(s), True) for key, s in state.items()]
    state = str(state)
    if group == "changed outs":
        return [Change(stage, "absent" if state in ABSENT else "output", path, state, state not in ABSENT)]
    if group != "changed deps":
        return [Change(stage, "other", path, f"{group}: {state}", True)]
    is_produced = produced is not None and _under(path, produced)
    if state == "deleted" and (produced is None or is_produced):
        return [Change(stage, "absent", path, state, False)]
    kind = "params" if path in params_files else "data" if is_produced else "code"
    return [Change(stage, kind, path, state, True)]


def lock_contents(root: str | Path = ".") -> tuple[set[str], set[str]]:
    """(stage names, output paths) recorded in ``root/dvc.lock`` (empty sets when there is none)."""
    path = Path(root) / "dvc.lock"
    if not path.exists():
        return set(), set()
    lock = yaml.safe_load(path.read_text()) or {}
    stages = lock.get("stages") or {}
    outs = {o["path"] for s in stages.values() for o in (s.get("outs") or []) if "path" in o}
    return set(stages), outs


def dvc_status(root: str | Path = ".") -> dict[str, Any]:
    """``dvc status --json`` of the project at ``root``, parsed (run with this interpreter's DVC)."""
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ResultsError(f"dvc status failed (exit {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    out = proc.stdout.strip()
    try:
        return json.loads(out) if out else {}
    except json.JSONDecodeError as exc:
        raise ResultsError(f"dvc status --json printed no JSON: {out[:500]}") from exc


def freshness(root: str | Path = ".") -> Freshness:
    """Classify the result stages' ``dvc status`` at ``root`` against its dvc.lock."""
    locked, produced = lock_contents(root)
    return classify_status(dvc_status(root), produced=produced, locked=locked)


# ----------------------------------------------------------------------------------------------------
# git


def _git(root: str | Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)
    if proc.returncode != 0:
        raise ResultsError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def lock_commit(root: str | Path = ".") -> str:
    """Short hash of the last commit that changed dvc.lock ('' if none).

    Seven hex digits, more only if ambiguous: git's automatic length grows with the object count, which
    would change the block between clones.
    """
    return _git(root, "log", "-1", "--abbrev=7", "--format=%h", "--", "dvc.lock")


def lock_uncommitted(root: str | Path = ".") -> bool:
    """Whether dvc.lock differs from HEAD's (staged or not)."""
    return bool(_git(root, "status", "--porcelain", "--", "dvc.lock"))


# ----------------------------------------------------------------------------------------------------
# Commands


def generate(root: str | Path = ".", readme: str | Path = "README.md", params: str | Path = "params.yaml",
             commit: str | None = None, stale: bool | None = None) -> tuple[str, str, bytes]:
    """(README's current text, the text with a freshly generated block, :data:`FIGURE`'s PNG bytes);
    ``commit``/``stale`` None: ask git/DVC."""
    root = Path(root)
    readme_path = root / readme
    if not readme_path.exists():
        raise ResultsError(f"{readme_path} not found")
    try:
        declared = load_params(root / params)
    except ParamsError as exc:
        raise ResultsError(str(exc)) from exc
    runs = collect(declared, root)
    commit = lock_commit(root) if commit is None else commit
    stale = (not freshness(root).ok) if stale is None else stale
    text = readme_path.read_text()
    return text, replace_block(text, render_block(runs, commit, stale)), render_figure(runs)


def diff(old: str, new: str, name: str = "README.md") -> str:
    """Unified diff of README's block as it is → as the generator makes it."""
    return "".join(difflib.unified_diff(old.splitlines(True), new.splitlines(True), f"{name} (committed)",
                                        f"{name} (generated)"))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("write", "check", "fresh"),
                        help="write README's block | check it against the metrics | check dvc.lock against HEAD")
    parser.add_argument("--root", default=".", help="project root (default: .)")
    parser.add_argument("--readme", default="README.md", help="README path below the root")
    args = parser.parse_args(argv)
    try:
        if lock_uncommitted(args.root):
            print("warning: dvc.lock has uncommitted changes: this compares the working copy's, and README names "
                  "the last commit that changed it. Commit the run (dvc.lock and its metrics) first, then rerun "
                  "`make results`.", file=sys.stderr)
        if args.command == "fresh":
            result = freshness(args.root)
            print(f"dvc.lock of commit {lock_commit(args.root) or '(none)'} against HEAD, stages "
                  + ", ".join(RESULT_STAGES))
            print(result.report())
            return 0 if result.ok else 1
        old, new, png = generate(args.root, args.readme)
    except ResultsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    figure = Path(args.root) / FIGURE
    same_figure = figure.exists() and figure.read_bytes() == png
    if args.command == "check":
        if old != new:
            sys.stdout.write(diff(old, new, args.readme))
            print(f"\n{args.readme}'s result block differs from the committed metrics: run `make results`",
                  file=sys.stderr)
        if not same_figure:
            print(f"{FIGURE} {'differs from' if figure.exists() else 'is missing; it is drawn from'} the committed "
                  "metrics: run `make results`", file=sys.stderr)
        if old != new or not same_figure:
            return 1
        print(f"{args.readme}'s result block and {FIGURE} match the committed metrics")
        return 0
    if not same_figure:
        write_bytes(figure, png)
        print(f"{FIGURE}: drawn")
    if old != new:
        (Path(args.root) / args.readme).write_text(new)
        print(f"{args.readme}: result block updated")
    else:
        print(f"{args.readme}: result block already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
