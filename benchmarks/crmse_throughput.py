"""CRMSE post-training throughput (iterations/s) of crmse.contrastive.train_crmse, arms crmse and crmse_memory.

Runs the pipeline's own loop (``train_crmse``, as pipelines/posttrain.py calls it: fit term, persistent chains,
contrastive term, for ``crmse_memory`` the hole term with its scout chains, weight averaging, selection) on a
randomly initialised SchNet (``--model small`` or ``paper``, see md_throughput.MODELS) for each number of
chains in ``--chains`` (scouts: ``--scouts``, default as many as chains), on ``--device``. Frames: ``--npz``
(an MD17 npz such as $CRMSE_DATA_MIRROR/md17_ethanol.npz; ``--n-train`` random training frames and 64
validation frames), else md_throughput.frames_of (a split of this checkout, or the test fixture with noise).

Each (arm, chains) is run twice: ``--warmup`` iterations (allocator, caches), then ``--iterations`` timed ones
with a single validation at the end (selection every = iterations, rule ``last``), so the rate includes one
validation on 64 frames. CUDA is synchronised before the clock is read. Reported: iterations/s and chain
replica-steps/s = iterations/s × (chains + scouts) × steps per iteration. The chains start from a
random-weight model, so they blow up and restart more often than after pretraining (the blow-ups are counted).

Usage: python benchmarks/crmse_throughput.py [--molecules ethanol] [--chains 64 512] [--device auto]
       [--model small] [--iterations 20] [--npz data.npz] [--out benchmarks/out/crmse_throughput.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from md_throughput import MODELS, REPO, device_info, frames_of, pick_device, synchronizer  # noqa: E402

from crmse.contrastive import ChainConfig, CRMSEConfig, chain_monitors, train_crmse  # noqa: E402
from crmse.data import Frames, load_frames  # noqa: E402
from crmse.holes import HoleConfig, ScoutConfig  # noqa: E402
from crmse.model import build_model  # noqa: E402
from crmse.params import load_params  # noqa: E402
from crmse.selection import SelectionConfig  # noqa: E402


def load_frames_for(molecule: str, npz: str | None, n_train: int, seed: int = 0) -> tuple[Frames, Frames]:
    """(train, val): ``n_train`` and 64 random frames of ``npz`` (MD17 layout), else of md_throughput.frames_of."""
    frames = load_frames(npz, molecule) if npz else frames_of(molecule, n_train + 64)
    idx = np.random.default_rng(seed).permutation(len(frames))
    if len(idx) < n_train + 64:
        idx = np.resize(idx, n_train + 64)
    return frames.subset(idx[:n_train]), frames.subset(idx[n_train:n_train + 64])


def run_once(train: Frames, val: Frames, config: dict[str, Any], arm: str, chains: int, scouts: int,
             iterations: int, steps_per_iter: int, temperature: float, device: torch.device,
             evaluate: dict[str, Any]) -> dict[str, Any]:
    """One train_crmse run of ``iterations`` on a fresh random-weight model; wall time (s) and chain blow-ups."""
    torch.manual_seed(0)
    model = build_model(train.z, config, train)
    cfg = CRMSEConfig(
        chains=ChainConfig(temperature, n=chains, steps_per_iter=steps_per_iter),
        selection=SelectionConfig("last", every=iterations, after=0.0),
        iterations=iterations,
        seed=0,
    )
    holes = HoleConfig(scouts=ScoutConfig(n=scouts)) if arm == "crmse_memory" else None
    stability, detector = chain_monitors(train, val, evaluate)
    sync = synchronizer(device)
    sync()
    t = time.perf_counter()
    result = train_crmse(model, train, val, cfg, holes, stability, detector, device=device, progress=False)
    sync()
    wall = time.perf_counter() - t
    return {"wall_s": wall, "blowups": int(sum(r["blowups"] for r in result.log))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--molecules", nargs="+", default=["ethanol"])
    ap.add_argument("--arms", nargs="+", default=["crmse", "crmse_memory"], choices=["crmse", "crmse_memory"])
    ap.add_argument("--chains", nargs="+", type=int, default=[64], help="persistent chains (crmse.chains.n)")
    ap.add_argument("--scouts", type=int, default=None, help="scout chains of crmse_memory (default: = chains)")
    ap.add_argument("--steps-per-iter", type=int, default=20, help="Langevin steps per iteration")
    ap.add_argument("--iterations", type=int, default=20, help="timed iterations")
    ap.add_argument("--warmup", type=int, default=3, help="untimed iterations of a first run")
    ap.add_argument("--temperature", type=float, default=500.0, help="chain temperature, K")
    ap.add_argument("--n-train", type=int, default=200, help="training frames")
    ap.add_argument("--npz", default=None, help="MD17 npz of the molecule (default: md_throughput.frames_of)")
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--model", choices=sorted(MODELS), default="small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="JSON (default benchmarks/out/crmse_throughput_<device>_<model>.json)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    device, why_not = pick_device(args.device)
    if device is None:
        print(f"crmse_throughput: skipped: {why_not}", flush=True)
        return 0
    out = Path(args.out or REPO / f"benchmarks/out/crmse_throughput_{device.type}_{args.model}.json")
    config = MODELS[args.model]
    results: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device_info": device_info(device, args.threads),
        "settings": {k: v for k, v in vars(args).items() if k != "out"} | {"model_config": config},
        "rows": [],
    }
    print(f"crmse_throughput: {results['device_info']['device_name']}, torch {torch.__version__}, model {args.model}",
          flush=True)
    for mol in args.molecules:
        npz = args.npz.replace("{molecule}", mol) if args.npz else None
        train, val = load_frames_for(mol, npz, args.n_train)
        # The chains' blow-up check and spurious-state detector use params.yaml's thresholds, as posttrain does.
        evaluate = load_params(REPO / "params.yaml", mol)["evaluate"]
        for n in args.chains:
            for arm in args.arms:
                scouts = (n if args.scouts is None else args.scouts) if arm == "crmse_memory" else 0
                common = (train, val, config, arm, n, scouts)
                run_once(*common, args.warmup, args.steps_per_iter, args.temperature, device, evaluate)
                r = run_once(*common, args.iterations, args.steps_per_iter, args.temperature, device, evaluate)
                it_s = args.iterations / r["wall_s"]
                row = {"molecule": mol, "model": args.model, "arm": arm, "chains": n, "scouts": scouts,
                       "iterations": args.iterations, "wall_s": r["wall_s"], "iterations_per_s": it_s,
                       "chain_steps_per_s": it_s * (n + scouts) * args.steps_per_iter, "blowups": r["blowups"]}
                results["rows"].append(row)
                print(f"{mol} {arm} chains {n} scouts {scouts}: {it_s:.2f} it/s, "
                      f"{row['chain_steps_per_s']:.0f} chain-steps/s ({r['blowups']} blow-ups)", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print("\n| molecule | model | arm | chains | scouts | it/s | chain replica-steps/s | blow-ups |\n"
          "|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        print(f"| {r['molecule']} | {r['model']} | {r['arm']} | {r['chains']} | {r['scouts']} | "
              f"{r['iterations_per_s']:.2f} | {r['chain_steps_per_s']:.0f} | {r['blowups']} |")
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
