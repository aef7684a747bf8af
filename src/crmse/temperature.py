"""Configurational temperature (docs/method.md §6): k_B T_conf = ⟨|∇E|²⟩ / ⟨∇²E⟩.

The Laplacian ∇²E is the trace of the model's Hessian, computed exactly by one
double-backward pass per Cartesian coordinate (3n ≤ 63 passes for MD17 molecules),
each batched over frames. On the reference pool or the training split the numerator
uses DFT forces, on samples the model's own forces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from crmse.units import KB

EnergyFn = Callable[[Tensor], Tensor]

#: Plausible range (K) of an ``auto`` temperature: MD17 is nominally a 500 K trajectory and every
#: recorded ``auto`` value (ethanol and aspirin, n_train 50–1000, 400 pool frames) lies in 551–676 K,
#: ~15 K sampling error (benchmarks/README.md). A factor of 2 around 500 K keeps ≥ 300 K of margin
#: above them and flags a broken Laplacian, e.g. an undertrained model's 4009 K (issue 31).
AUTO_TEMPERATURE_RANGE_K = (250.0, 1000.0)


class ImplausibleTemperatureError(ValueError):
    """An ``auto`` temperature outside :data:`AUTO_TEMPERATURE_RANGE_K`: the model's Laplacian is not trustworthy."""


def check_auto_temperature(T: float, n_frames: int, bounds: tuple[float, float] | None = None) -> float:
    """``T`` (K) if it lies within ``bounds`` (default :data:`AUTO_TEMPERATURE_RANGE_K`), else a clear error."""
    lo, hi = AUTO_TEMPERATURE_RANGE_K if bounds is None else bounds
    if not lo <= T <= hi:
        raise ImplausibleTemperatureError(
            f"the auto temperature is {T:.4g} K (T_conf of {n_frames} frames: their DFT forces over this model's "
            f"Laplacian), outside the plausible {lo:g}–{hi:g} K for MD17 (nominally 500 K, measured 550–680 K). "
            "Likely an undertrained model (raise mse.max_steps / mse.max_epochs) or a broken Laplacian; "
            "or sample at a fixed temperature in K instead of auto"
        )
    return T


def laplacian(energy_fn: EnergyFn, R: Tensor, return_forces: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Trace of the Hessian of E w.r.t. R, per frame: (B,) kcal/mol/Å².

    ``energy_fn(R (B, n, 3)) -> E (B,)`` must be twice differentiable and frame-separable
    (E of frame b depends only on R[b]), so that one backward pass of ``∂E_total/∂R[:, a, c]``
    gives the (a, c) diagonal element of every frame at once. With ``return_forces`` also
    returns F = −∇E (B, n, 3).
    """
    if R.ndim != 3 or R.shape[-1] != 3:
        raise ValueError(f"positions must have shape (B, n, 3), got {tuple(R.shape)}")
    R = R.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        E = energy_fn(R)
        (g,) = torch.autograd.grad(E.sum(), R, create_graph=True)
        lap = torch.zeros(R.shape[0], dtype=torch.float64, device=R.device)
        n = R.shape[1]
        for a in range(n):
            for c in range(3):
                last = a == n - 1 and c == 2
                (h,) = torch.autograd.grad(g[:, a, c].sum(), R, retain_graph=not last)
                lap = lap + h[:, a, c].detach().to(torch.float64)
    if return_forces:
        return lap, (-g).detach()
    return lap


def configurational_temperature(f_sq_sum: Any, laplacian_values: Any) -> float:
    """T_conf (K) = Σ|F|² / (k_B Σ∇²E), sums over frames of per-frame |F|² (kcal²/mol²/Å²) and ∇²E (kcal/mol/Å²)."""
    num = float(np.sum(np.asarray(torch.as_tensor(f_sq_sum).detach().cpu(), dtype=np.float64)))
    den = float(np.sum(np.asarray(torch.as_tensor(laplacian_values).detach().cpu(), dtype=np.float64)))
    if not np.isfinite(num) or not np.isfinite(den):
        raise ValueError("configurational temperature: non-finite forces or Laplacian")
    if den <= 0:
        raise ValueError(
            f"configurational temperature: the summed Laplacian is {den:.4g} <= 0 (frames not near a minimum "
            "basin, or a non-convex model there); T_conf is undefined"
        )
    return num / (KB * den)


def frames_laplacian(
    energy_fn: EnergyFn,
    R: Any,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per-frame Laplacian (N,) and model forces (N, n, 3) for frames R (N, n, 3) Å, in batches."""
    R = np.asarray(R)
    laps, forces = [], []
    batches = range(0, len(R), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="Hessian trace", unit="batch", leave=False)
    for i in batches:
        x = torch.as_tensor(R[i : i + batch_size], device=device, dtype=dtype)
        lap, F = laplacian(energy_fn, x, return_forces=True)
        laps.append(lap.cpu().numpy())
        forces.append(F.to(torch.float64).cpu().numpy())
    return np.concatenate(laps), np.concatenate(forces)


def frames_temperature(
    energy_fn: EnergyFn,
    R: Any,
    F: Any | None = None,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> float:
    """T_conf (K) of frames R (N, n, 3): forces ``F`` (e.g. DFT) in the numerator, or the model's if None."""
    lap, F_model = frames_laplacian(energy_fn, R, batch_size, device, dtype, progress)
    F = F_model if F is None else np.asarray(F, dtype=np.float64)
    return configurational_temperature((F**2).sum((1, 2)), lap)


def _model_energy_fn(model: Any) -> EnergyFn:
    if hasattr(model, "energy"):
        return model.energy
    if callable(model):
        return model
    raise TypeError(f"model must have an energy(R) method or be callable, got {type(model).__name__}")


def _model_device_dtype(model: Any) -> tuple[torch.device, torch.dtype]:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device, p.dtype
    return torch.device("cpu"), torch.float64


def resolve_temperature(
    value: float | str,
    model: Any,
    frames: Any,
    batch_size: int = 64,
    progress: bool = False,
    bounds: tuple[float, float] | None = None,
) -> float:
    """Temperature in K: a number as is, or ``"auto"`` = T_conf of ``frames`` (e.g. the validation split).

    ``auto`` = ⟨|F_DFT|²⟩ / (k_B ⟨∇²E_θ⟩) over ``frames`` (a :class:`crmse.data.Frames`), the
    Laplacian from ``model.energy`` (docs/method.md §8–9: ≈ 654 K for MD17 ethanol, not the nominal 500 K);
    outside ``bounds`` (default :data:`AUTO_TEMPERATURE_RANGE_K`) it is an :class:`ImplausibleTemperatureError`.
    """
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"temperature must be a number of K or 'auto', got {value!r}")
        device, dtype = _model_device_dtype(model)
        try:
            T = frames_temperature(_model_energy_fn(model), frames.R, frames.F, batch_size, device, dtype, progress)
        except ValueError as exc:  # a non-positive or non-finite Laplacian: same likely causes
            raise ImplausibleTemperatureError(
                f"the auto temperature of {len(frames.R)} frames is undefined: {exc}. Likely an undertrained "
                "model (raise mse.max_steps / mse.max_epochs) or a broken Laplacian; or sample at a fixed "
                "temperature in K instead of auto"
            ) from None
        return check_auto_temperature(T, len(frames.R), bounds)
    if isinstance(value, bool) or not isinstance(value, int | float) or not (np.isfinite(value) and value > 0):
        raise ValueError(f"temperature must be a positive number of K or 'auto', got {value!r}")
    return float(value)
