"""DVC stage `evaluate`: observables and metrics of the MSE and CRMSE models of one (molecule, size, seed).

``--temperature K`` evaluates the temperature-ablation samples in the run's T<K>/ sub-folders.
"""

import sys

from crmse.evaluate import EvaluateError, evaluate_run
from crmse.io import temperature_variant
from crmse.model import resolve_device
from crmse.params import load_params
from crmse.stage import run_parser, set_torch_threads

if __name__ == "__main__":
    parser = run_parser(__doc__, ablation=True)
    args = parser.parse_args()
    params = load_params(molecule=args.molecule)
    set_torch_threads(params)
    try:
        m = evaluate_run(args.molecule, args.size, args.seed, params, device=resolve_device(params["device"]),
                         variant=temperature_variant(args.temperature))
    except EvaluateError as exc:
        sys.exit(f"error: {exc}")
    nf = m["noise_floor"]

    def f(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    for name in ("mse", "crmse"):
        r = m[name]
        print(
            f"{name}: test E/F MAE {f(r['test_energy_mae'])}/{f(r['test_forces_mae'])}, "
            f"stable {f(r['stable_fraction'], 2)}, spurious replicas {f(r['spurious_replica_fraction'], 2)}, "
            f"h(r) MAE {f(r.get('hr_mae'))} (floor {f(nf['hr_mae'])}), "
            f"E W1 {f(r.get('energy_w1'), 2)} (floor {f(nf['energy_w1'], 2)})"
        )
