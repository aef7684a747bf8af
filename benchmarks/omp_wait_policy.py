"""How OMP_WAIT_POLICY changes the speed of sampling and CRMSE on this machine (ratios in one run).

The Makefile exports ``OMP_WAIT_POLICY=PASSIVE`` (idle OpenMP threads sleep), which protects a machine
shared with other jobs; on a quiet machine the wake-ups cost time. This script runs the same two workloads
in fresh subprocesses under each policy, interleaved round by round so that a change in machine load hits
every policy alike:

* ``md``: benchmarks/md_throughput.py, the sample stage's engine (``crmse+VL``), small model, 64 replicas,
  ethanol and aspirin; replica-steps per wall second;
* ``crmse``: benchmarks/crmse_throughput.py, the post-training loop (arm crmse, 32 chains), ethanol;
  iterations per wall second.

Policies: PASSIVE, ACTIVE and unset (the OpenMP runtime's default). Printed: the best round of each
(workload, policy) and its ratio to PASSIVE; JSON in benchmarks/out/omp_wait_policy.json. The outputs of the
stages do not depend on the policy (deterministic kernels), only their wall time.

    python benchmarks/omp_wait_policy.py [--rounds 3] [--seconds 5] [--threads 2]
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

POLICIES = ("PASSIVE", "ACTIVE", "unset")


def run(policy: str, cmd: list[str]) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def md_rates(policy: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    out = tmp / "md.json"
    run(policy, [sys.executable, str(REPO / "benchmarks/md_throughput.py"), "--device", "cpu", "--model", "small",
                 "--molecules", "ethanol", "aspirin", "--replicas", "64", "--methods", "crmse+VL",
                 "--seconds", str(args.seconds), "--rounds", "1", "--threads", str(args.threads), "--out", str(out)])
    return {f"md {r['molecule']}": r["wall"]["crmse+VL"] for r in json.loads(out.read_text())["rows"]}


def crmse_rate(policy: str, args: argparse.Namespace, tmp: Path) -> dict[str, float]:
    out = tmp / "crmse.json"
    run(policy, [sys.executable, str(REPO / "benchmarks/crmse_throughput.py"), "--device", "cpu", "--model", "small",
                 "--molecules", "ethanol", "--arms", "crmse", "--chains", "32", "--iterations",
                 str(args.iterations), "--warmup", "3", "--threads", str(args.threads), "--out", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    return {"crmse ethanol": row["iterations_per_s"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds; each runs every policy once (default 3)")
    ap.add_argument("--seconds", type=float, default=5.0, help="MD seconds per molecule per round (default 5)")
    ap.add_argument("--iterations", type=int, default=30, help="timed CRMSE iterations per round (default 30)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2, the stages' default here)")
    ap.add_argument("--out", default=str(REPO / "benchmarks/out/omp_wait_policy.json"))
    args = ap.parse_args()
    best: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            for policy in POLICIES:
                for rates in (md_rates(policy, args, Path(tmp)), crmse_rate(policy, args, Path(tmp))):
                    for name, rate in rates.items():
                        best.setdefault(name, {})[policy] = max(rate, best.get(name, {}).get(policy, 0.0))
                print(f"round {i + 1}/{args.rounds}, {policy}: done", flush=True)
    result: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device_info": device_info(torch.device("cpu"), args.threads), "load_average_end": os.getloadavg(),
        "settings": vars(args), "best_rate": best,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print("\n| workload | unit | " + " | ".join(POLICIES) + " | ACTIVE / PASSIVE | unset / PASSIVE |")
    print("|---|---|" + "---|" * (len(POLICIES) + 2))
    for name, rates in best.items():
        unit = "it/s" if name.startswith("crmse") else "replica-steps/s"
        cells = " | ".join(f"{rates[p]:.1f}" for p in POLICIES)
        print(f"| {name} | {unit} | {cells} | {rates['ACTIVE'] / rates['PASSIVE']:.2f} | "
              f"{rates['unset'] / rates['PASSIVE']:.2f} |")
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
