"""DVC stage `pretrain`: MSE training of the SchNet potential on one (molecule, size, seed) split.

Writes models/<mol>/n<size>/s<seed>/{mse.pt, mse_spk.pt, mse_log.csv, mse_metrics.json} — the same bytes
for the same seed, so an identical rerun changes no dependency downstream — and timings/<run>/pretrain.json
(wall times and throughput, which vary from run to run; no stage depends on it).
"""

import sys

from crmse.stage import configure_torch, input_errors, run_parser, stage_params
from crmse.temperature import ImplausibleTemperatureError
from crmse.train import pretrain

if __name__ == "__main__":
    args = run_parser(__doc__).parse_args()
    params = stage_params(args)
    configure_torch(params)
    try:
        with input_errors("pretrain"):
            m = pretrain(args.molecule, args.size, args.seed, params)
    except ImplausibleTemperatureError as exc:  # nothing was written; the message says what to do
        sys.exit(f"pretrain {args.molecule} n{args.size} s{args.seed}: {exc}")
    print(
        f"{args.molecule} n{args.size} s{args.seed}: test E MAE {m['test']['energy_mae']:.3f} kcal/mol, "
        f"F MAE {m['test']['force_mae']:.3f} kcal/mol/Å; {m['epochs']} epochs in {m['wall_s'] / 60:.1f} min "
        f"on {m['device']} ({m['stop_reason']}); T_auto {m['T_auto_K']:.1f} K"
    )
