"""crmse.train: the MSE loss, training lowers it, NaN stops cleanly, determinism, the pretrain stage, presets."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from synthetic import synthetic_arrays

from crmse.data import Frames
from crmse.io import read_json, run_dir
from crmse.model import build_model, load_checkpoint
from crmse.params import validate
from crmse.presets import apply_preset
from crmse.train import (
    LOG_COLUMNS,
    TrainingError,
    batch_loss,
    evaluate_errors,
    mse_loss,
    pretrain,
    refit_energy_offset,
    train_mse,
)

REPO = Path(__file__).resolve().parents[1]
TINY = {"n_atom_basis": 8, "n_filters": 8, "n_interactions": 1, "n_rbf": 8, "cutoff": 5.0, "dtype": "float32"}
MSE = {
    "rho_energy": 0.01,
    "rho_forces": 0.99,
    "batch_size": 16,
    "lr": 5e-3,
    "lr_factor": 0.5,
    "lr_patience": 5,
    "min_lr": 1e-5,
    "max_epochs": 12,
    "max_steps": 100000,
    "max_minutes": 5.0,
    "early_stopping_patience": 50,
    "grad_clip": 10.0,
}


def frames(n: int, seed: int) -> Frames:
    a = synthetic_arrays("ethanol", n, seed)
    return Frames(a["z"].astype(np.int64), a["R"], a["E"][:, 0], a["F"], a["md17_index"])


@pytest.fixture(scope="module")
def data() -> tuple[Frames, Frames]:
    return frames(48, 0), frames(16, 1)


def fresh(train: Frames, seed: int = 0, **cfg):
    torch.manual_seed(seed)
    return build_model(train.z, {**TINY, **cfg}, train)


def test_mse_loss_weights_energy_and_force_errors_in_float64():
    E_ref = torch.tensor([-97000.0, -97001.0], dtype=torch.float64)
    E_pred = E_ref + torch.tensor([0.001, -0.003], dtype=torch.float64)
    F_ref = torch.zeros(2, 3, 3)
    F_pred = F_ref + 2.0
    loss, e_mse, f_mse = mse_loss(E_pred, F_pred, E_ref, F_ref, 0.25, 0.75)
    assert e_mse.item() == pytest.approx((0.001**2 + 0.003**2) / 2, rel=1e-9)
    assert f_mse.item() == pytest.approx(4.0)
    assert loss.item() == pytest.approx(0.25 * e_mse.item() + 0.75 * 4.0)


def test_batch_loss_is_mse_loss_of_the_model_and_differentiable(data):
    train, _ = data
    model = fresh(train)
    R, E, F = (torch.tensor(a[:4]) for a in (train.R, train.E, train.F))
    loss, e_mse, f_mse = batch_loss(model, R.float(), E, F.float(), 0.01, 0.99)
    E_pred, F_pred = model.energy_and_forces(R.float())
    assert e_mse.item() == pytest.approx(((E_pred - E) ** 2).mean().item(), rel=1e-9)
    assert f_mse.item() == pytest.approx(((F_pred - F.float()) ** 2).mean().item(), rel=1e-5)
    loss.backward()
    assert model.representation.interactions[0].filter_network[0].weight.grad.abs().sum() > 0


def test_evaluate_errors_reports_known_offsets(data):
    train, _ = data
    model = fresh(train)
    E, F = model.energy_and_forces(torch.tensor(train.R[:10], dtype=torch.float32))
    shifted = Frames(train.z, train.R[:10], E.numpy() + 0.5, F.double().numpy() - 0.1, train.md17_index[:10])
    err = evaluate_errors(model, shifted, batch_size=3)
    assert err["energy_mae"] == pytest.approx(0.5, abs=1e-6)
    assert err["energy_rmse"] == pytest.approx(0.5, abs=1e-6)
    assert err["force_mae"] == pytest.approx(0.1, abs=1e-5)
    assert err["force_rmse"] == pytest.approx(0.1, abs=1e-5)
    assert err["n_frames"] == 10


def test_training_lowers_the_loss_and_keeps_the_best_validation_model(data):
    train, val = data
    model = fresh(train)
    before = evaluate_errors(model, val)
    res = train_mse(model, train, val, {**MSE, "lr": 1e-2, "batch_size": 8, "max_epochs": 15}, seed=0, progress=False)
    after = evaluate_errors(model, val)
    assert res.epochs == 15 and len(res.history) == 15
    # A 1-interaction, 8-feature SchNet learns slowly; 90 Adam steps still cut the errors clearly.
    assert after["force_mae"] < 0.9 * before["force_mae"]
    assert res.history[-1]["train_loss"] < 0.85 * res.history[0]["train_loss"]
    best = min(res.history, key=lambda r: r["val_loss"])
    assert res.best_epoch == best["epoch"]
    # The model holds the best epoch's weights (forces; the energy offset is refitted afterwards).
    assert after["force_mae"] == pytest.approx(best["val_force_mae"], rel=1e-5)
    assert res.energy_offset_shift != 0.0
    assert not model.training


def test_refit_energy_offset_zeroes_the_mean_residual_and_keeps_forces(data):
    train, _ = data
    model = fresh(train)
    R = torch.tensor(train.R, dtype=torch.float32)
    E0, F0 = model.energy_and_forces(R)
    shift = refit_energy_offset(model, train, batch_size=7)
    E1, F1 = model.energy_and_forces(R)
    assert shift == pytest.approx(float((torch.tensor(train.E) - E0).mean()), abs=1e-6)
    assert float((torch.tensor(train.E) - E1).mean()) == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(F0, F1)


def test_same_seed_gives_the_same_numbers_and_another_seed_does_not(data):
    train, val = data
    params = {**MSE, "max_epochs": 3}
    runs = []
    for seed in (7, 7, 8):
        model = fresh(train, seed)
        res = train_mse(model, train, val, params, seed=seed, progress=False)
        runs.append(([r["train_loss"] for r in res.history], model.state_dict()))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][k], runs[1][1][k]) for k in runs[0][1])
    assert runs[0][0] != runs[2][0]


def test_nan_loss_stops_with_an_error_naming_epoch_and_batch(data):
    train, val = data
    # (A NaN energy would already be refused by the energy scaling; a NaN force reaches the loss.)
    F = train.F.copy()
    F[5, 2, 1] = np.nan
    bad = Frames(train.z, train.R, train.E, F, train.md17_index)
    model = fresh(train)
    expected = r"non-finite training loss \(nan\) at epoch 1, batch \d/3.*no model was saved"
    with pytest.raises(TrainingError, match=expected):
        train_mse(model, bad, val, MSE, seed=0, progress=False)


def test_early_stopping_decays_the_lr_first(data):
    train, val = data
    # Zero weights make the loss identically 0: validation never improves after epoch 1.
    params = {**MSE, "rho_energy": 0.0, "rho_forces": 0.0, "lr_patience": 1, "early_stopping_patience": 4}
    res = train_mse(fresh(train), train, val, params, seed=0, progress=False)
    assert res.epochs == 5 and res.best_epoch == 1
    assert "early stopping" in res.stop_reason
    lrs = [r["lr"] for r in res.history]
    assert lrs[0] == MSE["lr"] and lrs[-1] < lrs[0]


def test_step_budget_stops_training_mid_epoch(data):
    train, val = data
    n_batches = -(-len(train) // MSE["batch_size"])
    res = train_mse(fresh(train), train, val, {**MSE, "max_steps": n_batches + 1}, seed=0, progress=False)
    assert res.epochs == 2 and res.steps == n_batches + 1 and "max_steps" in res.stop_reason


def test_time_budget_stops_training(data):
    train, val = data
    res = train_mse(fresh(train), train, val, {**MSE, "max_minutes": 1e-6}, seed=0, progress=False)
    assert res.epochs == 1 and "time budget" in res.stop_reason


def _write_split(root: Path, train: Frames, val: Frames, test: Frames) -> None:
    out = run_dir(root, "ethanol", len(train), 0)
    for name, fr in (("train", train), ("val", val), ("test", test), ("reference", test)):
        fr.save(out / f"{name}.npz")


def _params(bounds: tuple[float, float] = (1e-3, 1e12), **mse) -> dict:
    # Only the sections pretrain reads; independent of the repository's params.yaml. The default bounds accept
    # any auto temperature: these tiny, briefly trained models give ~10⁶ K.
    return {"device": "cpu", "torch_threads": 0, "model": dict(TINY), "mse": {**MSE, "max_epochs": 3, **mse},
            "md": {"auto_temperature_frames": 10, "auto_temperature_bounds": list(bounds)}}


def test_pretrain_stage_writes_model_log_metrics_and_schnetpack_export(tmp_path, data):
    train, val = data
    _write_split(tmp_path / "splits", train, val, frames(12, 2))
    m = pretrain("ethanol", 48, 0, _params(), tmp_path / "splits", tmp_path / "models", progress=False,
                 timings_root=tmp_path / "timings")
    out = tmp_path / "models/ethanol/n48/s0"
    assert sorted(p.name for p in out.iterdir()) == ["mse.pt", "mse_log.csv", "mse_metrics.json", "mse_spk.pt"]
    metrics = read_json(out / "mse_metrics.json")
    assert metrics["test"] == m["test"] and metrics["val"] == m["val"]
    for split in ("val", "test"):
        assert metrics[split]["energy_mae"] > 0 and metrics[split]["force_mae"] > 0
    assert metrics["test"]["n_frames"] == 12 and metrics["epochs"] == 3 and metrics["device"] == "cpu"
    assert metrics["n_params"] > 0
    assert metrics["T_auto_K"] == metrics["T_conf_pool_K"] > 0 and metrics["T_conf_pool_frames"] == 10
    assert metrics["T_conf_train_K"] > 0 and metrics["T_conf_val_K"] > 0
    rows = list(csv.DictReader((out / "mse_log.csv").open()))
    assert tuple(rows[0]) == LOG_COLUMNS and [int(r["epoch"]) for r in rows] == [1, 2, 3]
    model, meta = load_checkpoint(out / "mse.pt")
    assert meta["epochs"] == 3 and meta["val"]["force_mae"] == pytest.approx(metrics["val"]["force_mae"])
    assert evaluate_errors(model, val)["force_mae"] == pytest.approx(metrics["val"]["force_mae"], rel=1e-6)
    spk = torch.load(out / "mse_spk.pt", weights_only=False)
    assert type(spk).__name__ == "NeuralNetworkPotential"


def test_pretrain_with_nan_data_writes_no_checkpoint(tmp_path, data):
    train, val = data
    F = train.F.copy()
    F[:] = np.inf
    _write_split(tmp_path / "splits", Frames(train.z, train.R, train.E, F, train.md17_index), val, val)
    with pytest.raises(TrainingError, match="epoch 1, batch 1/3"):
        pretrain("ethanol", 48, 0, _params(bounds=(250, 1000)), tmp_path / "splits", tmp_path / "models",
                 progress=False, timings_root=tmp_path / "timings")
    out = tmp_path / "models/ethanol/n48/s0"
    assert not out.exists() or not any(out.iterdir())


def test_pretrain_without_split_names_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="train.npz not found: run the split stage"):
        pretrain("ethanol", 48, 0, _params(), tmp_path / "splits", tmp_path / "models", progress=False,
                 timings_root=tmp_path / "timings")


def _keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
    return out


def test_presets_cover_the_same_keys_and_round_trip(tmp_path):
    cpu = yaml.safe_load((REPO / "presets/cpu.yaml").read_text())
    paper = yaml.safe_load((REPO / "presets/paper.yaml").read_text())
    assert _keys(cpu) == _keys(paper), "cpu.yaml must restore every key paper.yaml overrides"
    params_file = tmp_path / "params.yaml"
    params_file.write_text((REPO / "params.yaml").read_text())
    start = yaml.safe_load(params_file.read_text())
    apply_preset("paper", params_file, REPO / "presets")
    back = apply_preset("cpu", params_file, REPO / "presets")
    validate(back)
    if not (REPO / "params.yaml").read_text().startswith("# preset:"):
        # params.yaml holds the CPU defaults: cpu.yaml must restore exactly them.
        assert back == validate(start)


# -- byte-determinism and the auto-temperature guard ----------------------------------------------------------------


def test_pretrain_artifacts_are_byte_identical_across_reruns(tmp_path, data):
    """The same seed gives the same bytes in every file a stage depends on; timings go apart."""
    train, val = data
    _write_split(tmp_path / "splits", train, val, frames(12, 2))
    outs = []
    for run in ("a", "b"):
        pretrain("ethanol", 48, 0, _params(), tmp_path / "splits", tmp_path / run, progress=False,
                 timings_root=tmp_path / run / "timings")
        out = tmp_path / run / "ethanol/n48/s0"
        timing = read_json(tmp_path / run / "timings/ethanol/n48/s0/pretrain.json")
        assert timing["wall_s"] > 0 and timing["train_frames_per_s"] > 0 and len(timing["epoch_wall_s"]) == 3
        outs.append(out)
    for name in ("mse.pt", "mse_spk.pt", "mse_log.csv", "mse_metrics.json"):
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes(), name
    metrics = read_json(outs[0] / "mse_metrics.json")
    assert not {"wall_s", "train_frames_per_s"} & set(metrics) and metrics["T_auto_K"] > 0
    header = (outs[0] / "mse_log.csv").read_text().splitlines()[0].split(",")
    assert header == list(LOG_COLUMNS) and "wall_s" not in header
    assert sorted(p.name for p in outs[0].iterdir()) == ["mse.pt", "mse_log.csv", "mse_metrics.json", "mse_spk.pt"]


def test_pretrain_refuses_an_implausible_auto_temperature_and_writes_nothing(tmp_path, data):
    """An undertrained model's auto temperature (here ~10⁶ K) is an error, not a sampling temperature."""
    from crmse.temperature import ImplausibleTemperatureError

    train, val = data
    _write_split(tmp_path / "splits", train, val, frames(12, 2))
    with pytest.raises(ImplausibleTemperatureError, match=r"auto temperature is .* K \(T_conf of 10 frames.*outside "
                       r"the plausible 250–1000 K.*undertrained model"):
        pretrain("ethanol", 48, 0, _params(bounds=(250, 1000)), tmp_path / "splits", tmp_path / "models",
                 progress=False, timings_root=tmp_path / "timings")
    out = tmp_path / "models/ethanol/n48/s0"
    assert not out.exists() or not any(out.iterdir())
