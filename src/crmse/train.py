"""MSE (energy + force matching) training of a :class:`crmse.model.Potential`.

L = ρ_E · mean((E − Ê)²) + ρ_F · mean((F − F̂)²) over frames and force components,
E in kcal/mol, F in kcal/mol/Å. Adam, learning-rate decay on a validation plateau,
early stopping, a budget of optimiser steps (``max_steps``, so that the same seed gives the
same model on any machine) with a wall-clock cap as a safety net, gradient clipping; the best
validation model is kept. The constant energy offset, which a force-dominated loss fits poorly, is re-centred
in closed form on the training residuals after every epoch and refitted exactly on the
training split at the end (forces are unaffected). A non-finite loss stops training with
:class:`TrainingError` (nothing is saved).

:func:`mse_loss`, :func:`batch_loss` and :func:`evaluate_errors` are reused by CRMSE.
"""

from __future__ import annotations

import csv
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from crmse.data import Frames
from crmse.io import atomic_path, run_dir, write_json
from crmse.model import Potential, build_model, export_schnetpack, resolve_device, save_checkpoint
from crmse.observables import evenly_spaced
from crmse.temperature import resolve_temperature

LOG_COLUMNS = ("epoch", "lr", "train_loss", "val_loss", "val_energy_mae", "val_force_mae")  # wall_s: mse_timing.json


class TrainingError(RuntimeError):
    """Training diverged (non-finite loss or gradient); no model was saved."""


def frames_to_tensors(
    frames: Frames, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(R model dtype Å, E float64 kcal/mol, F model dtype kcal/mol/Å) on ``device``."""
    R = torch.as_tensor(np.asarray(frames.R), dtype=dtype, device=device)
    E = torch.as_tensor(np.asarray(frames.E).reshape(-1), dtype=torch.float64, device=device)
    F = torch.as_tensor(np.asarray(frames.F), dtype=dtype, device=device)
    return R, E, F


def mse_loss(
    E_pred: torch.Tensor,
    F_pred: torch.Tensor,
    E_ref: torch.Tensor,
    F_ref: torch.Tensor,
    rho_energy: float,
    rho_forces: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, energy MSE (kcal/mol)², force MSE (kcal/mol/Å)²), all float64 scalars.

    The energy difference is taken in float64: absolute energies are ~ −10⁵ kcal/mol.
    """
    e_mse = ((E_pred.double() - E_ref.double()) ** 2).mean()
    f_mse = ((F_pred - F_ref.to(F_pred.dtype)) ** 2).mean().double()
    return rho_energy * e_mse + rho_forces * f_mse, e_mse, f_mse


def batch_loss(
    model: Potential,
    R: torch.Tensor,
    E: torch.Tensor,
    F: torch.Tensor,
    rho_energy: float,
    rho_forces: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`mse_loss` of the model on one batch, differentiable in θ (forces with create_graph)."""
    E_pred, F_pred = model.energy_and_forces(R, create_graph=True, prune=True)
    return mse_loss(E_pred, F_pred, E, F, rho_energy, rho_forces)


def evaluate_errors(
    model: Potential, frames: Frames, batch_size: int = 64, progress: bool = False
) -> dict[str, float]:
    """Energy errors (kcal/mol) and per-component force errors (kcal/mol/Å) on ``frames``.

    Keys: energy_mae, energy_rmse, force_mae, force_rmse, energy_max_abs, force_max_abs, n_frames.
    """
    if len(frames) == 0:
        raise ValueError("evaluate_errors: no frames")
    was_training = model.training
    model.eval()
    R, E, F = frames_to_tensors(frames, model.device, model.dtype)
    e_abs, e_sq, f_abs, f_sq = 0.0, 0.0, 0.0, 0.0
    e_max, f_max = 0.0, 0.0
    starts = range(0, len(frames), batch_size)
    for s in tqdm(starts, desc="evaluate", leave=False, disable=not progress):
        E_pred, F_pred = model.energy_and_forces(R[s : s + batch_size], prune=True)
        de = E_pred - E[s : s + batch_size]
        df = (F_pred - F[s : s + batch_size]).double()
        e_abs += float(de.abs().sum())
        e_sq += float((de**2).sum())
        f_abs += float(df.abs().sum())
        f_sq += float((df**2).sum())
        e_max = max(e_max, float(de.abs().max()))
        f_max = max(f_max, float(df.abs().max()))
    model.train(was_training)
    n, nf = len(frames), F.numel()
    return {
        "energy_mae": e_abs / n,
        "energy_rmse": math.sqrt(e_sq / n),
        "force_mae": f_abs / nf,
        "force_rmse": math.sqrt(f_sq / nf),
        "energy_max_abs": e_max,
        "force_max_abs": f_max,
        "n_frames": n,
    }


def refit_energy_offset(model: Any, frames: Frames, batch_size: int = 64) -> float:
    """Set the model's constant energy offset to its least-squares value on ``frames``; return the shift.

    E_θ + c with c = mean(E_ref − E_θ) (kcal/mol per molecule, applied as c/n to the per-atom
    mean); forces are unchanged. One energy-only pass, no gradients.
    """
    R, E, _ = frames_to_tensors(frames, model.device, model.dtype)
    with torch.no_grad():
        E_pred = torch.cat([model.energy(R[s : s + batch_size], prune=True) for s in range(0, len(R), batch_size)])
    shift = float((E - E_pred).mean())
    if not math.isfinite(shift):
        raise TrainingError(f"non-finite energy residual ({shift}) while refitting the energy offset")
    model.shift_energy(shift)
    return shift


@dataclass
class TrainResult:
    """Outcome of :func:`train_mse`; the model holds the best validation weights afterwards."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_loss: float = math.inf
    epochs: int = 0
    steps: int = 0
    stop_reason: str = ""
    wall_s: float = 0.0
    frames_per_s: float = 0.0  # training steps only (no validation), over all epochs
    epoch_train_s: list[float] = field(default_factory=list)  # training-step time of each epoch
    energy_offset_shift: float = 0.0  # kcal/mol per molecule added by the final refit_energy_offset


def _nonfinite(what: str, value: float, epoch: int, batch: int | None = None, n_batches: int | None = None) -> None:
    where = f"epoch {epoch}" + (f", batch {batch}/{n_batches}" if batch is not None else "")
    raise TrainingError(
        f"non-finite {what} ({value}) at {where}: training stopped and no model was saved "
        "(check the data for NaN/inf, or lower mse.lr / mse.grad_clip)"
    )


def train_mse(
    model: Potential,
    train: Frames,
    val: Frames,
    mse: dict[str, Any],
    seed: int,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place on ``train`` with params section ``mse``; keep the best ``val`` weights.

    Same seed, same device and thread count → same numbers (torch seeded, seeded shuffling).
    """
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"train_mse needs training and validation frames, got {len(train)} and {len(val)}")
    torch.manual_seed(seed)
    shuffle = torch.Generator().manual_seed(seed)
    dev, dtype = model.device, model.dtype
    R, E, F = frames_to_tensors(train, dev, dtype)
    rho_e, rho_f = float(mse["rho_energy"]), float(mse["rho_forces"])
    bs = int(mse["batch_size"])
    opt = torch.optim.Adam(model.parameters(), lr=float(mse["lr"]))
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=float(mse["lr_factor"]), patience=int(mse["lr_patience"]), min_lr=float(mse["min_lr"])
    )
    budget_s = 60.0 * float(mse["max_minutes"])
    max_steps = int(mse["max_steps"])
    n_batches = math.ceil(len(train) / bs)
    result = TrainResult()
    best_state: dict[str, torch.Tensor] | None = None
    best_mean = model.mean
    t0 = time.perf_counter()
    train_time, frames_seen, steps = 0.0, 0, 0
    # The step budget usually ends training first: size the bar by whichever limit comes first.
    bar = tqdm(range(1, int(mse["max_epochs"]) + 1), desc="mse", unit="epoch", disable=not progress,
               total=min(int(mse["max_epochs"]), math.ceil(max_steps / n_batches)))
    for epoch in bar:
        model.train()
        perm = torch.randperm(len(train), generator=shuffle).to(dev)
        loss_sum, resid_sum, seen = 0.0, 0.0, 0
        out_of_time = out_of_steps = False
        te = time.perf_counter()
        for b in range(n_batches):
            idx = perm[b * bs : (b + 1) * bs]
            # Pairs beyond the cutoff pruned: same numbers, ~1.3x faster for aspirin.
            E_pred, F_pred = model.energy_and_forces(R[idx], create_graph=True, prune=True)
            loss, _, _ = mse_loss(E_pred, F_pred, E[idx], F[idx], rho_e, rho_f)
            value = float(loss.detach())
            resid_sum += float((E[idx] - E_pred.detach()).sum())
            if not math.isfinite(value):
                _nonfinite("training loss", value, epoch, b + 1, n_batches)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), float(mse["grad_clip"])))
            if not math.isfinite(gnorm):
                _nonfinite("gradient norm", gnorm, epoch, b + 1, n_batches)
            opt.step()
            loss_sum += value * len(idx)
            seen += len(idx)
            steps += 1
            if steps >= max_steps:
                out_of_steps = True
                break
            if time.perf_counter() - t0 > budget_s:
                out_of_time = True
                break
        result.epoch_train_s.append(time.perf_counter() - te)
        train_time += result.epoch_train_s[-1]
        frames_seen += seen
        # The energy offset barely affects a force-dominated loss and drifts while the forces
        # train (val E MAE jumping between 0.5 and 2.5 kcal/mol); re-centre it on this epoch's
        # training residuals (closed form, no gradient) so validation sees a fitted offset.
        if math.isfinite(resid_sum):
            model.mean += resid_sum / seen / model.n_atoms
        err = evaluate_errors(model, val, batch_size=max(bs, 64))
        val_loss = rho_e * err["energy_rmse"] ** 2 + rho_f * err["force_rmse"] ** 2
        if not math.isfinite(val_loss):
            _nonfinite("validation loss", val_loss, epoch)
        row = {
            "epoch": epoch,
            "lr": opt.param_groups[0]["lr"],
            "train_loss": loss_sum / seen,
            "val_loss": val_loss,
            "val_energy_mae": err["energy_mae"],
            "val_force_mae": err["force_mae"],
            "wall_s": time.perf_counter() - t0,
        }
        result.history.append(row)
        result.epochs, result.steps = epoch, steps
        if val_loss < result.best_val_loss:
            result.best_val_loss, result.best_epoch = val_loss, epoch
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            best_mean = model.mean
        sched.step(val_loss)
        bar.set_postfix(loss=f"{row['train_loss']:.3g}", val_F_mae=f"{err['force_mae']:.3f}", lr=f"{row['lr']:.1e}")
        if out_of_steps:
            result.stop_reason = f"max_steps {max_steps} reached"
            break
        if out_of_time:
            # Timing-dependent: the number of steps, hence the model, now depends on the machine's speed.
            result.stop_reason = f"time budget of {mse['max_minutes']} min reached (after {steps} steps)"
            break
        if epoch - result.best_epoch >= int(mse["early_stopping_patience"]):
            patience = mse["early_stopping_patience"]
            result.stop_reason = f"early stopping: no validation improvement for {patience} epochs"
            break
    else:
        result.stop_reason = f"max_epochs {mse['max_epochs']} reached"
    bar.close()
    assert best_state is not None
    model.load_state_dict(best_state)
    model.mean = best_mean
    model.eval()
    result.energy_offset_shift = refit_energy_offset(model, train, batch_size=max(bs, 64))
    result.wall_s = time.perf_counter() - t0
    result.frames_per_s = frames_seen / train_time if train_time > 0 else 0.0
    return result


def write_log_csv(path: str | Path, rows: list[dict[str, float]], columns: list[str] | None = None) -> None:
    """Log rows as CSV (default columns :data:`LOG_COLUMNS`), atomically; DVC plots read it."""
    columns = LOG_COLUMNS if columns is None else columns
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{row[k]:.8g}" if isinstance(row[k], float) else row[k]) for k in columns})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def pretrain(
    molecule: str,
    size: int,
    seed: int,
    params: dict[str, Any],
    splits_root: str | Path = "data/splits",
    models_root: str | Path = "models",
    progress: bool = True,
    timings_root: str | Path = "timings",
) -> dict[str, Any]:
    """The ``pretrain`` stage: train on a split, write mse.pt, mse_spk.pt, mse_log.csv, mse_metrics.json
    (and the wall times to ``<timings_root>/<run>/pretrain.json``).

    Returns the metrics. Nothing is written when training fails.
    """
    src = run_dir(splits_root, molecule, size, seed)
    sets = {}
    for name in ("train", "val", "test", "reference"):
        path = src / f"{name}.npz"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the split stage first (dvc repro split)")
        with np.load(path) as npz:
            sets[name] = Frames(**{k: npz[k] for k in ("z", "R", "E", "F", "md17_index")})
    device = resolve_device(params["device"])
    torch.manual_seed(seed)
    model = build_model(sets["train"].z, params["model"], sets["train"]).to(device)
    result = train_mse(model, sets["train"], sets["val"], params["mse"], seed, progress)
    errors = {name: evaluate_errors(model, sets[name], progress=progress) for name in ("val", "test")}
    # auto temperature settings: the temperature of the data set, T_conf of evenly spaced reference-pool
    # frames (DFT forces, this model's Laplacian), computed once here so every arm of a run shares one
    # temperature. The pool, not the few validation frames, whose estimate scatters by tens of K
    # (docs/method.md §8); nothing of the model is fitted to the pool.
    pool = sets["reference"].subset(evenly_spaced(len(sets["reference"]), int(params["md"]["auto_temperature_frames"])))
    bounds = tuple(params["md"]["auto_temperature_bounds"])
    t_pool = resolve_temperature("auto", model, pool, bounds=bounds)
    t_train = resolve_temperature("auto", model, sets["train"], bounds=bounds)
    t_val = resolve_temperature("auto", model, sets["val"], bounds=bounds)
    metrics = {
        "molecule": molecule,
        "n_train": len(sets["train"]),
        "seed": seed,
        "val": errors["val"],
        "test": errors["test"],
        "epochs": result.epochs,
        "steps": result.steps,
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "energy_offset_shift": result.energy_offset_shift,
        "stop_reason": result.stop_reason,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "n_params": model.n_parameters(),
        "T_conf_train_K": t_train,
        "T_conf_val_K": t_val,
        "T_conf_pool_K": t_pool,
        "T_conf_pool_frames": len(pool),
        "T_auto_K": t_pool,
        "model": params["model"],
    }
    out = run_dir(models_root, molecule, size, seed)
    meta = {k: metrics[k] for k in ("molecule", "n_train", "seed", "epochs", "best_epoch", "stop_reason", "device")}
    meta.update(mse=params["mse"], val=errors["val"])
    save_checkpoint(model, out / "mse.pt", meta)
    export_schnetpack(model, out / "mse_spk.pt")
    # Wall times vary from run to run: they go to timings/, on which no stage depends, so that an
    # identical rerun leaves every dependency downstream byte-identical.
    timing = {"wall_s": result.wall_s, "train_frames_per_s": result.frames_per_s, "device": str(device),
              "epoch_wall_s": [row["wall_s"] for row in result.history]}
    write_json(run_dir(timings_root, molecule, size, seed) / "pretrain.json", timing)
    write_log_csv(out / "mse_log.csv", result.history)
    write_json(out / "mse_metrics.json", metrics)
    return {**metrics, **timing}
