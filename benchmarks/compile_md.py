"""Does ``torch.compile`` pay for itself in the sample stage? Eager against compiled MD, ratios in one run.

The sample stage's engine exactly as ``pipelines/sample.py`` builds it (a trained checkpoint, the Verlet pair
list of ``md.skin``, pruned every step, so the pair count changes from step to step), once eager and once with
``Potential.energy_with_pairs`` compiled with dynamic shapes (static shapes would recompile at every step; with
``--skin 0`` every pair is kept, frozen replicas stay in the batch, and the shapes are fixed). Same start frames,
seed and replicas; rounds alternate between the two so that a change in machine load hits both. Printed and written to
benchmarks/out/compile_md.json: the compile time (the compiled engine's set-up and first steps, less the
eager one's), replica-steps per wall second per round, their ratio, the number of steps the compile time
takes to repay, and the largest force difference between the two models on the eager run's last positions
(kcal/mol/Å).

``--mode reduce-overhead`` adds CUDA graphs on a GPU (static shapes: use it with ``--skin 0``); on a CPU it
compiles as ``default`` does.

    python benchmarks/compile_md.py [--molecules ethanol aspirin] [--workspace .] [--size 200] [--seed 0]
        [--device cpu|cuda|auto] [--replicas 64] [--steps 200] [--rounds 3] [--threads 1] [--skin SKIN]
        [--mode default]

Needs the pipeline's MSE checkpoint and reference split of (molecule, size, seed) under ``--workspace``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from md_throughput import REPO, device_info, pick_device, synchronizer  # noqa: E402

from crmse.artifacts import RunPaths, load_split  # noqa: E402
from crmse.langevin import Langevin  # noqa: E402
from crmse.model import load_checkpoint  # noqa: E402
from crmse.pairlist import VerletPotential  # noqa: E402
from crmse.params import load_params  # noqa: E402
from crmse.stage import configure_torch  # noqa: E402
from crmse.units import masses  # noqa: E402

WARM_STEPS = 2  # the compiled engine compiles in its first steps (forward and backward, first shapes)


def engine(paths: RunPaths, md: dict[str, Any], skin: float, compiled: bool, args: argparse.Namespace,
           device: torch.device) -> tuple[Langevin, Any, float, Any]:
    """(engine, state after WARM_STEPS, seconds to build and warm it, model) for one molecule."""
    t = time.perf_counter()
    model, _ = load_checkpoint(paths.checkpoint("mse"), device=device)
    model.eval()
    if compiled:
        model.energy_with_pairs = torch.compile(
            model.energy_with_pairs, mode=None if args.mode == "default" else args.mode, dynamic=skin > 0)
    energy_forces = VerletPotential(model, skin=skin) if skin > 0 else model.energy_and_forces
    reference = load_split(paths.split("reference"))
    # 600 K: a throughput run near the sample stage's `auto` temperatures (559-674 K).
    # All pairs: frozen replicas stay in the batch too (compact=False), so every step has the same shapes.
    eng = Langevin(energy_forces, masses(reference.z), md["dt"], 600.0, md["friction"], device=device,
                   compact=skin > 0)
    state = eng.init_state(reference.R[np.arange(args.replicas) % len(reference.R)], seed=0)
    eng.step(state, WARM_STEPS)
    synchronizer(device)()
    return eng, state, time.perf_counter() - t, model


def measure(molecule: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    paths = RunPaths(molecule, args.size, args.seed, Path(args.workspace))
    missing = [str(p) for p in (paths.checkpoint("mse"), paths.split("reference")) if not p.exists()]
    if missing:
        sys.exit(f"compile_md: missing {', '.join(missing)} (run `make repro` there first, or pass --workspace)")
    md = load_params(Path(args.workspace) / "params.yaml", molecule=molecule)["md"]
    skin = md["skin"] if args.skin is None else args.skin
    runs = {name: engine(paths, md, skin, name == "compiled", args, device) for name in ("eager", "compiled")}
    sync = synchronizer(device)
    rates: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, (eng, state, _, _) in runs.items():
            t = time.perf_counter()
            eng.step(state, args.steps)
            sync()
            rates[name].append(args.steps * args.replicas / (time.perf_counter() - t))
    x = runs["eager"][1].R.clone()
    dF = (runs["compiled"][3].energy_and_forces(x)[1] - runs["eager"][3].energy_and_forces(x)[1]).abs().max()
    compile_s = runs["compiled"][2] - runs["eager"][2]
    best = max(rates["compiled"]) / max(rates["eager"])
    step_saved = args.replicas / max(rates["eager"]) - args.replicas / max(rates["compiled"])
    row = {"molecule": molecule, "replicas": args.replicas, "skin": skin, "compile_s": compile_s, "rates": rates,
           "ratio_best": best, "ratio_median": float(np.median(rates["compiled"]) / np.median(rates["eager"])),
           "repay_steps": compile_s / step_saved if step_saved > 0 else None, "max_dF": float(dF)}
    repay = "never" if row["repay_steps"] is None else f"{row['repay_steps']:,.0f} steps"
    print(f"{molecule}: compile {compile_s:.1f} s; replica-steps/s eager {[round(r) for r in rates['eager']]}, "
          f"compiled {[round(r) for r in rates['compiled']]}; compiled/eager {best:.2f}x (best), "
          f"{row['ratio_median']:.2f}x (median); repays after {repay}; max |dF| {dF:.1e}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--molecules", nargs="+", default=["ethanol", "aspirin"])
    ap.add_argument("--workspace", default=str(REPO), help="pipeline folder with models/ and data/splits/")
    ap.add_argument("--size", type=int, default=200, help="training size of the run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the run")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="cpu")
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200, help="MD steps per timed round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skin", type=float, default=None, help="Å; default params md.skin (0 = all pairs)")
    ap.add_argument("--mode", default="default", help="torch.compile mode (default, reduce-overhead, ...)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/out/compile_md.json"))
    args = ap.parse_args()
    device, reason = pick_device(args.device)
    if device is None:
        sys.exit(f"compile_md: skipped: {reason}")
    configure_torch({"torch_threads": args.threads, "device": device.type})  # threads and kernels as the stages
    result = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
              "load_average": os.getloadavg(), "args": vars(args),
              **device_info(device, args.threads),
              "rows": [measure(m, args, device) for m in args.molecules]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
