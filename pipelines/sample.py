"""DVC stage `sample`: Langevin MD of one model (mse | crmse) of one (molecule, size, seed).

Reads models/<mol>/n<size>/s<seed>/<model>.pt and the split; writes
results/<mol>/n<size>/s<seed>/<model>/{samples.npz, sample.json, trajectory.traj}; with
``--temperature K`` (the temperature ablation) results/<mol>/n<size>/s<seed>/T<K>/<model>/.
An interrupted run resumes from its last complete chunk (results/.../.<model>.partial/).
"""

import sys

from crmse.data import load_frames
from crmse.io import read_json, run_dir, sha256, temperature_variant
from crmse.model import load_checkpoint, resolve_device
from crmse.pairlist import VerletPotential
from crmse.params import load_params
from crmse.sampling import SampleSettings, run_sampling
from crmse.stage import run_parser, set_torch_threads

if __name__ == "__main__":
    parser = run_parser(__doc__, ablation=True)
    parser.add_argument("model", choices=("mse", "crmse"))
    args = parser.parse_args()
    params = load_params(molecule=args.molecule)
    set_torch_threads(params)
    device = resolve_device(params["device"])

    ckpt = run_dir("models", args.molecule, args.size, args.seed) / f"{args.model}.pt"
    if not ckpt.exists():
        stage = "pretrain" if args.model == "mse" else "crmse"
        sys.exit(f"sample: checkpoint {ckpt} not found (run the {stage} stage)")
    model, _ = load_checkpoint(ckpt, device=device)
    model.eval()
    dtype = next(model.parameters()).dtype
    split = run_dir("data/splits", args.molecule, args.size, args.seed)
    variant = params["data"]["variant"]
    train = load_frames(split / "train.npz", args.molecule, variant)
    reference = load_frames(split / "reference.npz", args.molecule, variant)

    T = params["md"]["temperature"] if args.temperature is None else float(args.temperature)
    if T == "auto":
        # T_conf of the reference pool with the MSE model's Laplacian, computed once by the
        # pretrain stage, so that the MSE and the CRMSE model are sampled at one temperature.
        T = read_json(run_dir("models", args.molecule, args.size, args.seed) / "mse_metrics.json")["T_auto_K"]
    setting = params["md"]["temperature"] if args.temperature is None else float(args.temperature)
    print(f"sample: temperature {setting} -> {T:.1f} K")
    settings = SampleSettings.from_params(params, T, args.seed)
    label = f"{args.molecule} n{args.size} s{args.seed} {args.model} {temperature_variant(args.temperature)}".strip()
    skin = params["md"]["skin"]
    # A Verlet list (pairs within the cutoff only) pays off when the molecule is larger than the
    # cutoff sphere (aspirin); the result does not depend on when the list was built.
    energy_forces = VerletPotential(model, skin=skin) if skin > 0 else model.energy_and_forces
    summary = run_sampling(
        energy_forces,
        reference.z,
        reference.R,
        settings,
        run_dir("results", args.molecule, args.size, args.seed) / temperature_variant(args.temperature) / args.model,
        device=device,
        dtype=dtype,
        energy_fn=model.energy,
        meta={
            "label": label,
            "molecule": args.molecule,
            "train_size": args.size,
            "seed": args.seed,
            "model": args.model,
            "checkpoint": str(ckpt),
            "checkpoint_sha256": sha256(ckpt),
            "temperature_setting": setting,
            "pair_list": f"verlet, skin {skin} A, pruned to the cutoff" if skin > 0 else "all pairs",
        },
    )
    st = summary["stability"]
    print(
        f"sample {label}: T {T:.1f} K, T_kin {summary['T_kin_mean_K'] or float('nan'):.1f} K, "
        f"T_conf {summary['T_conf_samples_K'] or float('nan'):.1f} K; stable {st['n_stable']}/{st['n_replicas']}, "
        f"median time to instability {st['median_time_to_instability_ps']:.2f} ps; "
        f"{summary['throughput']['replica_steps_per_s'] or float('nan'):.0f} replica-steps/s on {summary['device']}"
    )
