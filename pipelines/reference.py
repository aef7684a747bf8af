"""DVC stage `reference`: the DFT reference pool of one run at one temperature setting.

Writes the spurious-state thresholds, the pool's distributions and their noise floor (the same metrics
between two halves of the pool) to metrics/<run>/T<setting>/reference/.
"""

from crmse.evaluate import evaluate_reference
from crmse.stage import input_errors, run_parser, run_paths, stage_params

if __name__ == "__main__":
    args = run_parser(__doc__, temperature=True).parse_args()
    params = stage_params(args)
    with input_errors("reference"):
        m = evaluate_reference(run_paths(args), args.temperature, params)
    nf = m["noise_floor"]
    print(f"reference: noise floor h(r) MAE {nf['hr_mae']:.3f}, energy W1 {nf['energy_w1']:.2f} kcal/mol")
