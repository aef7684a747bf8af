"""Time-step check of the sampler on a trained model: kinetic and configurational temperature vs dt.

For each dt, runs crmse.sampling.run_sampling (same engine, Verlet list, stability check as the
sample stage) with the other settings from params.yaml's ``md`` section unless overridden, and
prints the set temperature, the mean kinetic temperature, T_conf of the samples (model forces and
Laplacian), stability, and T_conf of the reference pool and of the training split (DFT forces,
model Laplacian). Outputs go to benchmarks/out/md_timestep/ (not a pipeline artifact).

Usage: python benchmarks/md_timestep.py ethanol 200 0 [--model mse] [--dt 0.5 0.25]
       [--replicas 32] [--production-ps 5] [--reference-frames 1000]
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from crmse.data import load_frames
from crmse.io import run_dir
from crmse.model import load_checkpoint
from crmse.pairlist import VerletPotential
from crmse.params import load_params
from crmse.sampling import SampleSettings, run_sampling
from crmse.temperature import frames_temperature, resolve_temperature

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("molecule")
    ap.add_argument("size", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("--model", default="mse")
    ap.add_argument("--dt", nargs="+", type=float, default=[0.5, 0.25])
    ap.add_argument("--replicas", type=int, default=None)
    ap.add_argument("--production-ps", type=float, default=None)
    ap.add_argument("--temperature", default=None, help="K or auto (default: params md.temperature)")
    ap.add_argument("--reference-frames", type=int, default=1000)
    args = ap.parse_args()
    params = load_params(REPO / "params.yaml")
    model, _ = load_checkpoint(run_dir(REPO / "models", args.molecule, args.size, args.seed) / f"{args.model}.pt")
    dtype = next(model.parameters()).dtype
    split = run_dir(REPO / "data/splits", args.molecule, args.size, args.seed)
    train = load_frames(split / "train.npz", args.molecule)
    reference = load_frames(split / "reference.npz", args.molecule)

    t0 = time.perf_counter()
    sel = np.linspace(0, len(reference) - 1, min(args.reference_frames, len(reference))).round().astype(int)
    T_ref = frames_temperature(model.energy, reference.R[sel], reference.F[sel], dtype=dtype, progress=True)
    T_setting = args.temperature or params["md"]["temperature"]
    T_setting = T_setting if T_setting == "auto" else float(T_setting)
    T = resolve_temperature(T_setting, model, train)
    T_train = resolve_temperature("auto", model, train)
    out = {"molecule": args.molecule, "model": args.model, "T_set_K": T, "T_conf_reference_K": T_ref,
           "reference_frames": len(sel), "T_conf_train_K": T_train, "runs": []}
    print(f"T_conf reference pool ({len(sel)} frames) {T_ref:.1f} K, training split {T_train:.1f} K, "
          f"set {T:.1f} K ({time.perf_counter() - t0:.0f} s)")

    base = SampleSettings.from_params(params, T, args.seed)
    for dt in args.dt:
        s = replace(base, dt=dt, n_replicas=args.replicas or base.n_replicas,
                    production_ps=args.production_ps or base.production_ps,
                    save_every=max(1, round(base.save_every * base.dt / dt)))  # same saved-frame spacing in fs
        skin = params["md"]["skin"]
        ef = VerletPotential(model, skin=skin) if skin > 0 else model.energy_and_forces
        dest = REPO / f"benchmarks/out/md_timestep/{args.molecule}_n{args.size}_s{args.seed}_{args.model}_dt{dt}"
        summary = run_sampling(ef, reference.z, reference.R, s, dest, dtype=dtype, energy_fn=model.energy,
                               meta={"label": f"dt {dt} fs"})
        st = summary["stability"]
        row = {"dt_fs": dt, "n_replicas": s.n_replicas, "production_ps": s.production_ps,
               "T_kin_K": summary["T_kin_mean_K"], "T_kin_replica_sem_K": summary["T_kin_replica_sem_K"],
               "T_conf_samples_K": summary["T_conf_samples_K"], "stable": f"{st['n_stable']}/{st['n_replicas']}",
               "median_time_to_instability_ps": st["median_time_to_instability_ps"],
               "replica_steps_per_s": summary["throughput"]["replica_steps_per_s"]}
        out["runs"].append(row)
        print(json.dumps(row))
    print(json.dumps(out, indent=2))
    (REPO / "benchmarks/out/md_timestep").mkdir(parents=True, exist_ok=True)
    (REPO / f"benchmarks/out/md_timestep/{args.molecule}_n{args.size}_s{args.seed}_{args.model}.json").write_text(
        json.dumps(out, indent=2) + "\n"
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
