"""DVC stage `audit`: PySCF single points (PBE/def2-SVP) on frames one arm sampled at one temperature setting.

Writes metrics/<run>/T<setting>/<arm>/audit.json (metrics), .../audit_frames.csv (per-frame table) and
results/<run>/T<setting>/audit_<arm>.npz (geometries, model and DFT energies/forces of the audited frames);
DFT wall times and cache use go to timings/<run>/T<setting>/audit_<arm>.json.
Molecules not in audit.molecules get a small "skipped" JSON, an empty table and an empty npz, so the
stage's outputs are the same for every branch. DFT results are memoised per frame in a persistent
folder (default cache/dft, or $CRMSE_DFT_CACHE) that is not a DVC output: DVC deletes outputs before a
stage runs, and a DFT energy depends only on the geometry and the settings, which form the cache key.
"""

import os
import sys

import numpy as np

from crmse.artifacts import ARMS, ReferenceMonitors, load_samples, load_split, valid_frames
from crmse.audit import AuditConfig, DFTCache, DFTSettings, SampleRun, model_energy_forces, run_audit, write_rows_csv
from crmse.io import write_json, write_npz
from crmse.stage import configure_torch, input_errors, run_parser, run_paths, stage_params

if __name__ == "__main__":
    parser = run_parser(__doc__, temperature=True, arms=ARMS)
    parser.add_argument("--cache", default=os.environ.get("CRMSE_DFT_CACHE", "cache/dft"),
                        help="persistent per-frame DFT cache folder (default: cache/dft or $CRMSE_DFT_CACHE)")
    args = parser.parse_args()
    params = stage_params(args)
    audit = params["audit"]
    paths = run_paths(args)
    out_metrics = paths.metrics_dir(args.temperature, args.arm)
    out_npz = paths.samples_dir(args.temperature, args.arm).with_name(f"audit_{args.arm}.npz")
    label = f"audit {paths.rel} T{args.temperature} {args.arm}"

    if args.molecule not in audit["molecules"]:
        reason = f"{args.molecule} is not in audit.molecules"
        write_json(out_metrics / "audit.json", {"skipped": True, "reason": reason})
        write_rows_csv(out_metrics / "audit_frames.csv", [])
        write_npz(out_npz, z=np.asarray([], dtype=np.int64))
        print(f"{label}: skipped ({args.molecule} not in audit.molecules {audit['molecules']})")
        sys.exit(0)

    from crmse.model import load_checkpoint

    configure_torch(params)
    ev = params["evaluate"]
    with input_errors(label):
        reference, test = load_split(paths.split("reference")), load_split(paths.split("test"))
        samples = load_samples(paths.samples_dir(args.temperature, args.arm) / "samples.npz", z=reference.z)
        model, _ = load_checkpoint(paths.checkpoint(args.arm), device="cpu", expected_z=reference.z)
    model.eval()
    monitors = ReferenceMonitors.from_pool(reference, ev)
    _, valid = valid_frames(samples, monitors.bonds, ev["bond_tolerance"])

    settings = DFTSettings.from_params(audit)
    config = AuditConfig(audit["n_lowest"], audit["n_spurious"], audit["n_random"], audit["n_reference"], args.seed)
    result = run_audit(reference.z, reference, {args.arm: SampleRun(samples.R, samples.E, valid, samples.time_ps)},
                       {args.arm: model_energy_forces(model, batch_size=ev["batch_size"])}, monitors.detector,
                       settings, config, cache=DFTCache(args.cache), test=test)
    metrics = {"molecule": args.molecule, "n_train": args.size, "seed": args.seed, "arm": args.arm,
               "temperature_setting": args.temperature, "variant": params["data"]["variant"], **result.metrics}
    write_json(out_metrics / "audit.json", metrics)
    write_rows_csv(out_metrics / "audit_frames.csv", result.rows)
    write_npz(out_npz, **result.arrays)
    write_json(paths.timing("audit", args.arm, args.temperature), result.timing)

    off, dft = result.metrics["offset"], result.metrics["dft"] | result.timing
    print(f"{label}: offset DFT - label {off.get('offset', float('nan')):+.2f} "
          f"± {off.get('std', float('nan')):.2f} kcal/mol (n={off.get('n')}); {dft['n_frames']} frames, "
          f"{dft['n_computed']} computed, {dft['n_failed']} failed")
    m = result.metrics["models"][args.arm]
    r, s = m["random"], m["spurious"]
    print(f"  random E MAE {r['energy_mae']} F MAE {r['forces_mae']} (test E {m.get('test_energy_mae')}); "
          f"spurious n={s['n']} model-min {s['model_rel_dft_min']['min']} DFT {s['dft_rel_dft_min']['min']}")
