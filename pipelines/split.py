"""DVC stage `split`: seeded train/val/test split and reference pool of one (molecule, size, seed)."""

import hashlib
import sys

from crmse.data import DataError, load_frames, make_split, stride_to
from crmse.io import run_dir, write_json
from crmse.params import check_sizes
from crmse.stage import run_parser, stage_params

if __name__ == "__main__":
    parser = run_parser(__doc__)
    args = parser.parse_args()
    params = stage_params(args)
    try:
        frames = load_frames(f"data/raw/{args.molecule}.npz", args.molecule, params["data"]["variant"])
    except DataError as exc:
        sys.exit(f"split: {exc} (rerun the download stage: dvc repro -f download@{args.molecule})")
    check_sizes(params, {args.molecule: len(frames)})
    sp = params["split"]
    idx = make_split(len(frames), args.size, sp["n_val"], sp["n_test"], args.seed)
    idx["reference"] = stride_to(idx["reference"], sp["max_reference"])
    out = run_dir("data/splits", args.molecule, args.size, args.seed)
    for name, sel in idx.items():
        frames.subset(sel).save(out / f"{name}.npz")
    write_json(
        out / "split.json",
        {
            "molecule": args.molecule,
            "n_train": args.size,
            "seed": args.seed,
            "counts": {k: len(v) for k, v in idx.items()},
            "indices_sha256": {k: hashlib.sha256(v.tobytes()).hexdigest() for k, v in idx.items()},
        },
    )
    print(f"{args.molecule} n{args.size} s{args.seed}: " + ", ".join(f"{k} {len(v)}" for k, v in idx.items()))
