"""MD throughput (replica-steps/s): crmse.langevin vs schnetpack.md vs ASE Langevin vs the bare model.

Same SchNet everywhere (``--model small``: 64 features, 64 filters, 3 interactions, 20 RBF, cutoff 5 Å;
``--model paper``: presets/paper.yaml's 128 features, 128 filters, 6 interactions, 25 RBF, cutoff 5 Å;
float32, random weights, built by crmse.model.build_model), same molecule, dt 0.5 fs, 500 K, γ 0.01/fs,
on ``--device`` (cpu, cuda, or auto = cuda when torch sees one):

* bare:       Potential.energy_and_forces on a batch of R frames (one evaluation = one
              replica-step); bounds every MD engine that evaluates the model once per step;
* bare+compile: the same with ``torch.compile`` (``--compile-mode``, static shapes) of Potential.energy,
              forces by autograd through the compiled graph; its first call per (model, R) is the compile
              time (``compile_s`` in the JSON, not part of the rate), ``compile_max_dF`` its largest force
              difference from eager (kcal/mol/Å); a compile error is recorded and the rest goes on;
* crmse:      crmse.langevin.Langevin with the bond stability check (as the sample stage runs it);
* crmse+VL:   the same with the Verlet pair list of crmse.pairlist (md.skin = 1 Å);
* spk.md:     schnetpack.md Simulator + VelocityVerlet + LangevinThermostat, SchNetPackCalculator
              on the same weights (crmse.model.to_schnetpack), schnetpack's NeighborListMD
              (ASE neighbour list on the CPU, 1 Å shell), cast to float32 like the others; skipped above
              ``--spk-max-replicas`` (its neighbour list is built replica by replica in Python);
* integrator only: the crmse engine (stability check included) on a free model returning
              zero forces: its time per step is the integrator's own cost, reported as a fraction
              of the bare evaluation time (robust on a busy machine, unlike a difference of rates);
* ASE:        ase.md.langevin.Langevin with crmse.model.CRMSECalculator, and with schnetpack's
              SpkCalculator (ASE neighbour list per call), one replica at a time (R replicas take
              R times as long, so its replica-steps/s does not depend on R); measured only when R = 1 is
              in ``--replicas`` (and on the CPU only for SpkCalculator).

A method is skipped at a replica count, with the reason in the JSON (``skipped``) and the printed
table, when its estimated activation memory exceeds ``--memory-fraction`` of the free memory of the
device, when it runs out of memory, when one step takes longer than ``--max-step-s``, or when it fails.
Replica counts up to 16384 are allowed.

The CPU is shared: methods are timed round-robin for several rounds and the best round is
reported (the least disturbed), with the median beside it in the JSON, both per wall second
and per CPU second of this process (the latter is much less sensitive to other jobs). On a GPU
the wall clock is the one that counts: every timing synchronises (torch.cuda.synchronize) before
the clock is read, and the CPU-second rate only says how busy the host thread was.

With ``--dead-fraction F`` only the frozen-replica comparison runs (issue 31.9): the crmse engine
(all pairs, and with the Verlet list) with the first round(F·R) replicas frozen (a blown-up
replica), once evaluating the whole batch every step (``compact=False``, the old behaviour) and
once leaving the frozen ones out of the model's batch (``compact=True``); rates count all R
replicas, so their ratio is the time saved per step. The engine's check that compaction changes
no bit is part of the timing (it runs once, at the first step).

Usage: python benchmarks/md_throughput.py [--molecules ethanol aspirin] [--replicas 1 16 64 256]
       [--device cpu|cuda|auto] [--model small|paper] [--methods bare bare+compile ...]
       [--seconds 1.5] [--rounds 3] [--threads 2] [--dead-fraction 0.33] [--out benchmarks/out/md_throughput.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crmse.data import Frames
from crmse.langevin import Langevin, StabilityCheck
from crmse.model import CRMSECalculator, build_model, export_schnetpack, spk_calculator, to_schnetpack
from crmse.pairlist import VerletPotential
from crmse.units import masses

REPO = Path(__file__).resolve().parents[1]
#: Model sizes: ``small`` is params.yaml's CPU default, ``paper`` presets/paper.yaml's.
MODELS: dict[str, dict[str, Any]] = {
    "small": {"n_atom_basis": 64, "n_filters": 64, "n_interactions": 3, "n_rbf": 20, "cutoff": 5.0,
              "dtype": "float32"},
    "paper": {"n_atom_basis": 128, "n_filters": 128, "n_interactions": 6, "n_rbf": 25, "cutoff": 5.0,
              "dtype": "float32"},
}
MODEL = MODELS["small"]
DT, TEMPERATURE, FRICTION = 0.5, 500.0, 0.01
METHODS = ("bare", "bare+compile", "crmse", "crmse+VL", "integrator only", "spk.md", "ASE", "ASE+SpkCalculator")
#: Methods that evaluate the SchNet model (their memory grows with R · pairs · filters).
MODEL_METHODS = frozenset(METHODS) - {"integrator only"}


class Skipped(Exception):
    """A method that is not timed at this replica count; the message is the recorded reason."""


def frames_of(molecule: str, n: int = 256) -> Frames:
    """Real training frames if a split exists here, else the checked-in frame with noise (same atoms)."""
    split = REPO / f"data/splits/{molecule}/n200/s0/train.npz"
    if split.exists():
        with np.load(split) as d:
            f = Frames(d["z"], d["R"], d["E"], d["F"], d["md17_index"])
        return f.subset(np.arange(n) % len(f))
    d = json.loads((REPO / f"tests/fixtures/{molecule}_frame.json").read_text())
    R = np.asarray(d["R"])[None] + 0.03 * np.random.default_rng(0).standard_normal((n, len(d["z"]), 3))
    return Frames(np.asarray(d["z"]), R, np.full(n, float(d["E"])), np.zeros_like(R), np.arange(n))


def pick_device(name: str) -> tuple[torch.device | None, str | None]:
    """(device, None) for ``cpu``/``cuda``/``auto`` (auto = cuda if available), or (None, reason) when CUDA
    was requested and torch sees no CUDA device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        return None, f"CUDA requested but torch {torch.__version__} sees no CUDA device"
    return torch.device(name), None


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for the device's queued work (CUDA), or does nothing (CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def cpu_model() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def device_info(device: torch.device, threads: int) -> dict[str, Any]:
    """Device name, memory (GiB), torch/CUDA versions, host CPU and threads, for the JSON."""
    info: dict[str, Any] = {"device": str(device), "torch": torch.__version__, "threads": threads,
                            "cpu": cpu_model(), "cpus_visible": os.cpu_count(), "python": platform.python_version()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {"device_name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda,
                 "device_memory_GiB": round(props.total_memory / 2**30, 1)}
    else:
        info["device_name"] = cpu_model()
    return info


def free_bytes(device: torch.device) -> int:
    """Free memory of the device in bytes (CUDA: mem_get_info; CPU: MemAvailable)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def activation_bytes(n_atoms: int, R: int, config: dict[str, Any]) -> int:
    """Rough peak memory (bytes) of one energy-and-forces evaluation of R frames: per interaction about seven
    float32 (pairs × filters) tensors (filter network, cutoff, gathered features, products, their gradients),
    plus the radial basis; all-pairs list of n(n−1) pairs per frame. On the CPU it came within 10 % of the
    measured peak (ethanol small R = 2048: 0.79 vs 0.86 GB; aspirin paper R = 256: 2.2 vs 2.1 GB)."""
    pairs = R * n_atoms * (n_atoms - 1)
    per_pair = 7 * int(config["n_filters"]) * int(config["n_interactions"]) + 2 * int(config["n_rbf"]) + 16
    return 4 * pairs * per_pair


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error of CUDA or of the CPU allocator."""
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower() or (
        "can't allocate" in str(exc).lower())


def timed(
    run: Callable[[int], None], steps_per_call: int, seconds: float, sync: Callable[[], None] = lambda: None,
    max_step_s: float = math.inf,
) -> tuple[float, float]:
    """(steps per wall second, steps per CPU second of this process): run(k) advances k steps.

    CPU time (``time.process_time``) is what this process itself consumed: on a shared machine it
    is far less disturbed by other jobs than wall time (with one thread it approximates the wall
    time of an idle core; cache sharing still leaks in). ``sync`` waits for the device before every
    clock reading (CUDA work is asynchronous). Raises :class:`Skipped` when the warm-up step took
    longer than ``max_step_s`` seconds.
    """
    t = time.perf_counter()
    run(1)  # warm-up (graph caches, allocator)
    sync()
    first = time.perf_counter() - t
    if first > max_step_s:
        raise Skipped(f"one step took {first:.1f} s > --max-step-s {max_step_s:g}")
    k, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        run(steps_per_call)
        sync()
        k += steps_per_call
        t = time.perf_counter() - t0
        if t >= seconds:
            return k / t, k / max(time.process_time() - c0, 1e-9)


class CompiledEnergyForces:
    """``R -> (E, F)`` with ``torch.compile`` of ``model.energy`` (forces by autograd through the compiled graph).

    The first call for a batch shape compiles (its wall time in ``compile_s``, by batch size); a compile
    error is kept in ``error`` (and re-raised as :class:`Skipped` on later calls, without retrying).
    """

    def __init__(self, model: Any, mode: str = "default", sync: Callable[[], None] = lambda: None) -> None:
        self.model, self.sync = model, sync
        self.energy = torch.compile(model.energy, mode=None if mode == "default" else mode, dynamic=False)
        self.compile_s: dict[int, float] = {}
        self.max_dF: dict[int, float] = {}
        self.error: str | None = None

    def _call(self, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.enable_grad():
            Rg = R.detach().requires_grad_(True)
            E = self.energy(Rg)
            (dE,) = torch.autograd.grad(E.sum(), Rg)
        return E.detach(), -dE

    def __call__(self, R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.error is not None:
            raise Skipped(f"torch.compile failed: {self.error}")
        B = R.shape[0]
        if B not in self.compile_s:
            t = time.perf_counter()
            try:
                E, F = self._call(R)
                self.sync()
            except Exception as exc:  # any compile failure is a result to record
                if is_oom(exc):
                    raise
                self.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
                raise Skipped(f"torch.compile failed: {self.error}") from exc
            self.compile_s[B] = time.perf_counter() - t
            F_eager = self.model.energy_and_forces(R)[1]
            self.max_dF[B] = float((F - F_eager).abs().max())
            return E, F
        return self._call(R)


def make_methods(
    frames: Frames, R: int, spk_file: Path, spk_full: Path, model: Any, seconds: float, device: torch.device,
    compiled: CompiledEnergyForces | None = None, max_step_s: float = math.inf, alive: dict[str, int] | None = None,
) -> dict[str, Callable[[], tuple[float, float]]]:
    """Each method returns (replica-steps per wall second, per CPU second) for R replicas on ``device``; the
    engines put their count of replicas still alive (bonds intact) at the end of the last timing in ``alive``."""
    z = frames.z
    x = torch.as_tensor(frames.R[np.arange(R) % len(frames)], dtype=torch.float32, device=device)
    check = StabilityCheck.from_reference(z, frames.R, tolerance=0.5)
    chunk = 10 if R <= 64 else 2
    E0, F0 = torch.zeros(R, dtype=torch.float64, device=device), torch.zeros_like(x)
    sync = synchronizer(device)
    cutoff = float(model.config["cutoff"])

    def scaled(rates: tuple[float, float], n: int = R) -> tuple[float, float]:
        return rates[0] * n, rates[1] * n

    def evaluation(energy_forces: Callable) -> Callable[[], tuple[float, float]]:
        def go() -> tuple[float, float]:
            if isinstance(energy_forces, CompiledEnergyForces) and R not in energy_forces.compile_s:
                energy_forces(x)  # compiles (timed apart, in compile_s), outside the --max-step-s check
            return scaled(timed(lambda k: [energy_forces(x) for _ in range(k)], chunk, seconds, sync, max_step_s))

        return go

    def engine(energy_forces: Callable, name: str) -> Callable[[], tuple[float, float]]:
        def go() -> tuple[float, float]:
            # compact=False: every replica is evaluated at every step, so the rate is the cost of R replicas even
            # when the random-weight model (or the zero-force one) breaks bonds and the check freezes replicas.
            eng = Langevin(energy_forces, masses(z), DT, TEMPERATURE, FRICTION, stability=check, device=device,
                           compact=False)
            state = eng.init_state(x, seed=0)
            rate = scaled(timed(lambda k: eng.step(state, k), chunk, seconds, sync, max_step_s))
            if alive is not None:
                alive[name] = int(state.alive.sum())
            return rate

        return go

    def spk_md() -> tuple[float, float]:
        from ase import Atoms
        from schnetpack import units as spk_units
        from schnetpack.md import Simulator, System, UniformInit
        from schnetpack.md.calculators import SchNetPackCalculator
        from schnetpack.md.integrators import VelocityVerlet
        from schnetpack.md.neighborlist_md import NeighborListMD
        from schnetpack.md.simulation_hooks import LangevinThermostat
        from schnetpack.transform import ASENeighborList

        system = System()
        system.load_molecules(Atoms(numbers=z, positions=frames.R[0]), n_replicas=R)
        # Same start frames as the others: positions are (replicas, atoms, 3) in schnetpack's internal unit (nm).
        start = frames.R[np.arange(R) % len(frames)] * spk_units.unit2internal("Angstrom")
        system.positions = torch.as_tensor(start, dtype=system.positions.dtype)
        UniformInit(TEMPERATURE, remove_center_of_mass=True, remove_translation=True).initialize_system(system)
        calc = SchNetPackCalculator(
            str(spk_file), "forces", "kcal/mol", "Angstrom",
            NeighborListMD(cutoff, 1.0, ASENeighborList), energy_key="energy",
        )
        sim = Simulator(system, VelocityVerlet(DT), calc, [LangevinThermostat(TEMPERATURE, 1.0 / FRICTION)],
                        progress=False).to(device=device, dtype=torch.float32)
        return scaled(timed(lambda k: sim.simulate(k), chunk, seconds, sync, max_step_s))

    methods = {
        "bare": evaluation(model.energy_and_forces),
        "crmse": engine(model.energy_and_forces, "crmse"),
        "crmse+VL": engine(VerletPotential(model, skin=1.0), "crmse+VL"),
        # The integrator alone: the same engine on a model that costs nothing (constant zero forces).
        "integrator only": engine(lambda r: (E0, F0), "integrator only"),
        "spk.md": spk_md,
    }
    if compiled is not None:
        methods["bare+compile"] = evaluation(compiled)
    if R == 1:
        from ase import Atoms, units
        from ase.md.langevin import Langevin as AseLangevin
        from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

        def ase_md(calc_factory: Callable[[], object]) -> Callable[[], tuple[float, float]]:
            def go() -> tuple[float, float]:
                atoms = Atoms(numbers=z, positions=frames.R[0])
                atoms.calc = calc_factory()
                MaxwellBoltzmannDistribution(atoms, temperature_K=TEMPERATURE, rng=np.random.default_rng(0))
                dyn = AseLangevin(atoms, DT * units.fs, temperature_K=TEMPERATURE, friction=FRICTION / units.fs)
                return timed(lambda k: dyn.run(k), 10, seconds, max_step_s=max_step_s)

            return go

        methods["ASE"] = ase_md(lambda: CRMSECalculator(model, device=device))
        if device.type == "cpu":
            methods["ASE+SpkCalculator"] = ase_md(lambda: spk_calculator(spk_full, cutoff, dtype=torch.float32))
    return methods


def skip_reasons(
    names: list[str], n_atoms: int, R: int, config: dict[str, Any], device: torch.device, memory_fraction: float,
    spk_max_replicas: int, compile_error: str | None,
) -> dict[str, str]:
    """Reasons, decided before timing, not to time a method at this replica count (name -> reason)."""
    reasons: dict[str, str] = {}
    need, free = activation_bytes(n_atoms, R, config), free_bytes(device)
    for name in names:
        if name in MODEL_METHODS and need > memory_fraction * free:
            reasons[name] = (f"estimated {need / 2**30:.1f} GiB of activations > {memory_fraction:g} × "
                             f"{free / 2**30:.1f} GiB free on {device.type}")
    if "spk.md" in names and R > spk_max_replicas and "spk.md" not in reasons:
        reasons["spk.md"] = f"R > --spk-max-replicas {spk_max_replicas} (ASE neighbour list per replica, in Python)"
    if "bare+compile" in names and compile_error is not None:
        reasons["bare+compile"] = f"torch.compile failed: {compile_error}"
    for name in ("ASE", "ASE+SpkCalculator"):
        if name in names and R != 1:
            reasons.setdefault(name, "one replica at a time: measured at R = 1 only (not in --replicas)")
    if "ASE+SpkCalculator" in names and device.type != "cpu":
        reasons.setdefault("ASE+SpkCalculator", "CPU only (schnetpack's ASE calculator here runs on the CPU)")
    return reasons


def run_rounds(
    methods: dict[str, Callable[[], tuple[float, float]]], rounds: int, reasons: dict[str, str],
    device: torch.device,
) -> dict[str, list[tuple[float, float]]]:
    """Time the methods round-robin; a method that fails, runs out of memory or is too slow gets a reason in
    ``reasons`` and is not called again. Returns the (wall, cpu) rates of every round per timed method."""
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in methods if k not in reasons}
    for _ in range(rounds):
        for name, fn in methods.items():
            if name in reasons:
                continue
            try:
                samples[name].append(fn())
            except Skipped as exc:
                reasons[name] = str(exc)
            except Exception as exc:  # a failure is a result: record it, go on with the others
                first = (str(exc).strip().splitlines() or [""])[0][:300]
                reasons[name] = ("out of memory: " if is_oom(exc) else f"failed: {type(exc).__name__}: ") + first
            if name in reasons:
                samples.pop(name, None)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return samples


def make_dead_methods(
    frames: Frames, R: int, model: Any, seconds: float, dead_fraction: float, compaction: dict[str, dict],
    device: torch.device | None = None,
) -> dict[str, Callable[[], tuple[float, float]]]:
    """crmse engine rates with round(dead_fraction · R) replicas frozen, batch compacted or not (replica-steps/s)."""
    z = frames.z
    device = device or torch.device("cpu")
    x = torch.as_tensor(frames.R[np.arange(R) % len(frames)], dtype=torch.float32, device=device)
    n_dead = round(dead_fraction * R)
    chunk = 10 if R <= 64 else 2
    sync = synchronizer(device)

    def engine(energy_forces: Callable, compact: bool, name: str) -> Callable[[], tuple[float, float]]:
        def go() -> tuple[float, float]:
            # No bond check: the random-weight model would break bonds within a few hundred steps, and the
            # living replicas must stay R − n_dead for the whole timing (checked below).
            eng = Langevin(energy_forces(), masses(z), DT, TEMPERATURE, FRICTION, compact=compact, device=device)
            state = eng.init_state(x, seed=0)
            state.alive[:n_dead] = False  # as a blow-up leaves them: frozen at their last good state
            state.unstable_step[:n_dead] = 0
            rate = timed(lambda k: eng.step(state, k), chunk, seconds, sync)
            compaction[name] = {**eng.compaction, "alive_at_end": int(state.alive.sum())}
            return rate[0] * R, rate[1] * R

        return go

    return {
        "all pairs, full batch": engine(lambda: model.energy_and_forces, False, "all pairs, full batch"),
        "all pairs, compacted": engine(lambda: model.energy_and_forces, True, "all pairs, compacted"),
        "Verlet, full batch": engine(lambda: VerletPotential(model, skin=1.0), False, "Verlet, full batch"),
        "Verlet, compacted": engine(lambda: VerletPotential(model, skin=1.0), True, "Verlet, compacted"),
    }


def dead_table(results: dict, clock: str = "cpu") -> str:
    """Markdown table of the frozen-replica comparison (best round, replica-steps/s counting all replicas)."""
    lines = [
        "| molecule | R | frozen | pair list | full batch | compacted | time per step saved | compaction |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        b = row[clock]
        for pl in ("all pairs", "Verlet"):
            full, comp = b[f"{pl}, full batch"], b[f"{pl}, compacted"]
            state = row["compaction"][f"{pl}, compacted"]
            note = "on" if state["off_reason"] is None else "off: " + state["off_reason"].split(" (")[0]
            note += f"; {state['alive_at_end']} alive at the end"
            lines.append(
                f"| {row['molecule']} | {row['R']} | {row['dead']} | {pl} | {full:.0f} | {comp:.0f} | "
                f"{100 * (1 - full / comp):.1f}% | {note} |"
            )
    return "\n".join(lines)


def header(args: argparse.Namespace, device: torch.device, extra: dict[str, Any]) -> dict[str, Any]:
    """The JSON's head: date, machine, device, torch version, threads, settings."""
    info = device_info(device, args.threads)
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {info['cpu']}, {os.cpu_count()} CPUs visible (shared), "
        f"torch {torch.__version__}, {args.threads} threads, device {info['device_name']}",
        "device_info": info,
        "threads": args.threads,
        "load_average_start": os.getloadavg(),
        "settings": {"model_size": args.model, "model": MODELS[args.model], "dt_fs": DT, "T_K": TEMPERATURE,
                     "friction_per_fs": FRICTION, "seconds": args.seconds, "rounds": args.rounds, **extra},
        "rows": [],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--molecules", nargs="+", default=["ethanol", "aspirin"])
    ap.add_argument("--replicas", nargs="+", type=int, default=[1, 16, 64, 256], help="up to 16384")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto",
                    help="where tensors, model and engine live (auto = cuda when available)")
    ap.add_argument("--model", choices=sorted(MODELS), default="small", help="small (CPU default) or paper size")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), help="methods to time")
    ap.add_argument("--compile-replicas", nargs="+", type=int, default=None,
                    help="replica counts at which bare+compile is timed (default: all; each one compiles anew)")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode of bare+compile (default, reduce-overhead, max-autotune)")
    ap.add_argument("--seconds", type=float, default=1.5, help="timing window per method and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-step-s", type=float, default=30.0, help="skip a method whose warm-up step takes longer")
    ap.add_argument("--memory-fraction", type=float, default=0.7,
                    help="skip a model method whose estimated activations exceed this fraction of free memory")
    ap.add_argument("--spk-max-replicas", type=int, default=1024, help="skip spk.md above this replica count")
    ap.add_argument("--dead-fraction", type=float, default=0.0,
                    help="only compare frozen replicas in / out of the batch, with this fraction frozen")
    ap.add_argument("--out", default=None,
                    help="JSON (default benchmarks/out/md_throughput[_<device>_<model>][_dead].json)")
    args = ap.parse_args()
    if max(args.replicas) > 16384 or min(args.replicas) < 1:
        ap.error("--replicas must lie in 1 .. 16384")
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    device, why_not = pick_device(args.device)
    suffix = "" if (device is not None and device.type == "cpu" and args.model == "small") else (
        f"_{device.type if device is not None else args.device}_{args.model}")
    if device is None:
        print(f"md_throughput: skipped: {why_not}", flush=True)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps({"skipped": why_not}, indent=2) + "\n")
        return 0
    if args.dead_fraction > 0:
        return dead_main(args, device, args.out or str(REPO / f"benchmarks/out/md_throughput{suffix}_dead.json"))
    args.out = args.out or str(REPO / f"benchmarks/out/md_throughput{suffix}.json")
    config = MODELS[args.model]
    sync = synchronizer(device)

    results = header(args, device, {"methods": args.methods, "compile_mode": args.compile_mode,
                                    "max_step_s": args.max_step_s, "memory_fraction": args.memory_fraction,
                                    "spk_max_replicas": args.spk_max_replicas})
    print(f"md_throughput: {results['machine']}; model {args.model}", flush=True)
    for mol in args.molecules:
        frames = frames_of(mol)
        model = build_model(frames.z, config, frames).eval()
        compiled = CompiledEnergyForces(model, args.compile_mode, sync) if "bare+compile" in args.methods else None
        with tempfile.TemporaryDirectory() as tmp:
            spk_file = Path(tmp) / "spk.pt"
            # schnetpack.md switches post-processing off anyway; dropping it also avoids a schnetpack 2.2.0
            # crash in SchNetPackCalculator (it formats AddOffsets' shape-(1,) mean as a scalar).
            nnp = to_schnetpack(model)
            nnp.postprocessors = torch.nn.ModuleList()
            torch.save(nnp, spk_file)
            spk_full = Path(tmp) / "spk_full.pt"  # with post-processing, for schnetpack's ASE calculator
            export_schnetpack(model, spk_full)
            model.to(device)
            ase: dict[str, dict[str, float]] = {}
            for R in args.replicas:
                alive: dict[str, int] = {}
                methods = make_methods(frames, R, spk_file, spk_full, model, args.seconds, device, compiled,
                                       args.max_step_s, alive)
                methods = {k: v for k, v in methods.items() if k in args.methods}
                reasons = skip_reasons(list(args.methods), frames.n_atoms, R, config, device, args.memory_fraction,
                                       args.spk_max_replicas, compiled.error if compiled is not None else None)
                if "bare+compile" in args.methods and args.compile_replicas and R not in args.compile_replicas:
                    reasons.setdefault("bare+compile", "R not in --compile-replicas (every R compiles anew)")
                samples = run_rounds(methods, args.rounds, reasons, device)
                row: dict = {"molecule": mol, "model": args.model, "R": R}
                for i, clock in enumerate(("wall", "cpu")):
                    row[clock] = {k: max(v[i] for v in vals) for k, vals in samples.items() if vals}
                    row[clock + "_median"] = {k: statistics.median(v[i] for v in vals)
                                              for k, vals in samples.items() if vals}
                    for name in ("ASE", "ASE+SpkCalculator"):
                        if name in row[clock]:
                            ase.setdefault(clock, {})[name] = row[clock][name]
                        elif clock in ase and name in ase[clock]:
                            row[clock][name] = ase[clock][name]  # one replica at a time: same rate for any R
                            reasons.pop(name, None)
                row["skipped"] = {k: v for k, v in reasons.items() if k in args.methods}
                row["alive_at_end"] = alive
                if compiled is not None and R in compiled.compile_s:
                    row["compile_s"] = compiled.compile_s[R]
                    row["compile_max_dF"] = compiled.max_dF[R]
                results["rows"].append(row)
                print(format_row(row), flush=True)
                write_json(args.out, results)  # after every row: a run stopped by a time limit keeps what it did
        del model, compiled
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results["load_average_end"] = os.getloadavg()
    write_json(args.out, results)
    if device.type == "cpu":
        print("\nreplica-steps per CPU second of this process (best round):\n")
        print(table(results, "cpu"))
    note = "" if device.type == "cuda" else "; disturbed by other jobs"
    print(f"\nreplica-steps per wall second (best round{note}):\n")
    print(table(results, "wall"))
    print(f"\nwritten {args.out}; load average {results['load_average_start']} -> {results['load_average_end']}")
    return 0


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON (folders made as needed)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def dead_main(args: argparse.Namespace, device: torch.device, out: str) -> int:
    """The frozen-replica comparison (``--dead-fraction``)."""
    results = header(args, device, {"dead_fraction": args.dead_fraction})
    for mol in args.molecules:
        frames = frames_of(mol)
        model = build_model(frames.z, MODELS[args.model], frames).eval().to(device)
        for R in args.replicas:
            compaction: dict[str, dict] = {}
            methods = make_dead_methods(frames, R, model, args.seconds, args.dead_fraction, compaction, device)
            samples: dict[str, list[tuple[float, float]]] = {k: [] for k in methods}
            for _ in range(args.rounds):
                for name, fn in methods.items():
                    samples[name].append(fn())
            row: dict = {"molecule": mol, "R": R, "dead": round(args.dead_fraction * R), "compaction": compaction}
            for i, clock in enumerate(("wall", "cpu")):
                row[clock] = {k: max(v[i] for v in vals) for k, vals in samples.items()}
                row[clock + "_median"] = {k: statistics.median(v[i] for v in vals) for k, vals in samples.items()}
            results["rows"].append(row)
            print(format_row(row), flush=True)
    results["load_average_end"] = os.getloadavg()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    print("\nreplica-steps per CPU second of this process (best round; all replicas counted):\n")
    print(dead_table(results, "cpu"))
    print("\nreplica-steps per wall second (best round):\n")
    print(dead_table(results, "wall"))
    print(f"\nwritten {out}; load average {results['load_average_start']} -> {results['load_average_end']}")
    return 0


def format_row(row: dict) -> str:
    """One line per (molecule, R): every timed method's rate per CPU second (and per wall second)."""
    text = f"{row['molecule']} {row.get('model', '')} R={row['R']}: ".replace("  ", " ") + ", ".join(
        f"{k} {row['cpu'][k]:.0f} (wall {row['wall'][k]:.0f})" for k in row["cpu"]
    )
    if "compile_s" in row:
        text += f"; compile {row['compile_s']:.1f} s, max |ΔF| {row['compile_max_dF']:.1e}"
    for k, why in row.get("skipped", {}).items():
        text += f"\n    skipped {k}: {why}"
    return text


def table(results: dict, clock: str = "cpu") -> str:
    """Markdown table of best-round replica-steps/s (per CPU second or per wall second) and the goal ratios;
    — marks a method not timed (its reason is in the JSON's ``skipped`` and printed below the table)."""

    def rate(b: dict, k: str) -> str:
        return f"{b[k]:.0f}" if k in b else "—"

    def ratio(a: float | None, b: float | None, fmt: str) -> str:
        return "—" if a is None or b is None else format(a / b, fmt)

    lines = [
        "| molecule | model | R | bare eval | bare+compile | compile / eager | compile s | crmse.langevin | "
        "crmse + Verlet list | schnetpack.md | ASE (crmse calc)* | ASE (SpkCalculator)* | "
        "integrator cost / bare eval | crmse / bare | crmse / spk.md | best crmse / ASE (crmse calc) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    skipped: list[str] = []
    for row in results["rows"]:
        b = row[clock]
        g = b.get
        best = max(g("crmse", 0.0), g("crmse+VL", 0.0)) or None
        integ = "—" if g("integrator only") is None or g("bare") is None else (
            f"{100 * b['bare'] / b['integrator only']:.1f}%")
        comp_s = f"{row['compile_s']:.1f}" if "compile_s" in row else "—"
        lines.append(
            f"| {row['molecule']} | {row.get('model', 'small')} | {row['R']} | {rate(b, 'bare')} | "
            f"{rate(b, 'bare+compile')} | {ratio(g('bare+compile'), g('bare'), '.2f')}× | {comp_s} | "
            f"{rate(b, 'crmse')} | {rate(b, 'crmse+VL')} | {rate(b, 'spk.md')} | {rate(b, 'ASE')} | "
            f"{rate(b, 'ASE+SpkCalculator')} | {integ} | {ratio(g('crmse'), g('bare'), '.2f')} | "
            f"{ratio(g('crmse'), g('spk.md'), '.2f')}× | {ratio(best, g('ASE'), '.1f')}× |"
        )
        skipped += [f"- {row['molecule']} R={row['R']} {k}: {why}" for k, why in row.get("skipped", {}).items()]
    text = "\n".join(lines).replace("—×", "—")
    text += "\n\n*ASE runs one replica at a time: its replica-steps/s is measured at R = 1."
    return text + ("\n\nNot timed:\n" + "\n".join(skipped) if skipped else "")


if __name__ == "__main__":
    sys.exit(main())
