"""CRMSE on the real data, several seeds and ablations (issue 7): does it empty the spurious states?

For each seed the pipeline's split and MSE checkpoint are used as they are (run
``dvc repro pretrain@<molecule>-<size>-<seed>`` first). The MSE model is sampled once; every
variant is one post-training arm (``--arm``, default crmse_memory; a variant may set ``arm=crmse``)
started from the same MSE weights with params.yaml's ``crmse`` (and ``crmse_memory``) sections plus the
variant's overrides, then sampled with identical settings (same seed: same start frames, same
thermostat noise). Observables are the evaluate stage's (``crmse.evaluate.sample_observables``)
against the reference pool. Results go to ``benchmarks/out/crmse_study_<mol>_n<size>.json``, one
entry per (seed, variant), written after each entry; finished entries are skipped on a rerun.

Override keys are paths into the ``crmse`` section (``lam``, ``chains.n``, ``selection.rule``), into the
``crmse_memory`` section with that prefix (``crmse_memory.scouts.n``), or ``arm``; the flat names of the
old single section (``n_chains``, ``scout_chains``, ...) are accepted and mapped to their new places.

    python benchmarks/crmse_study.py ethanol 200 --seeds 0 1 2 --variants default lam0 T500 short
    python benchmarks/crmse_study.py ethanol 200 --seeds 0 --variant lam0.3:lam=0.3
    python benchmarks/crmse_study.py ethanol 200 --seeds 0 --variant c128:chains.n=128,crmse_memory.scouts.n=0
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from crmse.artifacts import POSTTRAINED, ReferenceMonitors, RunPaths, load_samples, load_split, resolve_temperature
from crmse.contrastive import VAL_COLUMNS, CRMSEConfig, chain_monitors, train_crmse
from crmse.evaluate import sample_observables
from crmse.holes import HoleConfig
from crmse.io import read_json, write_json
from crmse.model import load_checkpoint, resolve_device, save_checkpoint
from crmse.molecules import TORSIONS
from crmse.observables import distributions
from crmse.pairlist import VerletPotential
from crmse.params import load_params
from crmse.sampling import SampleSettings, run_sampling
from crmse.stage import configure_torch
from crmse.train import evaluate_errors, write_log_csv

# name -> overrides (see the module docstring) of params.yaml's crmse / crmse_memory sections
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "lam0": {"lam": 0.0},  # the same run with the contrastive term off: MSE fine-tuning control
    "T500": {"chains.temperature": 500.0},  # chains at the nominal MD17 temperature instead of auto
    "short": {"chains.p_reset": 0.02, "chains.steps_per_iter": 10},  # short-lived chains: mean life 250 fs
    "lam0.3": {"lam": 0.3},
    "no_scouts": {"crmse_memory.scouts.n": 0},  # hole memory fed by the chains alone
    "plain": {"arm": "crmse"},  # no hole term: the paper's CRMSE
}
# Flat keys of the old single crmse section -> their places now (removed options are refused).
OLD_KEYS = {
    "n_chains": "chains.n", "steps_per_iter": "chains.steps_per_iter", "temperature": "chains.temperature",
    "dt": "chains.dt", "friction": "chains.friction", "p_reset": "chains.p_reset", "eval_every": "selection.every",
    "select_after": "selection.after", "max_gap": "selection.max_gap", "max_energy_rise": "selection.max_energy_rise",
    "selection": "selection.rule", "hole_memory": "crmse_memory.slots", "hole_weight": "crmse_memory.weight",
    "scout_chains": "crmse_memory.scouts.n", "scout_temperature_ratio": "crmse_memory.scouts.temperature_ratio",
}
REMOVED_KEYS = ("spurious_weight", "remember_blowups", "hole_projection", "energy_projection")
KEEP = (
    "stable_fraction", "median_time_to_instability_ps", "spurious_replica_fraction", "spurious_frame_fraction",
    "spurious_energy_replica_fraction", "spurious_distance_replica_fraction", "spurious_first_entry_median_ps",
    "lowest_energy_rel_dft_min", "min_nonbonded_distance", "T_kin", "energy_w1", "energy_mean_shift", "hr_mae",
)


def _value(text: str) -> Any:
    """A number if it reads as one (YAML alone reads 3e-4 as a string), else YAML (auto, true, ...)."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return yaml.safe_load(text)


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``name`` (a predefined variant) or ``name:key=value,key=value``."""
    if ":" not in text:
        if text not in VARIANTS:
            raise SystemExit(f"unknown variant {text!r}; predefined: {sorted(VARIANTS)} (or name:key=value,...)")
        return text, VARIANTS[text]
    name, spec = text.split(":", 1)
    over = {}
    for item in filter(None, spec.split(",")):
        key, value = item.split("=", 1)
        over[key.strip()] = _value(value.strip())
    return name, over


def variant_sections(params: dict[str, Any], over: dict[str, Any], arm: str) -> tuple[str, dict, dict | None]:
    """(arm, crmse section, crmse_memory section or None for the crmse arm) of a variant's overrides."""
    sections = {"crmse": copy.deepcopy(params["crmse"]), "crmse_memory": copy.deepcopy(params["crmse_memory"])}
    for key, value in over.items():
        if key == "arm":
            if value not in POSTTRAINED:
                raise SystemExit(f"arm={value!r}: allowed {POSTTRAINED}")
            arm = value
            continue
        if key in REMOVED_KEYS:
            raise SystemExit(f"{key} no longer exists (removed; projections: crmse_memory.projection=off|fit|...)")
        path = OLD_KEYS.get(key, key).split(".")
        if path[0] not in sections:
            path = ["crmse", *path]
        node = sections[path[0]]
        for name in path[1:-1]:
            node = node.get(name) if isinstance(node, dict) else None
        if not isinstance(node, dict) or path[-1] not in node:
            raise SystemExit(f"unknown override key {key!r} (not in params.yaml's crmse / crmse_memory sections)")
        node[path[-1]] = value
    return arm, sections["crmse"], sections["crmse_memory"] if arm == "crmse_memory" else None


def summarize(s_dir: Path, mon: ReferenceMonitors, ref: Any, mol: str, ev: dict[str, Any],
              analyse_ps: float | None = None) -> dict[str, Any]:
    s = load_samples(s_dir / "samples.npz")
    if analyse_ps is not None:  # the first analyse_ps of production: what a run that long would have saved
        keep = int(np.searchsorted(s.time_ps, analyse_ps + 1e-9))
        s = replace(s, R=s.R[:keep], E=s.E[:keep], T_kin=s.T_kin[:keep], time_ps=s.time_ps[:keep],
                    unstable_frame=np.where(s.unstable_frame < keep, s.unstable_frame, -1))
    row, _, _, _ = sample_observables(s, mon, ref, TORSIONS[mol], ev, s.temperature)
    out = {k: row.get(k) for k in KEEP}
    out["n_replicas"] = row["n_replicas"]
    out["n_spurious_replicas"] = round(row["spurious_replica_fraction"] * row["n_replicas"])
    out["n_stable_replicas"] = round(row["stable_fraction"] * row["n_replicas"])
    out["dihedral_rmse"] = {t.name: row.get(f"dihedral_{t.name}_rmse") for t in TORSIONS[mol]}
    timing = s_dir / "timing.json"  # runs sampled before timing.json existed kept it in sample.json
    out["sample_wall_s"] = (read_json(timing) if timing.exists() else read_json(s_dir / "sample.json")["throughput"])[
        "wall_s"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("molecule")
    ap.add_argument("size", type=int)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--variants", nargs="*", default=["default"],
                    help="predefined names or name:key=value,... (none: only the MSE model)")
    ap.add_argument("--arm", choices=POSTTRAINED, default="crmse_memory",
                    help="arm of the variants (default %(default)s; a variant may set arm=...)")
    ap.add_argument("--replicas", type=int, default=64)
    ap.add_argument("--production-ps", type=float, default=None, help="default: params.yaml md.production_ps")
    ap.add_argument("--analyse-ps", type=float, default=None,
                    help="summarize only the first P ps of production (compare runs sampled for longer)")
    ap.add_argument("--temperature", default="auto", help="sampling temperature: K or auto (pretrain's T_auto_K)")
    ap.add_argument("--resummarize", action="store_true",
                    help="only recompute the summaries of the named variants' finished runs (with --analyse-ps)")
    ap.add_argument("--skip-mse", action="store_true",
                    help="do not sample the MSE model (its entry from an earlier run with the same settings stands)")
    ap.add_argument("--resume", action="store_true",
                    help="reuse a variant's CRMSE checkpoint left in the scratch folder by an interrupted study "
                         "(its training statistics are not recorded)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    params = load_params(molecule=args.molecule)
    configure_torch({**params, "torch_threads": args.threads})
    ev = params["evaluate"]
    device = resolve_device(params["device"])
    out_path = args.out or Path(f"benchmarks/out/crmse_study_{args.molecule}_n{args.size}.json")
    scratch = out_path.parent / "scratch" / out_path.stem
    record = read_json(out_path) if out_path.exists() else {"runs": []}
    record["machine"] = f"{platform.node()} {platform.processor() or platform.machine()}, torch {torch.__version__}"
    done = {(r["seed"], r["variant"]) for r in record["runs"]}
    variants = [parse_variant(v) for v in args.variants]

    for seed in args.seeds:
        paths = RunPaths(args.molecule, args.size, seed)
        train, val, test, pool = (load_split(paths.split(n)) for n in ("train", "val", "test", "reference"))
        T = resolve_temperature(args.temperature, paths)
        mon = ReferenceMonitors.from_pool(pool, ev)
        ref = distributions(pool.R, pool.E, TORSIONS[args.molecule], ev["dihedral_bins"], T)
        production_ps = args.production_ps or params["md"]["production_ps"]
        md = dict(params["md"], n_replicas=args.replicas, production_ps=production_ps)
        settings = SampleSettings.from_params({"md": md, "evaluate": ev}, T, seed)
        if args.resummarize:
            names = {name for name, _ in variants}
            for entry in (r for r in record["runs"] if r["seed"] == seed and r["variant"] in names):
                s_dir = scratch / f"s{seed}_{entry['variant']}"
                entry.update(summarize(s_dir, mon, ref, args.molecule, ev, args.analyse_ps))
                entry["analysed_ps"] = args.analyse_ps
                save_entry(out_path, record, entry)
            continue
        mse_model, _ = load_checkpoint(paths.checkpoint("mse"), device=device)

        for name, over in [*([] if args.skip_mse else [("mse", None)]), *variants]:
            if (seed, name) in done:
                continue
            t0 = time.perf_counter()
            model = copy.deepcopy(mse_model)
            entry: dict[str, Any] = {"seed": seed, "variant": name, "overrides": over, "T_sample_K": T,
                                     "n_train": len(train), "date": time.strftime("%Y-%m-%d %H:%M"),
                                     "production_ps": md["production_ps"], "analysed_ps": args.analyse_ps}
            s_dir = scratch / f"s{seed}_{name}"
            resumed = over is not None and args.resume and (s_dir / "crmse.pt").exists()
            if resumed:
                model, _ = load_checkpoint(s_dir / "crmse.pt", device=device)
                entry["resumed_from"] = str(s_dir / "crmse.pt")
            elif over is not None:
                arm, section, memory = variant_sections(params, over, args.arm)
                t_chain = resolve_temperature(section["chains"]["temperature"], paths)
                cfg = CRMSEConfig.from_params(section, t_chain, seed)
                holes = None if memory is None else HoleConfig.from_params(memory)
                stability, chain_detector = chain_monitors(train, val, ev)
                print(f"== {args.molecule} n{args.size} s{seed} {name} ({arm}): {over} (T_chain {t_chain:.0f} K)")
                res = train_crmse(model, train, val, cfg, holes, stability, chain_detector, device=device)
                entry.update(
                    arm=arm, T_chain_K=t_chain, crmse_wall_s=res.wall_s, selected_iteration=res.selected_iteration,
                    selection=res.selection_note, chain_blowups=int(sum(r["blowups"] for r in res.log)),
                    final_gap=res.val_log[-1]["gap"], chains_spurious_last=res.val_log[-1]["n_spurious"],
                    val_log=res.val_log,
                )
            model.eval()
            if over is not None and not resumed:  # kept for inspection and --resume
                save_checkpoint(model, s_dir / "crmse.pt", {"study_variant": name, "overrides": over})
                write_log_csv(s_dir / "crmse_log.csv", res.log, list(res.log_columns))
                write_log_csv(s_dir / "crmse_val.csv", res.val_log, list(VAL_COLUMNS))
            err = evaluate_errors(model, test)
            entry.update(test_energy_mae=err["energy_mae"], test_force_mae=err["force_mae"])
            skin = params["md"]["skin"]
            energy_forces = VerletPotential(model, skin=skin) if skin > 0 else model.energy_and_forces
            run_sampling(energy_forces, pool.z, pool.R, settings, s_dir, device=device, dtype=model.dtype,
                         energy_fn=model.energy, meta={"label": f"s{seed} {name}"}, timing_path=s_dir / "timing.json")
            entry.update(summarize(s_dir, mon, ref, args.molecule, ev, args.analyse_ps))
            entry["total_wall_s"] = time.perf_counter() - t0
            save_entry(out_path, record, entry)
            print(
                f"-> {name} s{seed}: spurious {entry['n_spurious_replicas']}/{entry['n_replicas']}, lowest E - DFT min "
                f"{entry['lowest_energy_rel_dft_min']:.1f}, stable {entry['n_stable_replicas']}, test E/F MAE "
                f"{entry['test_energy_mae']:.3f}/{entry['test_force_mae']:.3f}, W1 {entry['energy_w1']:.2f}, "
                f"h(r) {entry['hr_mae']:.3f}, {entry['total_wall_s']:.0f} s"
            )
    print_table(record)


def save_entry(out_path: Path, record: dict[str, Any], entry: dict[str, Any]) -> None:
    """Write ``entry`` into the results file, replacing its (seed, variant); ``record`` becomes the file's content.

    The file is re-read first: another study process may have added runs to it meanwhile.
    """
    runs = read_json(out_path)["runs"] if out_path.exists() else record["runs"]
    key = (entry["seed"], entry["variant"])
    record["runs"] = [r for r in runs if (r["seed"], r["variant"]) != key] + [entry]
    write_json(out_path, record)


def print_table(record: dict[str, Any]) -> None:
    """Markdown table of every run in the record."""
    cols = ("seed", "variant", "n_spurious_replicas", "lowest_energy_rel_dft_min", "n_stable_replicas",
            "test_energy_mae", "test_force_mae", "energy_w1", "energy_mean_shift", "hr_mae", "crmse_wall_s")
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in sorted(record["runs"], key=lambda r: (r["variant"] != "mse", r["variant"], r["seed"])):
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:.3g}" if isinstance(v, float) else ("—" if v is None else str(v)))
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
