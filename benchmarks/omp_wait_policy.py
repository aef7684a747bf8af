"""How OMP_WAIT_POLICY changes the speed of sampling and CRMSE on this machine (ratios in one run).

The Makefile exports ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep), which protects a machine
shared with other jobs; on a quiet machine the wake-ups cost time. This script runs the same two workloads
in fresh subprocesses under each policy, interleaved round by round so that a change in machine load hits
every policy alike:

* ``md``: benchmarks/md_throughput.py, the sample stage's engine (``crmse+VL``), small model, 64 replicas,
  ethanol and aspirin; replica-steps per wall second;
* ``crmse``: benchmarks/crmse_throughput.py, the post-training loop (arm crmse, 32 chains), ethanol;
  iterations per wall second.

Settings: two torch threads under PASSIVE, ACTIVE and unset (the OpenMP runtime's default), and one torch
thread (no OpenMP team to wait on). Printed: the best round of each (workload, setting) and its ratio to
PASSIVE; JSON in benchmarks/out/omp_wait_policy.json. The outputs of the stages do not depend on the policy
or the thread count (deterministic kernels), only their wall time.

    python benchmarks/omp_wait_policy.py [--rounds 3] [--seconds 5] [--iterations 30]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from md_throughput import REPO, device_info  # noqa: E402

SETTINGS = {"PASSIVE": ("PASSIVE", 2), "ACTIVE": ("ACTIVE", 2), "unset": ("unset", 2), "1 thread": ("PASSIVE", 1)}


def run(setting: str, cmd: list[str]) -> None:
    policy, threads = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    cmd = [*cmd, "--threads", str(threads)]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def md_rates(policy: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    out = tmp / "md.json"
    run(policy, [sys.executable, str(REPO / "benchmarks/md_throughput.py"), "--device", "cpu", "--model", "small",
                 "--molecules", "ethanol", "aspirin", "--replicas", "64", "--methods", "crmse+VL",
                 "--seconds", str(args.seconds), "--rounds", "1", "--out", str(out)])
    return {f"md {r['molecule']}": r["wall"]["crmse+VL"] for r in json.loads(out.read_text())["rows"]}


def crmse_rate(policy: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    out = tmp / "crmse.json"
    run(policy, [sys.executable, str(REPO / "benchmarks/crmse_throughput.py"), "--device", "cpu", "--model", "small",
                 "--molecules", "ethanol", "--arms", "crmse", "--chains", "64", "--iterations",
                 str(args.iterations), "--warmup", "3", "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    return {"crmse ethanol": row["iterations_per_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every policy once (default 3)")
    ap.add_argument("--seconds", type=float, default=5.0, help="MD seconds per molecule per round (default 5)")
    ap.add_argument("--iterations", type=int, default=30, help="timed CRMSE iterations per round (default 30)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/out/omp_wait_policy.json"))
    args = ap.parse_args()
    best: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for setting in SETTINGS:
                for rates in (md_rates(setting, args, Path(tmp)), crmse_rate(setting, args, Path(tmp))):
                    for name, rate in rates.items():
                        best.setdefault(name, {})[setting] = max(rate, best.get(name, {}).get(setting, 0.0))
                print(f"round {i + 1}/{args.rounds}, {setting}: done", flush=True)
    result: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device_info": device_info(torch.device("cpu"), 2), "load_average_end": os.getloadavg(),
        "settings": vars(args), "policy_and_threads": SETTINGS, "best_rate": best,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    others = [s for s in SETTINGS if s != "PASSIVE"]
    print("\n| workload | unit | " + " | ".join(SETTINGS) + " | " + " | ".join(f"{s} / PASSIVE" for s in others) + " |")
    print("|---|---|" + "---|" * (len(SETTINGS) + len(others)))
    for name, rates in best.items():
        unit = "it/s" if name.startswith("crmse") else "replica-steps/s"
        cells = " | ".join(f"{rates[s]:.1f}" for s in SETTINGS)
        ratios = " | ".join(f"{rates[s] / rates['PASSIVE']:.2f}" for s in others)
        print(f"| {name} | {unit} | {cells} | {ratios} |")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
