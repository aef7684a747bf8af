"""DVC stage `pretrain`: MSE training of the SchNet potential on one (molecule, size, seed) split.

Writes models/<mol>/n<size>/s<seed>/{mse.pt, mse_spk.pt, mse_log.csv, mse_metrics.json}.
"""

import os

# Before torch loads OpenMP: on a shared CPU, spinning OpenMP threads slow training ~50x
# (measured: 2.1 s instead of 40 ms per batch with other jobs running); passive waiting avoids it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from crmse.params import load_params  # noqa: E402
from crmse.stage import run_parser
from crmse.train import pretrain  # noqa: E402

if __name__ == "__main__":
    parser = run_parser(__doc__)
    args = parser.parse_args()
    m = pretrain(args.molecule, args.size, args.seed, load_params(molecule=args.molecule))
    print(
        f"{args.molecule} n{args.size} s{args.seed}: test E MAE {m['test']['energy_mae']:.3f} kcal/mol, "
        f"F MAE {m['test']['force_mae']:.3f} kcal/mol/Å; {m['epochs']} epochs in {m['wall_s'] / 60:.1f} min "
        f"on {m['device']} ({m['stop_reason']})"
    )
