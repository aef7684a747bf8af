"""Sampling run: output contract, stability record, and interrupted+resumed == uninterrupted."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from md_toys import BondPotential, one_thread  # noqa: F401 (autouse fixture)
from synthetic import synthetic_arrays

from crmse.io import read_json
from crmse.sampling import SampleSettings, run_sampling

SETTINGS = SampleSettings(
    temperature=500.0,
    dt=0.5,
    friction=0.05,
    n_replicas=4,
    equilibration_fs=10.0,  # 20 steps
    production_ps=0.1,  # 200 steps
    save_every=10,  # 20 frames
    chunk_frames=6,  # chunks of 6, 6, 6, 2 frames
    trajectory_replica=2,
    seed=3,
    conf_temperature_frames=40,
)


class _Faulty:
    """Energy model that raises (like a crash or Ctrl-C) on call ``crash_call``, or gives replica 1 NaN forces.

    Replica 1 is row 1 of the full batch only: once it is frozen, the engine leaves it out of the batch.
    """

    def __init__(self, crash_call: int | None = None, nan_call: int | None = None) -> None:
        self.pot = BondPotential.for_molecule("ethanol")[0]
        self.crash_call, self.nan_call, self.calls = crash_call, nan_call, 0

    def __call__(self, R):
        self.calls += 1
        if self.crash_call is not None and self.calls >= self.crash_call:
            raise KeyboardInterrupt("simulated interruption")
        E, F = self.pot(R)
        if self.nan_call is not None and self.calls >= self.nan_call and len(R) == SETTINGS.n_replicas:
            F = F.clone()
            F[1] = float("nan")
        return E, F


@pytest.fixture(scope="module")
def reference():
    a = synthetic_arrays("ethanol", 60, seed=5)
    return a["z"].astype(np.int64), a["R"]


def _run(tmp, reference, model=None, settings=SETTINGS, **kw):
    z, R = reference
    model = model or _Faulty()
    return run_sampling(
        model, z, R, settings, tmp / "out", device="cpu", dtype=torch.float32,
        meta={"label": "test", **kw.pop("meta", {})}, progress=False, timing_path=tmp / "timing.json", **kw,
    )


def _arrays(path):
    with np.load(path) as d:
        return {k: d[k] for k in d.files}


def test_outputs_follow_the_sample_contract(tmp_path, reference):
    from ase import units
    from ase.io import read

    pot = BondPotential.for_molecule("ethanol")[0]
    summary = _run(tmp_path, reference, energy_fn=pot.energy)
    out = tmp_path / "out"
    a = _arrays(out / "samples.npz")
    T, M = SETTINGS.n_frames, SETTINGS.n_replicas
    assert a["R"].shape == (T, M, 9, 3) and a["R"].dtype == np.float32
    assert a["E"].shape == (T, M) and a["T_kin"].shape == (T, M) and a["time_ps"].shape == (T,)
    np.testing.assert_allclose(a["time_ps"][[0, -1]], [0.005, 0.1])
    assert a["unstable_frame"].tolist() == [-1] * M and float(a["temperature"]) == 500.0
    assert np.isfinite(a["R"]).all()
    assert abs(np.mean(a["T_kin"]) / 500.0 - 1) < 0.25  # 4 replicas × 0.1 ps: loose, just wiring
    js = read_json(out / "sample.json")
    assert js["stability"]["stable_fraction"] == 1.0 and js["stability"]["median_time_to_instability_ps"] == 0.1
    assert "throughput" not in js  # run-to-run-varying numbers live apart, in timing_path
    assert sorted(p.name for p in out.iterdir()) == ["sample.json", "samples.npz", "trajectory.traj"]
    timing = read_json(tmp_path / "timing.json")
    assert timing["replica_steps_per_s"] > 0 and timing["steps_run_this_invocation"] == 220
    assert timing == summary["throughput"] and not timing["resumed"]
    assert js["T_conf_frames"] == 40 and 200 < js["T_conf_samples_K"] < 1200
    assert summary["label"] == "test"
    traj = read(out / "trajectory.traj", ":")
    assert len(traj) == T
    np.testing.assert_allclose(traj[-1].positions, a["R"][-1, 2], atol=1e-6)
    np.testing.assert_allclose(traj[0].get_potential_energy() / (units.kcal / units.mol), a["E"][0, 2], rtol=1e-9)
    assert not (tmp_path / ".out.partial").exists()  # scratch removed after success


def test_unstable_replica_is_recorded_and_masked(tmp_path, reference):
    # Call 1 is the initial evaluation, call s+1 the s-th step: NaN at call 57 = step 56 =
    # production step 36, so saved frames 0–2 (steps 10, 20, 30) are valid and frame 3 is not.
    summary = _run(tmp_path, reference, model=_Faulty(nan_call=57))
    a = _arrays(tmp_path / "out/samples.npz")
    assert a["unstable_frame"].tolist() == [-1, 3, -1, -1]
    assert np.isnan(a["R"][3:, 1]).all() and np.isfinite(a["R"][:3, 1]).all()
    assert np.isnan(a["E"][3:, 1]).all() and np.isfinite(np.delete(a["R"], 1, axis=1)).all()
    st = summary["stability"]
    assert st["n_stable"] == 3 and st["unstable_time_ps"] == [pytest.approx(0.018)]
    assert st["median_time_to_instability_ps"] == 0.1


def test_interrupted_then_resumed_run_equals_uninterrupted(tmp_path, reference):
    _run(tmp_path / "a", reference)
    full = _arrays(tmp_path / "a/out/samples.npz")

    # Crash inside the third chunk: chunks 0 and 1 (and the equilibrated state) are on disk.
    crash = 1 + 20 + 2 * 60 + 25
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", reference, model=_Faulty(crash_call=crash))
    scratch = tmp_path / "b/.out.partial"
    assert sorted(p.name for p in scratch.glob("*.npz")) == ["chunk_00000.npz", "chunk_00001.npz", "equilibrated.npz"]
    assert not (tmp_path / "b/out/samples.npz").exists()

    model = _Faulty()
    summary = _run(tmp_path / "b", reference, model=model)
    assert model.calls == 80  # only the last 80 of 220 steps ran again, with no re-evaluation on resume
    assert summary["throughput"]["resumed"] and summary["throughput"]["steps_run_this_invocation"] == 80
    resumed = _arrays(tmp_path / "b/out/samples.npz")
    assert resumed.keys() == full.keys()
    for k in full:
        np.testing.assert_array_equal(resumed[k], full[k], err_msg=k)
    # Every output is byte-identical; only the timing record (outside the output folder) differs.
    for name in ("samples.npz", "sample.json", "trajectory.traj"):
        assert (tmp_path / "b/out" / name).read_bytes() == (tmp_path / "a/out" / name).read_bytes(), name
    assert read_json(tmp_path / "b/timing.json")["resumed"]


def test_changed_settings_never_resume_a_stale_partial_run(tmp_path, reference):
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", reference, model=_Faulty(crash_call=1 + 20 + 60 + 5))
    other = SampleSettings(**{**SETTINGS.__dict__, "temperature": 300.0})
    model = _Faulty()
    _run(tmp_path / "b", reference, model=model, settings=other)
    assert model.calls == 221  # started over
    _run(tmp_path / "c", reference, settings=other)
    a, b = _arrays(tmp_path / "b/out/samples.npz"), _arrays(tmp_path / "c/out/samples.npz")
    np.testing.assert_array_equal(a["R"], b["R"])


def test_settings_are_validated():
    with pytest.raises(ValueError, match="trajectory_replica"):
        SampleSettings(temperature=500.0, n_replicas=4, trajectory_replica=4)
    with pytest.raises(ValueError, match="no frame would be saved"):
        SampleSettings(temperature=500.0, production_ps=0.001, save_every=20)
    with pytest.raises(ValueError, match="temperature"):
        SampleSettings(temperature=0.0)


def test_sample_stage_script_runs_on_a_checkpoint(tmp_path):
    """pipelines/sample.py end to end: tiny checkpoint, synthetic split, short MD (Verlet list on)."""
    import os
    import subprocess
    import sys

    import yaml

    from crmse.data import Frames
    from crmse.model import build_model, save_checkpoint

    repo = __import__("pathlib").Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["device"] = "cpu"
    params["torch_threads"] = 1
    params["md"].update(
        temperatures=[500], n_replicas=3, equilibration_fs=5.0, production_ps=0.02, save_every=5,
        chunk_frames=3, trajectory_replica=1, skin=0.5, conf_temperature_frames=6,
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    a = synthetic_arrays("ethanol", 40, seed=1)
    frames = Frames(a["z"].astype(np.int64), a["R"], a["E"][:, 0], a["F"], a["md17_index"])
    split = tmp_path / "data/splits/ethanol/n20/s0"
    frames.subset(np.arange(20)).save(split / "train.npz")
    frames.subset(np.arange(20, 40)).save(split / "reference.npz")
    tiny = {"n_atom_basis": 8, "n_filters": 8, "n_interactions": 1, "n_rbf": 6, "cutoff": 3.0, "dtype": "float32"}
    torch.manual_seed(0)
    save_checkpoint(build_model(frames.z, tiny, frames), tmp_path / "models/ethanol/n20/s0/mse.pt", {})
    env = {**os.environ, "PYTHONPATH": str(repo / "src")}
    # Run a copy of the script so that only it (not its neighbours in pipelines/) is on sys.path.
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines/sample.py").write_text((repo / "pipelines/sample.py").read_text())
    cmd = [sys.executable, "pipelines/sample.py", "ethanol", "20", "0", "500", "mse"]
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    res = tmp_path / "results/ethanol/n20/s0/T500/mse"
    assert sorted(p.name for p in res.iterdir()) == ["sample.json", "samples.npz", "trajectory.traj"]
    assert read_json(tmp_path / "timings/ethanol/n20/s0/T500/sample_mse.json")["replica_steps_per_s"] > 0
    js = read_json(res / "sample.json")
    assert js["arm"] == "mse" and js["temperature_K"] == 500.0 and js["pair_list"].startswith("verlet")
    assert js["n_frames"] == 8 and js["stability"]["n_replicas"] == 3
    assert _arrays(res / "samples.npz")["R"].shape == (8, 3, 9, 3)


# -- issue 31: resume fingerprint covers the code, partial folders are checked and never half-made -------------


def test_a_code_change_discards_the_partial_run_and_says_so(tmp_path, reference, monkeypatch, capsys):
    """Issue 31.1: kill mid-run, change the integrator's code, rerun: it must start over, not resume."""
    import crmse.sampling

    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", reference, model=_Faulty(crash_call=1 + 20 + 60 + 5))
    assert (tmp_path / "b/.out.partial/chunk_00000.npz").exists()
    real = crmse.sampling.source_digest
    # What an edit of langevin.py (e.g. its friction factor) does to the fingerprint.
    monkeypatch.setattr(crmse.sampling, "source_digest", lambda m: "edited" if m == "crmse.langevin" else real(m))
    model = _Faulty()
    summary = _run(tmp_path / "b", reference, model=model)
    assert model.calls == 221 and not summary["throughput"]["resumed"]  # started over
    out = capsys.readouterr().out
    assert "discarding the partial run" in out and "made by other code: crmse.langevin" in out
    # Unchanged code (and settings, inputs) still resumes.
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "c", reference, model=_Faulty(crash_call=1 + 20 + 60 + 5))
    model = _Faulty()
    assert _run(tmp_path / "c", reference, model=model)["throughput"]["resumed"] and model.calls == 140


def test_the_code_fingerprint_sees_code_but_not_comments(tmp_path, monkeypatch):
    from crmse.sampling import TRAJECTORY_LIBRARIES, TRAJECTORY_MODULES, code_fingerprint, source_digest

    mod = tmp_path / "toy_integrator.py"
    monkeypatch.syspath_prepend(str(tmp_path))

    def digest(text: str) -> str:
        mod.write_text(text)
        source_digest.cache_clear()
        return source_digest("toy_integrator")

    base = digest('"""Doc."""\n\ndef kick(v, f):\n    return v + 0.5 * f\n')
    commented = '"""Other doc."""\n# a comment\n\ndef kick(v, f):\n    """Doc."""\n    return v + 0.5 * f  # why\n'
    assert digest(commented) == base
    assert digest('"""Doc."""\n\ndef kick(v, f):\n    return v + 0.25 * f\n') != base  # a friction-factor edit
    source_digest.cache_clear()
    fp = code_fingerprint()
    assert set(TRAJECTORY_MODULES) <= set(fp) and set(TRAJECTORY_LIBRARIES) <= set(fp)
    assert fp["torch"] == torch.__version__
    for m in ("crmse.sampling", "crmse.langevin", "crmse.pairlist", "crmse.model", "crmse.geometry", "crmse.units"):
        assert m in TRAJECTORY_MODULES


def test_a_checkpoint_of_other_atoms_fails_before_anything_is_written(tmp_path, reference):
    """Issue 31.4: a same-size model of other elements must not be sampled; no partial folder is left."""
    from crmse.data import Frames
    from crmse.model import CheckpointError, build_model
    from crmse.pairlist import VerletPotential

    a = synthetic_arrays("ethanol", 8, seed=1)
    other = a["z"].astype(np.int64).copy()
    other[8] = 7  # same size, another element
    frames = Frames(other, a["R"], a["E"][:, 0], a["F"], a["md17_index"])
    tiny = {"n_atom_basis": 8, "n_filters": 8, "n_interactions": 1, "n_rbf": 6, "cutoff": 3.0, "dtype": "float32"}
    model = build_model(other, tiny, frames)
    for fn in (model.energy_and_forces, VerletPotential(model, skin=0.5)):
        with pytest.raises(CheckpointError, match=r"models/x\.pt: the checkpoint is for atoms C2H5NO .* has C2H6O"):
            _run(tmp_path, reference, model=fn, meta={"checkpoint": "models/x.pt"})
        assert sorted(p.name for p in tmp_path.iterdir()) == []  # no .out.partial, no out


def test_a_run_failing_before_its_first_chunk_leaves_no_partial_folder(tmp_path, reference):
    def broken(R):
        raise RuntimeError("shape mismatch in the model")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        _run(tmp_path, reference, model=broken)
    assert not (tmp_path / ".out.partial").exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncate", "garble", "wrong_shape"])
def test_a_damaged_chunk_is_discarded_and_recomputed(tmp_path, reference, capsys, damage):
    """Issue 31.7: a corrupt chunk in the resume folder is detected, discarded (and said so), and recomputed."""
    from crmse.io import write_npz

    _run(tmp_path / "a", reference)
    full = (tmp_path / "a/out/samples.npz").read_bytes()

    crash = 1 + 20 + 3 * 60 + 5  # chunks 0, 1, 2 on disk
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "b", reference, model=_Faulty(crash_call=crash))
    chunk = tmp_path / "b/.out.partial/chunk_00001.npz"
    data = chunk.read_bytes()
    if damage == "truncate":
        chunk.write_bytes(data[: len(data) // 2])
    elif damage == "garble":
        chunk.write_bytes(data[:200] + bytes(b ^ 0xFF for b in data[200:400]) + data[400:])
    else:
        arrays = _arrays(chunk)
        arrays["R"] = arrays["R"][:2]
        write_npz(chunk, **arrays)
    model = _Faulty()
    summary = _run(tmp_path / "b", reference, model=model)
    out = capsys.readouterr().out
    assert "chunk_00001.npz is damaged" in out and "with the 1 chunk(s) after it" in out and "after chunk 0" in out
    assert model.calls == 140 and summary["throughput"]["resumed"]  # chunks 1, 2, 3 again (60 + 60 + 20 steps)
    assert (tmp_path / "b/out/samples.npz").read_bytes() == full


def test_frozen_replicas_are_compacted_out_with_byte_identical_outputs(tmp_path, reference):
    """Issue 31.9 at the stage level: compaction on or off, samples.npz and sample.json are the same bytes."""
    import inspect

    from crmse.langevin import Langevin

    pot = BondPotential.for_molecule("ethanol")[0]
    x_max = float(reference[1][:, :, 0].mean()) + 0.15

    def fuse(R):  # frame-separable fault: a frame whose centroid x passes x_max blows up
        E, F = pot(R)
        lit = R[:, :, 0].mean(1) > x_max
        return E, torch.where(lit[:, None, None], -5.0 * F, F)

    settings = SampleSettings(**{**SETTINGS.__dict__, "n_replicas": 9, "production_ps": 0.3, "trajectory_replica": 0})
    for compact in (False, True):
        _run(tmp_path / str(compact), reference, model=fuse, settings=settings, compact=compact)
    a, b = tmp_path / "False/out", tmp_path / "True/out"
    unstable = _arrays(a / "samples.npz")["unstable_frame"]
    assert 2 <= (unstable >= 0).sum() <= 7 and len(set(unstable[unstable >= 0])) >= 2  # some die, at various times
    for name in ("samples.npz", "sample.json", "trajectory.traj"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    on, off = (read_json(tmp_path / f"{c}/timing.json")["compaction"] for c in (True, False))
    assert on["enabled"] and on["off_reason"] is None and on["rows_skipped"] > 0
    assert not off["enabled"] and off["rows_skipped"] == 0
    # Compaction is the default of both the stage function and the engine.
    assert inspect.signature(run_sampling).parameters["compact"].default is True
    assert inspect.signature(Langevin).parameters["compact"].default is True
