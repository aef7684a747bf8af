"""DVC stage `crmse`: contrastive post-training of the MSE model of one (molecule, size, seed).

(Not named crmse.py: a script of that name would shadow the crmse package.)

Reads models/<mol>/n<size>/s<seed>/mse.pt (+ mse_metrics.json for T_conf of the training
frames) and the split; writes crmse.pt (same checkpoint format as mse.pt), crmse_log.csv
(per iteration), crmse_val.csv (per evaluation) and crmse_metrics.json.
"""

import sys

from crmse.contrastive import CRMSEConfig, chain_monitors, train_crmse
from crmse.data import load_frames
from crmse.io import read_json, run_dir, write_json
from crmse.model import load_checkpoint, resolve_device, save_checkpoint
from crmse.params import load_params
from crmse.stage import run_parser, set_torch_threads
from crmse.train import evaluate_errors, write_log_csv

if __name__ == "__main__":
    parser = run_parser(__doc__)
    args = parser.parse_args()
    params = load_params(molecule=args.molecule)
    set_torch_threads(params)
    device = resolve_device(params["device"])
    run = run_dir("models", args.molecule, args.size, args.seed)
    if not (run / "mse.pt").exists():
        sys.exit(f"crmse: {run / 'mse.pt'} not found (run the pretrain stage)")
    model, mse_meta = load_checkpoint(run / "mse.pt", device=device)
    split = run_dir("data/splits", args.molecule, args.size, args.seed)
    variant = params["data"]["variant"]
    train, val, test = (load_frames(split / f"{name}.npz", args.molecule, variant) for name in ("train", "val", "test"))

    c, ev = params["crmse"], params["evaluate"]
    temperature = c["temperature"]
    if temperature == "auto":
        # The same T_conf of the reference pool (MSE model Laplacian) that the sample stage uses.
        temperature = read_json(run / "mse_metrics.json")["T_auto_K"]
    cfg = CRMSEConfig.from_params(c, temperature, args.seed)
    stability, detector = chain_monitors(train, val, ev)
    print(f"crmse {args.molecule} n{args.size} s{args.seed}: T_chain {temperature:.1f} K, {cfg.iterations} iterations")
    result = train_crmse(model, train, val, cfg, stability, detector, device=device)

    test_err = evaluate_errors(model, test, batch_size=64)
    val_err = evaluate_errors(model, val, batch_size=64)
    meta = {
        "stage": "crmse",
        "molecule": args.molecule,
        "train_size": args.size,
        "seed": args.seed,
        "pretrained": mse_meta,
        "T_chain_K": temperature,
        "selected_iteration": result.selected_iteration,
        "selection": result.selection_note,
    }
    save_checkpoint(model, run / "crmse.pt", meta)
    write_log_csv(run / "crmse_log.csv", result.log, list(result.log[0]))
    write_log_csv(run / "crmse_val.csv", result.val_log, list(result.val_log[0]))
    last = result.val_log[-1]
    chosen = next((r for r in result.val_log if r["iteration"] == result.selected_iteration), last)
    write_json(
        run / "crmse_metrics.json",
        {
            "T_chain_K": temperature,
            "selected_iteration": result.selected_iteration,
            "selection": result.selection_note,
            "val_energy_mae": val_err["energy_mae"],
            "val_force_mae": val_err["force_mae"],
            "test_energy_mae": test_err["energy_mae"],
            "test_force_mae": test_err["force_mae"],
            "final_gap": last["gap"],
            "chain_blowups": int(sum(r["blowups"] for r in result.log)),
            "chains_spurious_at_end": last["n_spurious"],
            "holes_remembered": int(result.log[-1].get("holes_stored", 0)),
            "chain_failures_before_selected": chosen["chain_failures"],
            "wall_s": result.wall_s,
            "device": str(device),
        },
    )
    print(
        f"crmse: selected iteration {result.selected_iteration} ({result.selection_note}); test E MAE "
        f"{test_err['energy_mae']:.3f} kcal/mol, F MAE {test_err['force_mae']:.3f} kcal/mol/Å; {result.wall_s:.0f} s"
    )
