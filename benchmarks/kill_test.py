"""Kill test: ``kill -9`` every stage kind of the tiny synthetic pipeline at a random point, rerun, compare bytes.

The project is the one tests/test_pipeline_e2e.py builds (its TINY params, one molecule of synthetic data from
tests/synthetic.py, a private DVC repository in a temporary folder), with ``md.temperatures: [auto]`` only.

1. Project A: ``dvc repro`` uninterrupted; the sha256 of every compared artifact is recorded, and each stage's
   duration (from the time its "Running stage" line appears to the next one).
2. Project B: ``dvc repro`` uninterrupted again, compared with A: the *control* row. What differs here differs
   without any kill (wall times, hash-seed-dependent bytes); later rows say which of their differences the
   control shares.
3. For each stage kind X (download, split, ..., report_index), in B: X and every stage downstream of it are
   returned to "never ran" (their outputs deleted, their dvc.lock entries dropped, DVC's run cache emptied, and the
   DFT cache emptied when the audit is among them), so a plain ``dvc repro`` runs exactly X and what follows. That
   ``dvc repro`` is started in a new session; once its stdout says "Running stage 'X@..." (or 'X'), the script
   sleeps a seeded random fraction (5-95 %) of the first X stage's duration in A and sends SIGKILL to the whole
   process group (if the machine ran faster than in A and the kind was over by then, the stages are un-run again
   and the kill retried with half the delay, up to 3 tries). Then it lists what the kill left behind
   (``.<name>.<random>.tmp`` files of ``crmse.io.atomic_path``, ``.<name>.part`` downloads, hidden ``.partial``
   sample folders, new entries in the stages' TMPDIR, DVC's rwlock entries, surviving processes), reruns plain
   ``dvc repro`` to completion (removing a stale DVC lock only if DVC refuses to run and names it), checks that
   ``dvc status`` is clean and that no debris is left in the project, and compares the sha256 of every artifact of
   the rerun stages with A's.

Compared artifacts: every file under data/, models/, results/, metrics/ and reports/ (raw bytes) except hidden
files; the wall-time records under timings/ are not artifacts.
A row fails when the stage was not killed, the rerun fails, debris is left in the project after the rerun, or any
compared file differs; differing files are explained field by field (JSON keys, CSV columns, npz arrays).

Usage (from the repository root; the pipeline runs single-threaded)::

    OMP_NUM_THREADS=1 nice -n 19 .venv/bin/python benchmarks/kill_test.py
    .venv/bin/python benchmarks/kill_test.py --stages sample audit --seed 7 --keep /tmp/kill

``--stages`` picks a subset of the kinds, ``--seed`` fixes the kill delays (printed either way; where a delay lands
still depends on the machine's speed at the time), ``--keep DIR`` builds the projects in DIR and leaves them there
(default: a temporary folder, removed at the end). Exit status 0 when every row passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from synthetic import write_synthetic_npz  # noqa: E402
from test_pipeline_e2e import TINY as E2E_TINY  # noqa: E402

PYTHON = sys.executable
DVC = [PYTHON, "-m", "dvc"]

# tests/test_pipeline_e2e.py's tiny pipeline, with the main temperature only.
TINY: dict[str, Any] = {**E2E_TINY, "md": {**E2E_TINY["md"], "temperatures": ["auto"]}}

KINDS = ("download", "split", "pretrain", "posttrain", "sample", "reference", "evaluate", "audit", "report",
         "report_index")
# Stage kinds downstream of each kind (from dvc.yaml's deps; check_params is upstream of everything).
DOWNSTREAM: dict[str, tuple[str, ...]] = {
    "download": KINDS[1:],
    "split": KINDS[2:],
    "pretrain": ("posttrain", "sample", "reference", "evaluate", "audit", "report", "report_index"),
    "posttrain": ("sample", "evaluate", "audit", "report", "report_index"),
    "sample": ("evaluate", "audit", "report", "report_index"),
    "reference": ("report", "report_index"),
    "evaluate": ("report", "report_index"),
    "audit": ("report", "report_index"),
    "report": (),
    "report_index": (),
}
OUTPUT_ROOTS = ("data", "models", "results", "metrics", "reports")
RUNNING = re.compile(r"Running stage '([^']+)'")


def kind_of(stage: str) -> str:
    return stage.split("@", 1)[0]


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) else v
    return out


# --------------------------------------------------------------------------------------------------- project set-up


@dataclass
class Project:
    root: Path
    env: dict[str, str]
    dft_cache: Path
    tmpdir: Path


def snapshot(base: Path) -> Path:
    """The pipeline's code and params as they are now (both projects are built from it, so edits to the working
    tree during the run change neither), with the tiny params merged in."""
    src = base / "source"
    src.mkdir()
    for item in ("src", "pipelines", "dvc.yaml"):
        if (REPO / item).is_dir():
            shutil.copytree(REPO / item, src / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(REPO / item, src / item)
    params = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)
    (src / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return src


def make_project(base: Path, name: str, source: Path, mirror: Path) -> Project:
    """A private DVC project with the pipeline and the tiny params, as tests/test_pipeline_e2e.py sets it up."""
    proj = base / name
    shutil.copytree(source, proj)
    subprocess.run(["git", "init", "-q"], cwd=proj, check=True)
    subprocess.run([*DVC, "init", "-q"], cwd=proj, check=True)
    dft_cache, tmpdir = base / f"{name}_dft_cache", base / f"{name}_tmp"
    tmpdir.mkdir()
    env = {
        **os.environ,
        "CRMSE_DATA_MIRROR": str(mirror),
        "CRMSE_DATA_ALLOW_UNPINNED": "1",
        "PYTHONPATH": str(proj / "src"),
        "CRMSE_DFT_CACHE": str(dft_cache),
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",  # "Running stage" lines as they happen
        "DVC_NO_ANALYTICS": "1",  # no analytics daemon (it leaves temporary files behind and cannot reach anything)
        "TMPDIR": str(tmpdir),  # the stages' temporary folders (papermill's, the kernel spec's) where we can see them
        "PATH": f"{Path(PYTHON).parent}:{os.environ['PATH']}",
    }
    return Project(proj, env, dft_cache, tmpdir)


# ------------------------------------------------------------------------------------------------------ dvc repro


@dataclass
class Repro:
    rc: int | None
    lines: list[tuple[float, str]]  # (seconds since start, line)
    wall: float
    killed_in: str | None = None
    killed_after: float | None = None  # seconds after the target stage's "Running stage" line
    pid: int | None = None  # of the dvc process
    started: bool = False  # the target kind's "Running stage" line appeared

    @property
    def stages(self) -> list[tuple[float, str]]:
        return [(t, m.group(1)) for t, line in self.lines if (m := RUNNING.search(line))]

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)


def repro(p: Project, log: Path, kill: tuple[str, float] | None = None) -> Repro:
    """``dvc repro`` in ``p``; with ``kill=(kind, delay)``, SIGKILL its process group ``delay`` s into the first
    stage of that kind."""
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [*DVC, "repro"], cwd=p.root, env=p.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        bufsize=1, start_new_session=True,
    )
    lines: list[tuple[float, str]] = []
    started: dict[str, float] = {}
    seen = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        with open(log, "a") as fh:
            for line in proc.stdout:
                t = time.monotonic() - t0
                lines.append((t, line.rstrip("\n")))
                fh.write(f"[{t:8.2f}] {line}")
                fh.flush()
                if (m := RUNNING.search(line)) and kill is not None and kind_of(m.group(1)) == kill[0]:
                    started.setdefault("t", t)
                    seen.set()

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    result = Repro(None, lines, 0.0, pid=proc.pid)
    if kill is not None:
        while not seen.wait(0.05):
            if proc.poll() is not None:
                break
        if seen.is_set():
            result.started = True
            time.sleep(kill[1])
            if proc.poll() is None:
                current = [m.group(1) for _, line in list(lines) if (m := RUNNING.search(line))]
                result.killed_in = current[-1] if current else None
                result.killed_after = time.monotonic() - t0 - started["t"]
                os.killpg(proc.pid, signal.SIGKILL)
    result.rc = proc.wait()
    th.join(timeout=10)
    result.wall = time.monotonic() - t0
    return result


def dvc_status(p: Project) -> tuple[bool, str]:
    out = subprocess.run([*DVC, "status"], cwd=p.root, env=p.env, capture_output=True, text=True)
    text = (out.stdout + out.stderr).strip()
    return out.returncode == 0 and "up to date" in text, text


def stage_durations(r: Repro) -> dict[str, float]:
    """Seconds from each stage's "Running stage" line to the next one (the last: to the end of the run)."""
    st = r.stages
    ends = [t for t, _ in st[1:]] + [r.wall]
    return {name: end - t for (t, name), end in zip(st, ends, strict=True)}


def unrun(p: Project, kinds: Iterable[str]) -> tuple[list[str], list[str]]:
    """Return the stages of ``kinds`` to "never ran": outputs deleted, dvc.lock entries dropped, run cache emptied
    (the DFT cache too when the audit is among them). Returns the stage names and their outputs' paths."""
    kinds = set(kinds)
    lock_path = p.root / "dvc.lock"
    lock = yaml.safe_load(lock_path.read_text())
    names = [name for name in lock["stages"] if kind_of(name) in kinds]
    outs: list[str] = []
    for name in names:
        for out in lock["stages"][name].get("outs", []):
            outs.append(out["path"])
            path = p.root / out["path"]
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        del lock["stages"][name]
    lock_path.write_text(yaml.safe_dump(lock, sort_keys=False))
    shutil.rmtree(p.root / ".dvc" / "cache" / "runs", ignore_errors=True)
    if "audit" in kinds:
        shutil.rmtree(p.dft_cache, ignore_errors=True)
    return names, outs


# ------------------------------------------------------------------------------------------------ debris, hashes


def debris(p: Project) -> list[str]:
    """What an interrupted run can leave in the project (outside .dvc/ and .git/): ``crmse.io.atomic_path``'s
    ``.<name>.<random>.tmp`` files, the download's ``.<name>.part``, the sample stage's hidden ``.partial`` resume
    folders; and temporaries in the DFT cache. Paths relative to the project's parent."""
    found: list[str] = []
    base = p.root.parent
    for dirpath, dirnames, filenames in os.walk(p.root):
        if Path(dirpath) == p.root:
            dirnames[:] = [d for d in dirnames if d not in (".dvc", ".git")]
        for d in dirnames:
            if d.endswith(".partial"):
                found.append(f"{(Path(dirpath) / d).relative_to(base)}/ (sample resume state)")
        for f in filenames:
            if f.endswith((".tmp", ".part")):
                found.append(str((Path(dirpath) / f).relative_to(base)))
    if p.dft_cache.exists():
        found += [str(q.relative_to(base)) for q in sorted(p.dft_cache.rglob("*.tmp"))]
    return found


def tmpdir_entries(p: Project) -> set[str]:
    return {q.name + ("/" if q.is_dir() else "") for q in p.tmpdir.iterdir()}


def dvc_locks(p: Project, pid: int | None) -> list[str]:
    """Entries the killed ``dvc repro`` (``pid``) left in DVC's rwlock (DVC itself drops the entries of dead pids for
    the paths it next locks, with a warning; the others stay). .dvc/tmp/lock is not listed: it stays after every run
    (an flock, free once its holder is gone)."""
    rw = p.root / ".dvc" / "tmp" / "rwlock"
    if not rw.exists():
        return []
    try:
        info = json.loads(rw.read_text() or "{}")
    except json.JSONDecodeError:
        return [f".dvc/tmp/rwlock is not JSON: {rw.read_text()[:80]!r}"]
    entries = [(path, e["pid"]) for mode in ("read", "write") for path, es in info.get(mode, {}).items()
               for e in (es if isinstance(es, list) else [es])]
    mine = sum(1 for _, q in entries if q == pid)
    older = len(entries) - mine
    if not entries:
        return []
    return [f".dvc/tmp/rwlock: {mine} path(s) locked by the killed dvc" + (f" (+{older} of earlier kills)" if older
                                                                           else "")]


def survivors(base: Path) -> list[tuple[int, str]]:
    """Processes of this user, other than this script, whose working folder or command line is below ``base``."""
    me, uid, found = os.getpid(), os.getuid(), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            if d.stat().st_uid != uid:
                continue
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            cwd = os.readlink(d / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(base)) or str(base) in cmd:
            found.append((int(d.name), cmd[:160]))
    return found


def reap(base: Path, grace: float = 15.0) -> list[str]:
    """Wait up to ``grace`` s for processes the kill missed (e.g. a Jupyter kernel, which its launcher starts in a
    session of its own) to exit by themselves; SIGKILL the rest by pid. Returns what was seen."""
    seen: dict[int, str] = {}
    deadline = time.monotonic() + grace
    while (alive := survivors(base)) and time.monotonic() < deadline:
        seen.update(alive)
        time.sleep(0.5)
    killed = set()
    for pid, cmd in survivors(base):
        seen[pid] = cmd
        try:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        except ProcessLookupError:
            pass
    fate = {pid: f"still alive after {grace:.0f} s, killed" if pid in killed else "exited by itself" for pid in seen}
    return [f"process {pid} outlived the kill ({fate[pid]}): {cmd}" for pid, cmd in seen.items()]


def artifact_hashes(p: Project) -> dict[str, str]:
    """sha256 of every compared artifact (relative path -> hex)."""
    out: dict[str, str] = {}
    for root in OUTPUT_ROOTS:
        for path in sorted((p.root / root).rglob("*")):
            rel = path.relative_to(p.root)
            if not path.is_file() or path.name == ".gitignore" or any(part.startswith(".") for part in rel.parts):
                continue
            out[str(rel)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _flat(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict | list):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj)
        out: dict[str, Any] = {}
        for k, v in items:
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: obj}


@dataclass(frozen=True)
class Diff:
    path: str
    fields: frozenset[str]  # what differs: JSON keys, CSV columns, npz arrays, or {"bytes"}
    text: str

    def pairs(self) -> set[tuple[str, str]]:
        return {(self.path, f) for f in self.fields}


def explain(rel: str, a: Path, b: Path) -> Diff:
    """What differs between two versions of an artifact, field by field where the format allows."""
    name = a.name
    try:
        if name.endswith((".json", ".ipynb")):
            fa, fb = _flat(json.loads(a.read_text())), _flat(json.loads(b.read_text()))
            keys = sorted(k for k in fa.keys() | fb.keys() if fa.get(k, "<absent>") != fb.get(k, "<absent>"))
            generic = frozenset(re.sub(r"\.\d+(?=\.|$)", ".#", k) for k in keys)
            shown = ", ".join(f"{k}: {fa.get(k, '<absent>')!r} -> {fb.get(k, '<absent>')!r}"[:120] for k in keys[:4])
            return Diff(rel, generic, f"{len(keys)} key(s) differ: {shown}" + (" ..." if len(keys) > 4 else ""))
        if name.endswith(".csv"):
            ra, rb = list(csv.reader(io.StringIO(a.read_text()))), list(csv.reader(io.StringIO(b.read_text())))
            if len(ra) != len(rb) or (ra and ra[0] != rb[0]):
                return Diff(rel, frozenset({"shape"}), f"shape or header differ: {len(ra)} vs {len(rb)} rows")
            header = ra[0]
            cols = {header[j] for x, y in zip(ra[1:], rb[1:], strict=True)
                    for j, (u, v) in enumerate(zip(x, y, strict=False)) if u != v}
            example = next(((header[j], u, v) for x, y in zip(ra[1:], rb[1:], strict=True)
                            for j, (u, v) in enumerate(zip(x, y, strict=False)) if u != v), None)
            return Diff(rel, frozenset(cols), f"column(s) {', '.join(sorted(cols))} differ (e.g. {example})")
        if name.endswith(".npz"):
            with np.load(a, allow_pickle=False) as za, np.load(b, allow_pickle=False) as zb:
                keys = sorted(k for k in set(za.files) | set(zb.files) if k not in za.files or k not in zb.files
                              or not np.array_equal(za[k], zb[k], equal_nan=True))
            if keys:
                return Diff(rel, frozenset(keys), f"array(s) {', '.join(keys)} differ")
            return Diff(rel, frozenset({"zip bytes"}), "same arrays, other zip bytes")
        if name.endswith(".html"):
            return Diff(rel, frozenset({"html"}), "rendered report differs beyond the injected cell's id")
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        return Diff(rel, frozenset({"bytes"}), f"bytes differ ({type(exc).__name__} while comparing: {exc})")
    return Diff(rel, frozenset({"bytes"}), "bytes differ")


def compare(ref: Project, ref_hashes: dict[str, str], p: Project, only: list[str] | None = None) -> list[Diff]:
    """Artifacts of ``p`` that differ from ``ref``'s (restricted to the paths ``only`` and below, if given)."""
    got = artifact_hashes(p)

    def wanted(rel: str) -> bool:
        return only is None or any(rel == o or rel.startswith(o.rstrip("/") + "/") for o in only)

    diffs = [Diff(k, frozenset({"missing"}), "missing") for k in sorted(ref_hashes.keys() - got.keys()) if wanted(k)]
    diffs += [Diff(k, frozenset({"extra"}), "extra file") for k in sorted(got.keys() - ref_hashes.keys()) if wanted(k)]
    diffs += [explain(k, ref.root / k, p.root / k) for k in sorted(ref_hashes.keys() & got.keys())
              if ref_hashes[k] != got[k] and wanted(k)]
    return diffs


# ------------------------------------------------------------------------------------------------------ the test


@dataclass
class Row:
    stage: str
    delay: float | None = None
    killed_in: str | None = None
    killed_after: float | None = None
    leftovers: list[str] = field(default_factory=list)
    rerun_ok: bool = False
    rerun_note: str = ""
    after_rerun: list[str] = field(default_factory=list)
    diffs: list[Diff] = field(default_factory=list)
    as_control: int = 0  # differing files whose every differing field also differs in the control
    completed: bool = False  # the killed stage had finished and been recorded before the kill landed
    attempts: int = 1  # kills tried (one due after the kind finished is retried with half the delay)
    wall: float = 0.0

    @property
    def ok(self) -> bool:
        tested = self.stage == "control" or (self.killed_in is not None and kind_of(self.killed_in) == self.stage)
        return tested and self.rerun_ok and not self.after_rerun and not self.diffs


def recover(p: Project, log: Path) -> tuple[bool, str, list[str]]:
    """Plain ``dvc repro`` to completion (once more after removing a stale lock DVC names), then ``dvc status``."""
    r = repro(p, log)
    note = ""
    if r.rc != 0:
        m = re.search(r"(\.dvc/tmp/(?:rw)?lock)", r.text)
        if m and re.search(r"busy|lock", r.text, re.IGNORECASE):
            note = f"dvc refused to run ({m.group(1)} held by a dead process); removed it and reran. "
            print(f"    {note}", flush=True)
            (p.root / m.group(1)).unlink(missing_ok=True)
            r = repro(p, log)
    ran = [s for _, s in r.stages]
    if r.rc != 0:
        return False, note + f"dvc repro exit {r.rc}: " + r.text[-600:].replace("\n", " | "), ran
    clean, status = dvc_status(p)
    if not clean:
        return False, note + "dvc status after the rerun: " + status[:300].replace("\n", " | "), ran
    stale = len(re.findall(r"had been killed\. Auto removed it from the lock file", r.text))
    if stale:
        note += f"DVC auto-removed {stale} stale rwlock entr{'y' if stale == 1 else 'ies'} of the killed pid; "
    return True, note + f"{len(ran)} stage(s) ran", ran


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def print_table(rows: list[Row]) -> None:
    print("\n| stage | killed after (s) | leftovers after the kill | rerun ok | debris after the rerun "
          "| artifacts identical |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r.stage == "control":
            after = "— (not killed)"
        elif r.killed_in is None:
            after = "not killed"
        else:
            where = "" if kind_of(r.killed_in) == r.stage else f", already in {r.killed_in}"
            after = f"{r.killed_after:.2f}{where}" + (f" (attempt {r.attempts})" if r.attempts > 1 else "") + (
                f" ({r.killed_in} had just finished)" if r.completed else "")
        left = "; ".join(r.leftovers) or "none"
        if not r.diffs:
            ident = "yes"
        else:
            beyond = len(r.diffs) - r.as_control
            ident = f"**no**: {len(r.diffs)} file(s)" + (
                "" if r.stage == "control" else f", {r.as_control} as in the control, {beyond} beyond")
        rerun = "yes" if r.rerun_ok else "**no**"
        print(f"| {r.stage} | {after} | {_cell(left)} | {rerun} | {_cell('; '.join(r.after_rerun) or 'none')} "
              f"| {ident} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", nargs="+", choices=KINDS, default=list(KINDS), help="stage kinds to kill")
    ap.add_argument("--seed", type=int, default=None, help="seed of the kill delays (default: random, printed)")
    ap.add_argument("--keep", type=Path, default=None, help="build the projects in this (new) folder and keep them")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    kinds = [k for k in KINDS if k in args.stages]
    print(f"kill test: seed {seed}, stages {' '.join(kinds)}", flush=True)
    t_start = time.monotonic()

    if args.keep is not None:
        args.keep.mkdir(parents=True)
        base = args.keep.resolve()
    else:
        base = Path(tempfile.mkdtemp(prefix="crmse-kill-"))
    print(f"projects in {base}", flush=True)
    mirror = base / "mirror"
    write_synthetic_npz(mirror / "md17_ethanol.npz", n=150)
    try:
        source = snapshot(base)
        a = make_project(base, "A", source, mirror)
        print("A: dvc repro (uninterrupted) ...", flush=True)
        ra = repro(a, base / "A.log")
        if ra.rc != 0:
            print(ra.text[-3000:])
            print("A failed: nothing to compare with")
            return 1
        first: dict[str, tuple[str, float]] = {}
        for name, d in stage_durations(ra).items():
            first.setdefault(kind_of(name), (name, d))
        print(f"A: {ra.wall:.0f} s; the first stage of each kind and its duration:", flush=True)
        for k in KINDS:
            if k in first:
                print(f"    {k:13s} {first[k][0]:42s} {first[k][1]:6.1f} s")
        ref_hashes = artifact_hashes(a)
        print(f"compared artifacts: {len(ref_hashes)} files", flush=True)

        b = make_project(base, "B", source, mirror)
        print("B: dvc repro (uninterrupted: the control) ...", flush=True)
        control = Row("control")
        t0 = time.monotonic()
        rb = repro(b, base / "B.log")
        control.rerun_ok = rb.rc == 0 and dvc_status(b)[0]
        control.rerun_note = f"dvc repro exit {rb.rc}"
        if rb.rc != 0:
            print(rb.text[-3000:])
        control.diffs = compare(a, ref_hashes, b)
        control.after_rerun = debris(b)
        control.wall = time.monotonic() - t0
        for d in control.diffs:
            print(f"    control differs: {d.path}: {d.text}", flush=True)
        intrinsic = set().union(*(d.pairs() for d in control.diffs))
        rows = [control]

        for kind in kinds:
            row = Row(kind)
            rows.append(row)
            t0 = time.monotonic()
            if kind not in first:
                row.rerun_note = "the stage never ran in A"
                continue
            row.delay = rng.uniform(0.05, 0.95) * first[kind][1]
            log = base / f"B_{kind}.log"
            for attempt in range(1, 4):
                names, outs = unrun(b, (kind, *DOWNSTREAM[kind]))
                before = artifact_hashes(b)
                tmp_before = tmpdir_entries(b)
                print(f"\n[{kind}] un-ran {len(names)} stage(s); kill {row.delay:.2f} s into {kind} "
                      f"(its first stage took {first[kind][1]:.1f} s in A)", flush=True)
                rk = repro(b, log, kill=(kind, row.delay))
                row.killed_in, row.killed_after = rk.killed_in, rk.killed_after
                if rk.killed_in is None and not rk.started:
                    row.rerun_note = f"not killed: dvc repro ended (exit {rk.rc}) before {kind} started; "
                    print(f"    {row.rerun_note}", flush=True)
                    break
                if rk.killed_in is None:
                    print(f"    dvc repro finished (exit {rk.rc}) before the delay was over", flush=True)
                else:
                    print(f"    killed after {rk.killed_after:.2f} s in {rk.killed_in}", flush=True)
                if (rk.killed_in is not None and kind_of(rk.killed_in) == kind) or attempt == 3:
                    break
                # The machine ran faster than in A and the kind had finished: clear what the kill left, try earlier.
                reap(base)
                for item in debris(b):
                    path = b.root.parent / item.split(" ", 1)[0].rstrip("/")
                    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
                row.delay *= 0.5
                print(f"    missed {kind} (attempt {attempt}); its debris removed, retrying with half the delay",
                      flush=True)
                row.attempts = attempt + 1
            row.leftovers = debris(b)
            row.leftovers += [f"TMPDIR/{e}" for e in sorted(tmpdir_entries(b) - tmp_before)]
            row.leftovers += dvc_locks(b, rk.pid) + reap(base)
            if rk.killed_in is None and rk.started:
                row.rerun_note = f"not killed: {kind} finished before each of {row.attempts} delays; "
            for item in row.leftovers:
                print(f"    left: {item}", flush=True)
            row.rerun_ok, note, ran = recover(b, log)
            row.rerun_note += note
            print(f"    rerun: {'ok' if row.rerun_ok else 'FAILED'} ({note}): {', '.join(ran)}", flush=True)
            if row.killed_in is not None and row.killed_in not in ran:
                row.completed = True
                print(f"    {row.killed_in} was not rerun: it had finished and DVC had recorded it in dvc.lock before "
                      "the kill landed", flush=True)
            if stray := sorted(set(ran) - set(names)):
                print(f"    the rerun also ran stages that were not un-run: {', '.join(stray)}", flush=True)
            row.after_rerun = debris(b)
            row.diffs = compare(a, ref_hashes, b, only=outs)
            row.as_control = sum(d.pairs() <= intrinsic for d in row.diffs)
            after = artifact_hashes(b)
            if touched := sorted(k for k in before if after.get(k) != before[k]):
                print(f"    files outside this row's stages changed: {', '.join(touched)}", flush=True)
                row.rerun_ok = False
                row.rerun_note += f"; changed outside its stages: {', '.join(touched)}"
            row.wall = time.monotonic() - t0
            for d in row.diffs:
                tag = "as in the control" if d.pairs() <= intrinsic else "BEYOND the control"
                print(f"    differs ({tag}): {d.path}: {d.text}", flush=True)
            print(f"    row took {row.wall:.0f} s", flush=True)

        print_table(rows)
        print(f"\n{len(ref_hashes)} artifacts compared (a row compares those of the stages it reran); seed {seed}; "
              f"total {time.monotonic() - t_start:.0f} s")
        failed = [r for r in rows if not r.ok]
        for r in failed:
            print(f"FAILED {r.stage}: {r.rerun_note}")
            for d in r.diffs:
                print(f"    {d.path}: {d.text}")
        return 1 if failed else 0
    finally:
        if args.keep is None:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
