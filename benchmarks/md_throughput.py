"""MD throughput (replica-steps/s): crmse.langevin vs schnetpack.md vs ASE Langevin vs the bare model.

Same SchNet everywhere (64 features, 64 filters, 3 interactions, 20 RBF, cutoff 5 Å, float32,
random weights, built by crmse.model.build_model), same molecule, dt 0.5 fs, 500 K, γ 0.01/fs:

* bare:       Potential.energy_and_forces on a batch of R frames (one evaluation = one
              replica-step); bounds every MD engine that evaluates the model once per step;
* crmse:      crmse.langevin.Langevin with the bond stability check (as the sample stage runs it);
* crmse+VL:   the same with the Verlet pair list of crmse.pairlist (md.skin = 1 Å);
* spk.md:     schnetpack.md Simulator + VelocityVerlet + LangevinThermostat, SchNetPackCalculator
              on the same weights (crmse.model.to_schnetpack), schnetpack's NeighborListMD
              (ASE neighbour list, 1 Å shell), cast to float32 like the others;
* integrator only: the crmse engine (stability check included) on a free model returning
              zero forces: its time per step is the integrator's own cost, reported as a fraction
              of the bare evaluation time (robust on a busy machine, unlike a difference of rates);
* ASE:        ase.md.langevin.Langevin with crmse.model.CRMSECalculator, and with schnetpack's
              SpkCalculator (ASE neighbour list per call), one replica at a time (R replicas take
              R times as long, so its replica-steps/s does not depend on R).

The CPU is shared: methods are timed round-robin for several rounds and the best round is
reported (the least disturbed), with the median beside it in the JSON, both per wall second
and per CPU second of this process (the latter is much less sensitive to other jobs).

With ``--dead-fraction F`` only the frozen-replica comparison runs (issue 31.9): the crmse engine
(all pairs, and with the Verlet list) with the first round(F·R) replicas frozen (a blown-up
replica), once evaluating the whole batch every step (``compact=False``, the old behaviour) and
once leaving the frozen ones out of the model's batch (``compact=True``); rates count all R
replicas, so their ratio is the time saved per step. The engine's check that compaction changes
no bit is part of the timing (it runs once, at the first step).

Usage: python benchmarks/md_throughput.py [--molecules ethanol aspirin] [--replicas 1 16 64 256]
       [--seconds 1.5] [--rounds 3] [--threads 2] [--dead-fraction 0.33] [--out benchmarks/out/md_throughput.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from crmse.data import Frames
from crmse.langevin import Langevin, StabilityCheck
from crmse.model import CRMSECalculator, build_model, export_schnetpack, spk_calculator, to_schnetpack
from crmse.pairlist import VerletPotential
from crmse.units import masses

REPO = Path(__file__).resolve().parents[1]
MODEL = {"n_atom_basis": 64, "n_filters": 64, "n_interactions": 3, "n_rbf": 20, "cutoff": 5.0, "dtype": "float32"}
DT, TEMPERATURE, FRICTION = 0.5, 500.0, 0.01


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


def timed(run: Callable[[int], None], steps_per_call: int, seconds: float) -> tuple[float, float]:
    """(steps per wall second, steps per CPU second of this process): run(k) advances k steps.

    CPU time (``time.process_time``) is what this process itself consumed: on a shared machine it
    is far less disturbed by other jobs than wall time (with one thread it approximates the wall
    time of an idle core; cache sharing still leaks in).
    """
    run(1)  # warm-up (graph caches, allocator)
    k, t0, c0 = 0, time.perf_counter(), time.process_time()
    while True:
        run(steps_per_call)
        k += steps_per_call
        t = time.perf_counter() - t0
        if t >= seconds:
            return k / t, k / (time.process_time() - c0)


def make_methods(
    frames: Frames, R: int, spk_file: Path, spk_full: Path, model, seconds: float
) -> dict[str, Callable[[], tuple[float, float]]]:
    """Each method returns replica-steps/s for R replicas."""
    z = frames.z
    x = torch.as_tensor(frames.R[np.arange(R) % len(frames)], dtype=torch.float32)
    check = StabilityCheck.from_reference(z, frames.R, tolerance=0.5)
    chunk = 10 if R <= 64 else 2
    E0, F0 = torch.zeros(R, dtype=torch.float64), torch.zeros_like(x)

    def scaled(rates: tuple[float, float], n: int = R) -> tuple[float, float]:
        return rates[0] * n, rates[1] * n

    def bare() -> tuple[float, float]:
        return scaled(timed(lambda k: [model.energy_and_forces(x) for _ in range(k)], chunk, seconds))

    def engine(energy_forces) -> Callable[[], float]:
        def go() -> tuple[float, float]:
            eng = Langevin(energy_forces, masses(z), DT, TEMPERATURE, FRICTION, stability=check)
            state = eng.init_state(x, seed=0)
            return scaled(timed(lambda k: eng.step(state, k), chunk, seconds))

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
            NeighborListMD(MODEL["cutoff"], 1.0, ASENeighborList), energy_key="energy",
        )
        sim = Simulator(system, VelocityVerlet(DT), calc, [LangevinThermostat(TEMPERATURE, 1.0 / FRICTION)],
                        progress=False).to(torch.float32)
        return scaled(timed(lambda k: sim.simulate(k), chunk, seconds))

    methods = {
        "bare": bare,
        "crmse": engine(model.energy_and_forces),
        "crmse+VL": engine(VerletPotential(model, skin=1.0)),
        # The integrator alone: the same engine on a model that costs nothing (constant zero forces).
        "integrator only": engine(lambda r: (E0, F0)),
        "spk.md": spk_md,
    }
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
                return timed(lambda k: dyn.run(k), 10, seconds)

            return go

        methods["ASE"] = ase_md(lambda: CRMSECalculator(model))
        methods["ASE+SpkCalculator"] = ase_md(lambda: spk_calculator(spk_full, MODEL["cutoff"], dtype=torch.float32))
    return methods


def make_dead_methods(
    frames: Frames, R: int, model, seconds: float, dead_fraction: float, compaction: dict[str, dict]
) -> dict[str, Callable[[], tuple[float, float]]]:
    """crmse engine rates with round(dead_fraction · R) replicas frozen, batch compacted or not (replica-steps/s)."""
    z = frames.z
    x = torch.as_tensor(frames.R[np.arange(R) % len(frames)], dtype=torch.float32)
    n_dead = round(dead_fraction * R)
    chunk = 10 if R <= 64 else 2

    def engine(energy_forces, compact: bool, name: str) -> Callable[[], tuple[float, float]]:
        def go() -> tuple[float, float]:
            # No bond check: the random-weight model would break bonds within a few hundred steps, and the
            # living replicas must stay R − n_dead for the whole timing (checked below).
            eng = Langevin(energy_forces(), masses(z), DT, TEMPERATURE, FRICTION, compact=compact)
            state = eng.init_state(x, seed=0)
            state.alive[:n_dead] = False  # as a blow-up leaves them: frozen at their last good state
            state.unstable_step[:n_dead] = 0
            rate = timed(lambda k: eng.step(state, k), chunk, seconds)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--molecules", nargs="+", default=["ethanol", "aspirin"])
    ap.add_argument("--replicas", nargs="+", type=int, default=[1, 16, 64, 256])
    ap.add_argument("--seconds", type=float, default=1.5, help="timing window per method and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dead-fraction", type=float, default=0.0,
                    help="only compare frozen replicas in / out of the batch, with this fraction frozen")
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/out/md_throughput[_dead].json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    if args.dead_fraction > 0:
        return dead_main(args)
    args.out = args.out or str(REPO / "benchmarks/out/md_throughput.json")

    results: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs visible (shared), torch {torch.__version__}, "
        f"{args.threads} threads",
        "load_average_start": os.getloadavg(),
        "settings": {"model": MODEL, "dt_fs": DT, "T_K": TEMPERATURE, "friction_per_fs": FRICTION,
                     "seconds": args.seconds, "rounds": args.rounds},
        "rows": [],
    }
    for mol in args.molecules:
        frames = frames_of(mol)
        model = build_model(frames.z, MODEL, frames).eval()
        with tempfile.TemporaryDirectory() as tmp:
            spk_file = Path(tmp) / "spk.pt"
            # schnetpack.md switches post-processing off anyway; dropping it also avoids a schnetpack 2.2.0
            # crash in SchNetPackCalculator (it formats AddOffsets' shape-(1,) mean as a scalar).
            nnp = to_schnetpack(model)
            nnp.postprocessors = torch.nn.ModuleList()
            torch.save(nnp, spk_file)
            spk_full = Path(tmp) / "spk_full.pt"  # with post-processing, for schnetpack's ASE calculator
            export_schnetpack(model, spk_full)
            ase: dict[str, dict[str, float]] = {}
            for R in args.replicas:
                methods = make_methods(frames, R, spk_file, spk_full, model, args.seconds)
                samples: dict[str, list[tuple[float, float]]] = {k: [] for k in methods}
                for _ in range(args.rounds):
                    for name, fn in methods.items():
                        samples[name].append(fn())
                row: dict = {"molecule": mol, "R": R}
                for i, clock in enumerate(("wall", "cpu")):
                    row[clock] = {k: max(v[i] for v in vals) for k, vals in samples.items()}
                    row[clock + "_median"] = {k: statistics.median(v[i] for v in vals) for k, vals in samples.items()}
                    for name in ("ASE", "ASE+SpkCalculator"):
                        if name in row[clock]:
                            ase.setdefault(clock, {})[name] = row[clock][name]
                        elif clock in ase and name in ase[clock]:
                            row[clock][name] = ase[clock][name]  # one replica at a time: same rate for any R
                results["rows"].append(row)
                print(format_row(row), flush=True)
    results["load_average_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print("\nreplica-steps per CPU second of this process (best round):\n")
    print(table(results, "cpu"))
    print("\nreplica-steps per wall second (best round; disturbed by other jobs):\n")
    print(table(results, "wall"))
    print(f"\nwritten {args.out}; load average {results['load_average_start']} -> {results['load_average_end']}")


def cpu_model() -> str:
    """The CPU's model name (Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def dead_main(args: argparse.Namespace) -> None:
    """The frozen-replica comparison (``--dead-fraction``)."""
    out = args.out or str(REPO / "benchmarks/out/md_throughput_dead.json")
    results: dict = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {cpu_model()}, {os.cpu_count()} CPUs visible (shared), "
        f"torch {torch.__version__}, {args.threads} threads",
        "load_average_start": os.getloadavg(),
        "settings": {"model": MODEL, "dt_fs": DT, "T_K": TEMPERATURE, "friction_per_fs": FRICTION,
                     "seconds": args.seconds, "rounds": args.rounds, "dead_fraction": args.dead_fraction},
        "rows": [],
    }
    for mol in args.molecules:
        frames = frames_of(mol)
        model = build_model(frames.z, MODEL, frames).eval()
        for R in args.replicas:
            compaction: dict[str, dict] = {}
            methods = make_dead_methods(frames, R, model, args.seconds, args.dead_fraction, compaction)
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


def format_row(row: dict) -> str:
    return f"{row['molecule']} R={row['R']}: " + ", ".join(
        f"{k} {row['cpu'][k]:.0f} (wall {row['wall'][k]:.0f})" for k in row["cpu"]
    )


def table(results: dict, clock: str = "cpu") -> str:
    """Markdown table of best-round replica-steps/s (per CPU second or per wall second) and the goal ratios."""
    lines = [
        "| molecule | R | bare eval | crmse.langevin | crmse + Verlet list | schnetpack.md | ASE (crmse calc)* | "
        "ASE (SpkCalculator)* | integrator cost / bare eval | crmse vs bare | crmse / spk.md | crmse+VL / spk.md | "
        "best crmse / ASE (crmse calc) | best crmse / ASE (Spk) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        b = row[clock]
        best = max(b["crmse"], b["crmse+VL"])
        lines.append(
            f"| {row['molecule']} | {row['R']} | {b['bare']:.0f} | {b['crmse']:.0f} | {b['crmse+VL']:.0f} | "
            f"{b['spk.md']:.0f} | {b['ASE']:.0f} | {b['ASE+SpkCalculator']:.0f} | "
            f"{100 * b['bare'] / b['integrator only']:.1f}% | {100 * (b['bare'] / b['crmse'] - 1):+.1f}% | "
            f"{b['crmse'] / b['spk.md']:.2f}× | "
            f"{b['crmse+VL'] / b['spk.md']:.2f}× | {best / b['ASE']:.1f}× | {best / b['ASE+SpkCalculator']:.1f}× |"
        )
    return "\n".join(lines) + "\n\n*ASE runs one replica at a time: its replica-steps/s is measured at R = 1."


if __name__ == "__main__":
    sys.exit(main())
