"""DVC stage `evaluate`: observables and metrics of one arm's samples at one temperature setting of one run."""

from crmse.artifacts import ARMS
from crmse.evaluate import evaluate_arm
from crmse.model import resolve_device
from crmse.stage import configure_torch, input_errors, run_parser, run_paths, stage_params

if __name__ == "__main__":
    args = run_parser(__doc__, temperature=True, arms=ARMS).parse_args()
    params = stage_params(args)
    configure_torch(params)
    with input_errors("evaluate"):
        r = evaluate_arm(run_paths(args), args.temperature, args.arm, params, device=resolve_device(params["device"]))

    def f(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    print(
        f"{args.arm}: test E/F MAE {f(r['test_energy_mae'])}/{f(r['test_forces_mae'])}, "
        f"stable {f(r['stable_fraction'], 2)}, spurious replicas {f(r['spurious_replica_fraction'], 2)}, "
        f"h(r) MAE {f(r.get('hr_mae'))}, E W1 {f(r.get('energy_w1'), 2)}"
    )
