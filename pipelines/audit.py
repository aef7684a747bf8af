"""DVC stage `audit`: PySCF single points (PBE/def2-SVP) on frames each model sampled, one (molecule, size, seed).

Writes metrics/<mol>/n<size>/s<seed>/audit.json (metrics), .../audit_frames.csv (per-frame table) and
results/<mol>/n<size>/s<seed>/audit.npz (geometries, model and DFT energies/forces of the audited frames).
Molecules not in audit.molecules get a small "skipped" JSON, an empty table and an empty npz, so the
stage's outputs are the same for every branch. DFT results are memoised per frame in a persistent
folder (default cache/dft, or $CRMSE_DFT_CACHE) that is not a DVC output: DVC deletes outputs before a
stage runs, and a DFT energy depends only on the geometry and the settings, which form the cache key.
"""

import os
import sys

import numpy as np

from crmse.audit import (
    AuditConfig,
    DFTCache,
    DFTSettings,
    SampleRun,
    model_energy_forces,
    run_audit,
    write_rows_csv,
)
from crmse.data import Frames
from crmse.io import run_dir, write_json, write_npz
from crmse.params import load_params
from crmse.stage import run_parser, set_torch_threads

MODELS = ("mse", "crmse")


def _frames(path):
    with np.load(path) as d:
        return Frames(**{k: d[k] for k in ("z", "R", "E", "F", "md17_index")})


if __name__ == "__main__":
    parser = run_parser(__doc__)
    parser.add_argument("--cache", default=os.environ.get("CRMSE_DFT_CACHE", "cache/dft"),
                        help="persistent per-frame DFT cache folder (default: cache/dft or $CRMSE_DFT_CACHE)")
    args = parser.parse_args()
    params = load_params(molecule=args.molecule)
    audit = params["audit"]
    mol, size, seed = args.molecule, args.size, args.seed
    out_metrics = run_dir("metrics", mol, size, seed)
    out_results = run_dir("results", mol, size, seed)

    if mol not in audit["molecules"]:
        write_json(out_metrics / "audit.json", {"skipped": True, "reason": f"{mol} is not in audit.molecules"})
        write_rows_csv(out_metrics / "audit_frames.csv", [])
        write_npz(out_results / "audit.npz", z=np.asarray([], dtype=np.int64))
        print(f"audit {mol} n{size} s{seed}: skipped ({mol} not in audit.molecules {audit['molecules']})")
        sys.exit(0)


    from crmse.model import load_checkpoint
    from crmse.observables import BondReference, SpuriousDetector

    set_torch_threads(params)
    split = run_dir("data/splits", mol, size, seed)
    reference, test = _frames(split / "reference.npz"), _frames(split / "test.npz")
    ev = params["evaluate"]
    bonds = BondReference.from_frames(reference.z, reference.R, ev["bond_factor"]).bonds
    detector = SpuriousDetector.from_reference(
        reference.z, reference.R, reference.E, bonds, ev["spurious_energy_margin"], ev["spurious_distance_margin"]
    )
    samples, models = {}, {}
    for name in MODELS:
        samples[name] = SampleRun.load(out_results / name / "samples.npz")
        model, _ = load_checkpoint(run_dir("models", mol, size, seed) / f"{name}.pt", device="cpu")
        model.eval()
        models[name] = model_energy_forces(model, batch_size=ev["batch_size"])
        z_s = samples[name].z
        if z_s is not None and not np.array_equal(z_s, reference.z):
            sys.exit(f"audit: {name} samples have atoms {z_s.tolist()}, the reference pool {reference.z.tolist()}")

    settings = DFTSettings.from_params(audit)
    config = AuditConfig(audit["n_lowest"], audit["n_spurious"], audit["n_random"], audit["n_reference"], seed)
    result = run_audit(reference.z, reference, samples, models, detector, settings, config,
                       cache=DFTCache(args.cache), test=test)
    metrics = {"molecule": mol, "n_train": size, "seed": seed, "variant": params["data"]["variant"],
               **result.metrics}
    write_json(out_metrics / "audit.json", metrics)
    write_rows_csv(out_metrics / "audit_frames.csv", result.rows)
    write_npz(out_results / "audit.npz", **result.arrays)

    off, dft = result.metrics["offset"], result.metrics["dft"]
    print(f"audit {mol} n{size} s{seed}: offset DFT - label {off.get('offset', float('nan')):+.2f} "
          f"± {off.get('std', float('nan')):.2f} kcal/mol (n={off.get('n')}); {dft['n_frames']} frames, "
          f"{dft['n_computed']} computed, {dft['n_failed']} failed, {dft['seconds_per_frame'] or 0:.1f} s/frame")
    for name, m in result.metrics["models"].items():
        r, s = m["random"], m["spurious"]
        print(f"  {name}: random E MAE {r['energy_mae']} F MAE {r['forces_mae']} (test E {m.get('test_energy_mae')}); "
              f"spurious n={s['n']} model-min {s['model_rel_dft_min']['min']} DFT {s['dft_rel_dft_min']['min']}")
