"""The paper (GPU) preset: every stage's code path runs with its settings, shrunk to seconds on a CPU."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from synthetic import synthetic_arrays

from crmse.contrastive import CRMSEConfig, chain_monitors, train_crmse
from crmse.data import Frames
from crmse.holes import HoleConfig
from crmse.model import build_model
from crmse.params import deep_merge, load_params
from crmse.presets import apply_preset
from crmse.sampling import SampleSettings, run_sampling
from crmse.train import train_mse

REPO = Path(__file__).resolve().parents[1]


def test_paper_preset_trains_post_trains_and_samples_at_tiny_scale(tmp_path):
    target = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", target)
    apply_preset("paper", target, REPO / "presets")
    p = load_params(target)
    assert p["model"]["n_interactions"] > 3 and p["md"]["n_replicas"] >= 1000  # the preset is really in force

    a = synthetic_arrays("ethanol", 60, seed=3)
    frames = Frames(a["z"], a["R"], a["E"].reshape(-1), a["F"], a["md17_index"])
    train, val = frames.subset(np.arange(40)), frames.subset(np.arange(40, 60))
    torch.manual_seed(0)
    model = build_model(train.z, p["model"], train)  # the paper architecture, unchanged
    res = train_mse(model, train, val, {**p["mse"], "max_steps": 3}, seed=0, progress=False)
    assert res.steps == 3 and np.isfinite(res.best_val_loss)

    section = deep_merge(p["crmse"], {"chains": {"n": 4}, "iterations": 4, "selection": {"every": 2}})
    cfg = CRMSEConfig.from_params(section, 600.0, seed=0)
    holes = HoleConfig.from_params(deep_merge(p["crmse_memory"], {"scouts": {"n": 4}}))
    stability, detector = chain_monitors(train, val, p["evaluate"])
    out = train_crmse(model, train, val, cfg, holes, stability, detector, progress=False)
    assert out.selected_iteration in (2, 4) and len(out.log) == 4

    md = {**p["md"], "n_replicas": 2, "equilibration_fs": 2.0, "production_ps": 0.01, "save_every": 2,
          "chunk_frames": 4, "conf_temperature_frames": 4}
    settings = SampleSettings.from_params({"md": md, "evaluate": p["evaluate"]}, 600.0, seed=0)
    summary = run_sampling(model.energy_and_forces, frames.z, frames.R, settings, tmp_path / "samples",
                           energy_fn=model.energy, progress=False)
    assert summary["stability"]["n_replicas"] == 2 and summary["n_frames"] == 10
