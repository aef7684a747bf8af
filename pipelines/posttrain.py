"""DVC stage `posttrain`: CRMSE post-training of the MSE model of one (molecule, size, seed), for one arm.

    python pipelines/posttrain.py <molecule> <size> <seed> <arm>      arm: crmse | crmse_memory

``crmse`` is the paper's method (params section ``crmse``); ``crmse_memory`` adds the hole term
(section ``crmse_memory``). Reads models/<run>/mse.pt, mse_metrics.json (T_conf of the data, for
``chains.temperature: auto``) and the split; writes models/<run>/<arm>.pt (same checkpoint format as
mse.pt), <arm>_log.csv (per iteration), <arm>_val.csv (per evaluation) and <arm>_metrics.json — the
same bytes for the same seed, so an identical rerun changes no dependency downstream; wall times and
device go to timings/<run>/posttrain_<arm>.json, on which no stage depends.
"""

import sys
from typing import Any

from crmse.artifacts import POSTTRAINED, RunPaths, load_split, resolve_temperature
from crmse.contrastive import VAL_COLUMNS, CRMSEConfig, CRMSEResult, chain_monitors, train_crmse
from crmse.holes import HoleConfig
from crmse.io import write_json
from crmse.model import load_checkpoint, resolve_device, save_checkpoint
from crmse.stage import configure_torch, input_errors, run_parser, run_paths, stage_params
from crmse.train import evaluate_errors, write_log_csv


def run_metrics(arm: str, result: CRMSEResult, val_err: dict[str, float], test_err: dict[str, float]
                ) -> dict[str, Any]:
    """<arm>_metrics.json: selection, errors of the selected weights (kcal/mol, kcal/mol/Å), chain statistics.

    Nothing that varies from run to run with the same seed (no wall time, no device).
    """
    last = result.val_log[-1]
    chosen = next((r for r in result.val_log if r["iteration"] == result.selected_iteration), last)
    metrics = {
        "arm": arm,
        "T_chain_K": result.temperature,
        "selected_iteration": result.selected_iteration,
        "selection": result.selection_note,
        "val_energy_mae": val_err["energy_mae"],
        "val_force_mae": val_err["force_mae"],
        "test_energy_mae": test_err["energy_mae"],
        "test_force_mae": test_err["force_mae"],
        "final_gap": last["gap"],
        "chain_blowups": int(sum(r["blowups"] for r in result.log)),
        "chains_spurious_at_end": last["n_spurious"],
        "chain_failures_before_selected": chosen["chain_failures"],
    }
    if "holes_stored" in result.log_columns:  # the hole term's
        metrics["holes_remembered"] = int(result.log[-1]["holes_stored"])
    return metrics


def posttrain(paths: RunPaths, arm: str, params: dict[str, Any]) -> tuple[CRMSEResult, dict[str, Any]]:
    """Train ``arm`` from the run's MSE checkpoint and write its four artifacts; returns the result and metrics."""
    device = resolve_device(params["device"])
    if not paths.checkpoint("mse").exists():
        sys.exit(f"posttrain: {paths.checkpoint('mse')} not found (run the pretrain stage)")
    with input_errors("posttrain"):
        train, val, test = (load_split(paths.split(name)) for name in ("train", "val", "test"))
        # auto: the same T_conf of the reference pool (MSE model Laplacian) that the sample stage uses.
        temperature = resolve_temperature(params["crmse"]["chains"]["temperature"], paths)
        model, mse_meta = load_checkpoint(paths.checkpoint("mse"), device=device, expected_z=train.z)
    cfg = CRMSEConfig.from_params(params["crmse"], temperature, paths.seed)
    holes = HoleConfig.from_params(params["crmse_memory"]) if arm == "crmse_memory" else None
    stability, detector = chain_monitors(train, val, params["evaluate"])
    print(f"posttrain {paths.rel} {arm}: T_chain {temperature:.1f} K, {cfg.iterations} iterations")
    result = train_crmse(model, train, val, cfg, holes, stability, detector, device=device)

    metrics = run_metrics(arm, result, evaluate_errors(model, val, batch_size=64),
                          evaluate_errors(model, test, batch_size=64))
    meta = {"stage": "posttrain", "arm": arm, "molecule": paths.molecule, "train_size": paths.size,
            "seed": paths.seed, "pretrained": mse_meta, "T_chain_K": temperature,
            "selected_iteration": result.selected_iteration, "selection": result.selection_note}
    save_checkpoint(model, paths.checkpoint(arm), meta)
    write_log_csv(paths.train_log(arm), result.log, list(result.log_columns))
    write_log_csv(paths.val_log(arm), result.val_log, list(VAL_COLUMNS))
    write_json(paths.train_metrics(arm), metrics)
    write_json(paths.timing("posttrain", arm), {
        "wall_s": result.wall_s, "device": str(device),
        "validation_wall_s": dict(zip((r["iteration"] for r in result.val_log), result.val_wall_s, strict=True))})
    return result, metrics


if __name__ == "__main__":
    args = run_parser(__doc__, arms=POSTTRAINED).parse_args()
    params = stage_params(args)
    configure_torch(params)
    result, m = posttrain(run_paths(args), args.arm, params)
    print(
        f"posttrain {args.arm}: selected iteration {result.selected_iteration} ({result.selection_note}); test E MAE "
        f"{m['test_energy_mae']:.3f} kcal/mol, F MAE {m['test_force_mae']:.3f} kcal/mol/Å; {result.wall_s:.0f} s"
    )
