"""DVC stage `sample`: Langevin MD of one arm's model of one (molecule, size, seed) at one temperature setting.

Reads models/<run>/<arm>.pt and the split; writes results/<run>/T<setting>/<arm>/{samples.npz, sample.json,
trajectory.traj} and its throughput to timings/<run>/T<setting>/sample_<arm>.json. An interrupted run resumes
from its last complete chunk (a hidden .partial folder beside it).
"""

import sys

from crmse.artifacts import ARMS, load_split, resolve_temperature
from crmse.io import sha256
from crmse.model import load_checkpoint, resolve_device
from crmse.pairlist import VerletPotential
from crmse.sampling import SampleSettings, run_sampling
from crmse.stage import configure_torch, input_errors, run_parser, run_paths, stage_params

if __name__ == "__main__":
    args = run_parser(__doc__, temperature=True, arms=ARMS).parse_args()
    params = stage_params(args)
    configure_torch(params)
    device = resolve_device(params["device"])
    paths = run_paths(args)

    ckpt = paths.checkpoint(args.arm)
    if not ckpt.exists():
        stage = "pretrain" if args.arm == "mse" else "posttrain"
        sys.exit(f"sample: checkpoint {ckpt} not found (run the {stage} stage)")
    with input_errors("sample"):
        reference = load_split(paths.split("reference"))
        # auto: T_conf of the reference pool with the MSE model's Laplacian, computed once by the pretrain
        # stage, so that every arm is sampled at one temperature.
        T = resolve_temperature(args.temperature, paths)
        model, _ = load_checkpoint(ckpt, device=device, expected_z=reference.z)
    model.eval()
    dtype = next(model.parameters()).dtype
    print(f"sample: temperature {args.temperature} -> {T:.1f} K")
    settings = SampleSettings.from_params(params, T, args.seed)
    label = f"{args.molecule} n{args.size} s{args.seed} {args.arm} T{args.temperature}"
    skin = params["md"]["skin"]
    # A Verlet list (pairs within the cutoff only) pays off when the molecule is larger than the
    # cutoff sphere (aspirin); the result does not depend on when the list was built.
    energy_forces = VerletPotential(model, skin=skin) if skin > 0 else model.energy_and_forces
    summary = run_sampling(
        energy_forces,
        reference.z,
        reference.R,
        settings,
        paths.samples_dir(args.temperature, args.arm),
        device=device,
        dtype=dtype,
        energy_fn=model.energy,
        timing_path=paths.timing("sample", args.arm, args.temperature),
        meta={
            "label": label,
            "molecule": args.molecule,
            "train_size": args.size,
            "seed": args.seed,
            "arm": args.arm,
            "checkpoint": str(ckpt),
            "checkpoint_sha256": sha256(ckpt),
            "temperature_setting": args.temperature,
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
