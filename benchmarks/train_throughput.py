"""Training throughput (frames/s): crmse.train vs schnetpack's own Lightning training, same model, same data.

Both train the same SchNet (params.yaml `model`, float32) with the same loss
(ρ_E·MSE(E) + ρ_F·MSE(F), Adam, same batch size) on the same training frames of
data/splits/<mol>/n<size>/s0/train.npz, one after the other in one process.
Only training steps are timed (no validation), first epoch excluded (warm-up).

schnetpack side: ASEAtomsData in a temp dir -> AtomsDataModule (ASENeighborList
per frame in the data loader, num_workers=0, RemoveOffsets/CastTo32 as in
schnetpack's MD17 recipe) -> NeuralNetworkPotential(SchNet, Atomwise, Forces) ->
AtomisticTask(ModelOutput energy/forces) -> pytorch_lightning.Trainer.

``--device`` (cpu, cuda, auto = cuda when available) puts both on that device (Lightning's gpu accelerator
for schnetpack; crmse.train's per-step loss read-out synchronises CUDA, Lightning's epoch timer is synchronised
here). ``--model small|paper`` picks the SchNet size of md_throughput.MODELS (small = params.yaml's CPU
default, paper = presets/paper.yaml's); ``--model params`` uses params.yaml's ``model`` section as before.
``--npz FILE`` takes ``--size`` random training and 200 validation frames of an MD17 npz instead of a split
(e.g. $CRMSE_DATA_MIRROR/md17_{molecule}.npz on a machine without the pipeline's data).

Usage: python benchmarks/train_throughput.py [--molecules ethanol aspirin] [--size 1000] [--epochs 3]
       [--device auto] [--model params|small|paper] [--trainers crmse schnetpack] [--npz FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: spinning OpenMP threads stall on a shared CPU

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from md_throughput import MODELS, pick_device  # noqa: E402

from crmse.data import Frames, load_frames  # noqa: E402
from crmse.model import build_model  # noqa: E402
from crmse.params import load_params  # noqa: E402
from crmse.train import train_mse  # noqa: E402


def frames_from_npz(path: str, mol: str, size: int, seed: int = 0) -> tuple[Frames, Frames]:
    """(train, val): ``size`` and 200 random frames of an MD17 npz of ``mol``."""
    frames = load_frames(path, mol)
    idx = np.random.default_rng(seed).permutation(len(frames))
    return frames.subset(idx[:size]), frames.subset(idx[size:size + 200])


def load_split(mol: str, size: int, name: str) -> Frames:
    path = Path(f"data/splits/{mol}/n{size}/s0/{name}.npz")
    if not path.exists():
        raise SystemExit(
            f"{path} not found: make the split first, e.g. set train_sizes: [{size}] and run `dvc repro split`"
        )
    with np.load(path) as npz:
        return Frames(**{k: npz[k] for k in ("z", "R", "E", "F", "md17_index")})


def bench_crmse(train: Frames, val: Frames, model_p: dict, mse_p: dict, epochs: int,
                device: torch.device | None = None) -> dict:
    """crmse.train.train_mse: frames/s and s/epoch over ``epochs`` timed epochs (after one warm-up epoch)."""
    torch.manual_seed(0)
    model = build_model(train.z, model_p, train).to(device or torch.device("cpu"))
    p = {**mse_p, "max_epochs": epochs + 1, "max_steps": 10**9, "max_minutes": 1e6, "early_stopping_patience": 10**6}
    res = train_mse(model, train, val, p, seed=0, progress=False)
    t = sum(res.epoch_train_s[1:])
    return {"frames_per_s": len(train) * epochs / t, "s_per_epoch": t / epochs, "n_params": model.n_parameters()}


def bench_schnetpack(train: Frames, model_p: dict, mse_p: dict, epochs: int, nbl: str,
                     device: torch.device | None = None) -> dict:
    """schnetpack's Lightning training of the same model: frames/s and s/epoch (after one warm-up epoch)."""
    cuda = device is not None and device.type == "cuda"
    import pytorch_lightning as pl
    import schnetpack as spk
    import schnetpack.transform as trn
    import torchmetrics
    from ase import Atoms

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cutoff = float(model_p["cutoff"])
    neighbours = {"ase": trn.ASENeighborList, "matscipy": trn.MatScipyNeighborList}[nbl](cutoff=cutoff)
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "frames.db"
        data = spk.data.ASEAtomsData.create(
            str(db), distance_unit="Ang", property_unit_dict={"energy": "kcal/mol", "forces": "kcal/mol/Ang"}
        )
        data.add_systems(
            [{"energy": np.array([e]), "forces": f} for e, f in zip(train.E, train.F, strict=True)],
            [Atoms(numbers=train.z, positions=r) for r in train.R],
        )
        n = len(train)
        n_val = 1  # Lightning needs a val split; validation is switched off below
        np.savez(Path(tmp) / "split.npz", train_idx=np.arange(n - n_val), val_idx=np.arange(n - n_val, n), test_idx=[])
        dm = spk.data.AtomsDataModule(
            str(db),
            batch_size=int(mse_p["batch_size"]),
            split_file=str(Path(tmp) / "split.npz"),
            transforms=[neighbours, trn.RemoveOffsets("energy", remove_mean=True), trn.CastTo32()],
            num_workers=0,
            pin_memory=False,
        )
        dm.prepare_data()
        dm.setup()
        torch.manual_seed(0)
        rep = spk.representation.SchNet(
            n_atom_basis=int(model_p["n_atom_basis"]),
            n_interactions=int(model_p["n_interactions"]),
            radial_basis=spk.nn.GaussianRBF(n_rbf=int(model_p["n_rbf"]), cutoff=cutoff),
            cutoff_fn=spk.nn.CosineCutoff(cutoff),
            n_filters=int(model_p["n_filters"]),
        )
        nnp = spk.model.NeuralNetworkPotential(
            representation=rep,
            input_modules=[spk.atomistic.PairwiseDistances()],
            output_modules=[spk.atomistic.Atomwise(n_in=int(model_p["n_atom_basis"]), output_key="energy"),
                            spk.atomistic.Forces(energy_key="energy", force_key="forces")],
            postprocessors=[trn.CastTo64(), trn.AddOffsets("energy", add_mean=True, add_atomrefs=False)],
        )
        outputs = [
            spk.task.ModelOutput(name, loss_fn=torch.nn.MSELoss(), loss_weight=float(mse_p[w]),
                                 metrics={"MAE": torchmetrics.MeanAbsoluteError()})
            for name, w in (("energy", "rho_energy"), ("forces", "rho_forces"))
        ]
        task = spk.task.AtomisticTask(model=nnp, outputs=outputs, optimizer_cls=torch.optim.Adam,
                                      optimizer_args={"lr": float(mse_p["lr"])})

        class Timer(pl.Callback):
            def __init__(self) -> None:
                self.times: list[float] = []

            def on_train_epoch_start(self, trainer, module) -> None:  # noqa: ANN001
                self.t = time.perf_counter()

            def on_train_epoch_end(self, trainer, module) -> None:  # noqa: ANN001
                if cuda:
                    torch.cuda.synchronize()
                self.times.append(time.perf_counter() - self.t)

        timer = Timer()
        trainer = pl.Trainer(
            max_epochs=epochs + 1, accelerator="gpu" if cuda else "cpu", devices=1, logger=False,
            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=[timer],
        )
        trainer.fit(task, datamodule=dm)
        t = sum(timer.times[1:])
        n_train = n - n_val
        return {"frames_per_s": n_train * epochs / t, "s_per_epoch": t / epochs,
                "n_params": sum(p.numel() for p in nnp.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--molecules", nargs="+", default=["ethanol", "aspirin"])
    ap.add_argument("--size", type=int, default=1000, help="training frames (split n<size>/s0 must exist)")
    ap.add_argument("--epochs", type=int, default=3, help="timed epochs (after one warm-up epoch)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--neighbour-lists", nargs="+", default=["ase", "matscipy"], choices=["ase", "matscipy"])
    ap.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    ap.add_argument("--model", choices=["params", *sorted(MODELS)], default="params",
                    help="params = params.yaml's model section; small/paper = md_throughput.MODELS")
    ap.add_argument("--trainers", nargs="+", default=["crmse", "schnetpack"], choices=["crmse", "schnetpack"])
    ap.add_argument("--npz", default=None,
                    help="MD17 npz instead of the split ({molecule} is replaced by the molecule's name)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device, why_not = pick_device(args.device)
    if device is None:
        print(f"train_throughput: skipped: {why_not}", flush=True)
        return
    params = load_params()
    model_p = params["model"] if args.model == "params" else MODELS[args.model]
    mse_p = params["mse"]
    rows = []
    for mol in args.molecules:
        if args.npz:
            train, val = frames_from_npz(args.npz.replace("{molecule}", mol), mol, args.size)
        else:
            train, val = load_split(mol, args.size, "train"), load_split(mol, args.size, "val")
        if "crmse" in args.trainers:
            c = bench_crmse(train, val, model_p, mse_p, args.epochs, device)
            rows.append((mol, "crmse.train (cached all-pairs graph, pruned to cutoff)", c))
            print(f"{mol}: crmse.train {c['frames_per_s']:.0f} frames/s", flush=True)
        for nbl in args.neighbour_lists if "schnetpack" in args.trainers else []:
            s = bench_schnetpack(train, model_p, mse_p, args.epochs, nbl, device)
            rows.append((mol, f"schnetpack Lightning ({nbl} neighbour list)", s))
            print(f"{mol}: schnetpack/{nbl} {s['frames_per_s']:.0f} frames/s", flush=True)
    print(
        f"\nSchNet {model_p['n_atom_basis']} features / {model_p['n_interactions']} interactions, "
        f"batch {mse_p['batch_size']}, {args.size} training frames, {args.threads} threads, "
        f"{args.epochs} timed epochs, torch {torch.__version__}, device {device_name(device)}\n"
    )
    print("| molecule | trainer | params | s/epoch | frames/s | speed-up |\n|---|---|---|---|---|---|")
    for mol, name, r in rows:
        base = next((x for m, n_, x in rows if m == mol and n_.startswith("crmse")), r)
        print(f"| {mol} | {name} | {r['n_params']} | {r['s_per_epoch']:.2f} | {r['frames_per_s']:.0f} | "
              f"{base['frames_per_s'] / r['frames_per_s']:.2f}x |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({
            "date": datetime.datetime.now().isoformat(timespec="seconds"), "device": device_name(device),
            "torch": torch.__version__, "threads": args.threads, "model": model_p, "batch_size": mse_p["batch_size"],
            "size": args.size, "epochs": args.epochs,
            "rows": [{"molecule": m, "trainer": n, **r} for m, n, r in rows]}, indent=2) + "\n")


def device_name(device: torch.device) -> str:
    """torch.cuda.get_device_name on CUDA, else the CPU model."""
    from md_throughput import cpu_model

    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


if __name__ == "__main__":
    main()
