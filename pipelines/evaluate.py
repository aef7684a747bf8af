"""DVC stage `evaluate`: observables and metrics of the MSE and CRMSE models of one (molecule, size, seed)."""

import argparse
import sys

import torch

from crmse.evaluate import EvaluateError, evaluate_run
from crmse.model import resolve_device
from crmse.params import load_params

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("molecule")
    parser.add_argument("size", type=int)
    parser.add_argument("seed", type=int)
    args = parser.parse_args()
    params = load_params()
    if params["torch_threads"] > 0:
        torch.set_num_threads(params["torch_threads"])
    try:
        m = evaluate_run(args.molecule, args.size, args.seed, params, device=resolve_device(params["device"]))
    except EvaluateError as exc:
        sys.exit(f"error: {exc}")
    nf = m["noise_floor"]
    for name in ("mse", "crmse"):
        r = m[name]
        print(
            f"{name}: test E/F MAE {r['test_energy_mae']:.3f}/{r['test_forces_mae']:.3f}, "
            f"stable {r['stable_fraction']:.2f}, spurious replicas {r['spurious_replica_fraction']:.2f}, "
            f"h(r) MAE {r.get('hr_mae', float('nan')):.3f} (floor {nf['hr_mae']:.3f}), "
            f"E W1 {r.get('energy_w1', float('nan')):.2f} (floor {nf['energy_w1']:.2f})"
        )
