"""GPU-hours of a preset from measured rates: per (molecule, training size, seed) and stage, and the whole preset.

Work per run comes from params.yaml with the preset merged in (nothing is written): MSE pretraining at most
min(max_epochs × n_train, max_steps × batch_size) frames and at most ``max_minutes`` (early stopping usually
ends it sooner, so this is an upper bound); CRMSE ``iterations`` per post-trained arm; sampling
``n_replicas`` × (equilibration + production) / dt replica-steps per (arm, temperature). Rates come from a JSON
(``--rates``, default benchmarks/rates_h200.json) with per molecule ``sample_replica_steps_per_s``,
``crmse_iterations_per_s``, ``crmse_memory_iterations_per_s`` and ``pretrain_frames_per_s``, each a
``{"value": ..., "how": ...}`` saying whether it was measured or estimated. Evaluation, reports and the
PySCF audit (CPU) are not counted.

    python benchmarks/paper_preset_cost.py [--preset paper] [--rates benchmarks/rates_h200.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from crmse.params import for_molecule, validate  # noqa: E402
from crmse.presets import merge_preset  # noqa: E402


def run_hours(p: dict[str, Any], n_train: int, rates: dict[str, Any]) -> dict[str, float]:
    """Hours per stage of one (molecule, n_train, seed) on the device of ``rates`` (that molecule's entry)."""
    rate = {k: float(v["value"]) for k, v in rates.items()}
    mse = p["mse"]
    pretrain_frames = min(mse["max_epochs"] * n_train, mse["max_steps"] * mse["batch_size"])
    hours = {"pretrain (at most)": min(pretrain_frames / rate["pretrain_frames_per_s"], 60 * mse["max_minutes"]) / 3600}
    for arm in p["arms"]:
        if arm != "mse":
            hours[f"posttrain {arm}"] = p["crmse"]["iterations"] / rate[f"{arm}_iterations_per_s"] / 3600
    md = p["md"]
    steps = (md["equilibration_fs"] + 1000.0 * md["production_ps"]) / md["dt"]
    per_sample = md["n_replicas"] * steps / rate["sample_replica_steps_per_s"] / 3600
    hours[f"sample ({len(p['arms'])} arms × {len(md['temperatures'])} T)"] = (
        per_sample * len(p["arms"]) * len(md["temperatures"]))
    return hours


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--rates", default=str(REPO / "benchmarks" / "rates_h200.json"))
    args = ap.parse_args()
    params = validate(merge_preset(args.preset, REPO / "params.yaml", REPO / "presets"))
    rates = json.loads(Path(args.rates).read_text())
    missing = [m for m in params["molecules"] if m not in rates["rates"]]
    if missing:
        sys.exit(f"paper_preset_cost: {args.rates} has no rates for {', '.join(missing)}")
    print(f"preset {args.preset!r}, rates of {rates['device']}\n")
    rows, total = [], 0.0
    for mol in params["molecules"]:
        p = for_molecule(params, mol)
        for n in params["train_sizes"]:
            hours = run_hours(p, n, rates["rates"][mol])
            rows.append((mol, n, hours))
            total += sum(hours.values()) * len(params["seeds"])
    stages = list(rows[0][2])
    print("| molecule | n_train | " + " | ".join(stages) + " | per seed | × seeds |")
    print("|---|---|" + "---|" * (len(stages) + 2))
    for mol, n, hours in rows:
        cells = " | ".join(f"{h:.2f}" for h in hours.values())
        per_seed = sum(hours.values())
        print(f"| {mol} | {n} | {cells} | {per_seed:.2f} | {per_seed * len(params['seeds']):.1f} |")
    print(f"\nwhole preset: {total:.0f} GPU-hours ({len(params['seeds'])} seeds; hours, upper bound for pretraining)")
    for mol in params["molecules"]:
        for key, r in rates["rates"][mol].items():
            print(f"  {mol} {key} = {r['value']}: {r['how']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
