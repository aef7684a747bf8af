"""Hessian-trace Laplacian, configurational temperature and the `auto` temperature."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from md_toys import BondPotential, Harmonic, one_thread  # noqa: F401 (autouse fixture)

from crmse.data import Frames
from crmse.langevin import Langevin
from crmse.temperature import (
    configurational_temperature,
    frames_temperature,
    laplacian,
    resolve_temperature,
)
from crmse.units import KB, masses


def test_laplacian_of_harmonic_oscillators_is_the_sum_of_spring_constants():
    k = np.array([1.0, 2.5, 7.0])
    R = torch.randn(5, 3, 3, dtype=torch.float64)
    lap = laplacian(Harmonic(k).energy, R)
    torch.testing.assert_close(lap, torch.full((5,), 3 * k.sum(), dtype=torch.float64))


def test_laplacian_matches_the_full_hessian_trace_and_is_per_frame():
    pot, z, R0 = BondPotential.for_molecule("ethanol", morse_a=1.8)
    R = torch.as_tensor(R0[None] + 0.05 * np.random.default_rng(0).standard_normal((3, 9, 3)))
    lap, F = laplacian(pot.energy, R, return_forces=True)
    for b in range(3):
        H = torch.autograd.functional.hessian(lambda x: pot.energy(x[None])[0], R[b])
        torch.testing.assert_close(lap[b], H.reshape(27, 27).trace())
    torch.testing.assert_close(F, pot(R)[1])


def test_configurational_temperature_of_boltzmann_samples_equals_their_temperature():
    # Exact Boltzmann samples of anisotropic harmonic wells at 700 K: x ~ N(0, k_B T / k).
    T, k = 700.0, np.array([40.0, 300.0, 900.0, 5.0])
    rng = np.random.default_rng(1)
    R = rng.standard_normal((4000, 4, 3)) * np.sqrt(KB * T / k)[None, :, None]
    assert abs(frames_temperature(Harmonic(k).energy, R, dtype=torch.float64) / T - 1) < 0.03


def test_configurational_temperature_of_langevin_samples_on_an_anharmonic_surface():
    # Morse bonds are anharmonic, so T_conf ≠ T would show a wrongly sampled distribution.
    pot, z, R0 = BondPotential.for_molecule("ethanol", morse_a=2.0)
    eng = Langevin(pot, masses(z), dt=0.5, temperature=600.0, friction=0.05, dtype=torch.float64)
    state = eng.init_state(np.repeat(R0[None], 64, 0), seed=0)
    eng.step(state, 300)
    R = eng.run(state, 1200, save_every=20)["R"].reshape(-1, 9, 3)
    T_conf = frames_temperature(pot.energy, R, batch_size=512, dtype=torch.float64)
    assert abs(T_conf / 600.0 - 1) < 0.04, T_conf


def test_configurational_temperature_validates_its_input():
    assert configurational_temperature([2.0, 4.0], [1.0, 2.0]) == pytest.approx(2.0 / KB)
    with pytest.raises(ValueError, match="Laplacian"):
        configurational_temperature([1.0], [-1.0])
    with pytest.raises(ValueError, match="non-finite"):
        configurational_temperature([np.nan], [1.0])


class _HarmonicModel(torch.nn.Module):
    """Stand-in for crmse.model.Potential: an ``energy`` method and float64 parameters."""

    def __init__(self, k: np.ndarray) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.as_tensor(k, dtype=torch.float64))

    def energy(self, R: torch.Tensor) -> torch.Tensor:
        return (0.5 * self.k[None, :, None] * R * R).sum((1, 2))


def test_resolve_temperature_number_or_auto_from_training_frames():
    k = np.array([50.0, 200.0, 800.0])
    model = _HarmonicModel(k)
    T = 645.0
    rng = np.random.default_rng(2)
    R = rng.standard_normal((3000, 3, 3)) * np.sqrt(KB * T / k)[None, :, None]
    F_dft = -k[None, :, None] * R  # "DFT" forces of the same surface
    train = Frames(np.array([1, 1, 1]), R, np.zeros(len(R)), F_dft, np.arange(len(R)))
    assert abs(resolve_temperature("auto", model, train) / T - 1) < 0.03
    # The numerator uses the frames' own forces: doubling them quadruples T_conf.
    train2 = Frames(train.z, R, train.E, 2 * F_dft, train.md17_index)
    assert abs(resolve_temperature("auto", model, train2, bounds=(1.0, 1e4)) / (4 * T) - 1) < 0.03
    assert resolve_temperature(500, model, train) == 500.0
    for bad in ("hot", -3.0, 0, float("nan"), True):
        with pytest.raises(ValueError, match="temperature"):
            resolve_temperature(bad, model, train)


def test_an_implausible_auto_temperature_is_a_clear_error():
    """Issue 31.6: outside 250–1000 K (MD17 is nominally 500 K, measured auto 551–676 K) the estimate is refused."""
    from crmse.temperature import AUTO_TEMPERATURE_RANGE_K, ImplausibleTemperatureError, check_auto_temperature

    lo, hi = AUTO_TEMPERATURE_RANGE_K
    assert lo <= 500.0 and all(lo <= t <= hi for t in (551.9, 645.0, 676.5))  # nominal and measured values pass
    assert check_auto_temperature(674.3, 400) == 674.3
    for T in (4009.0, 20.0, float("nan"), float("inf")):
        with pytest.raises(ImplausibleTemperatureError, match=r"400 frames.*undertrained model.*Laplacian"):
            check_auto_temperature(T, 400)
    # Through resolve_temperature: a model whose Laplacian is 4x too small reads 4x too hot.
    k = np.array([50.0, 200.0, 800.0])
    T = 645.0
    R = np.random.default_rng(2).standard_normal((500, 3, 3)) * np.sqrt(KB * T / k)[None, :, None]
    frames = Frames(np.array([1, 1, 1]), R, np.zeros(len(R)), -k[None, :, None] * R, np.arange(len(R)))
    assert abs(resolve_temperature("auto", _HarmonicModel(k), frames) / T - 1) < 0.1
    with pytest.raises(ImplausibleTemperatureError, match=r"auto temperature is 2\d{3} K \(T_conf of 500 frames"):
        resolve_temperature("auto", _HarmonicModel(k / 4), frames)
    # A non-convex model (negative Laplacian): the same error class, the same likely causes.
    with pytest.raises(ImplausibleTemperatureError, match="undefined.*undertrained"):
        resolve_temperature("auto", _HarmonicModel(-k), frames)
    assert resolve_temperature(300, _HarmonicModel(-k), frames) == 300.0  # a number is never second-guessed
