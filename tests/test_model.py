"""crmse.model: forces are −∂E/∂R, E is invariant, batching is exact, checkpoints and ASE calculators agree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import schnetpack.properties as props
import torch
from ase import Atoms
from synthetic import reference_frame, synthetic_arrays

from crmse.data import Frames
from crmse.model import (
    CRMSECalculator,
    Potential,
    build_model,
    energy_scaling,
    export_schnetpack,
    kcal_per_mol_in_ev,
    load_checkpoint,
    pair_index,
    resolve_device,
    save_checkpoint,
    spk_calculator,
)

TINY = {"n_atom_basis": 8, "n_filters": 8, "n_interactions": 2, "n_rbf": 8, "cutoff": 5.0}


def frames(molecule: str = "ethanol", n: int = 16, seed: int = 0) -> Frames:
    a = synthetic_arrays(molecule, n, seed)
    return Frames(a["z"].astype(np.int64), a["R"], a["E"][:, 0], a["F"], a["md17_index"])


def tiny(molecule: str = "ethanol", dtype: str = "float64", seed: int = 0) -> tuple[Potential, Frames]:
    fr = frames(molecule)
    torch.manual_seed(seed)
    return build_model(fr.z, {**TINY, "dtype": dtype}, fr), fr


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    return q


def test_forces_are_minus_energy_gradient_by_finite_differences():
    model, fr = tiny("ethanol", "float64")
    # Without the −10⁵ kcal/mol offset (it has no gradient) so that the difference quotient is
    # not swamped by the rounding of absolute energies (ulp(97,000) / h ≈ 1e-6).
    model.mean = 0.0
    R = torch.tensor(fr.R[:2])
    _, F = model.energy_and_forces(R)
    h = 1e-5
    rng = np.random.default_rng(1)
    for b, atom, k in [(0, 0, 0), (0, 4, 2), (1, 8, 1), (1, 2, 0), (0, 6, 1)]:
        Rp, Rm = R.clone(), R.clone()
        Rp[b, atom, k] += h
        Rm[b, atom, k] -= h
        fd = -(model.energy(Rp)[b] - model.energy(Rm)[b]).item() / (2 * h)
        assert F[b, atom, k].item() == pytest.approx(fd, rel=1e-6, abs=1e-7)
    # A random direction checks the whole gradient at once.
    d = torch.tensor(rng.standard_normal(R.shape))
    fd = -(model.energy(R + h * d) - model.energy(R - h * d)) / (2 * h)
    np.testing.assert_allclose((F * d).sum((1, 2)).numpy(), fd.detach().numpy(), rtol=1e-6)
    # The model is not trivially flat: forces are of sensible size.
    assert F.abs().max() > 1e-3


def test_energy_is_rotation_and_translation_invariant_and_forces_rotate():
    model, fr = tiny("aspirin", "float64")
    rng = np.random.default_rng(3)
    Q = random_rotation(rng)
    R = fr.R[:3]
    moved = R @ Q.T + rng.standard_normal(3) * 5.0
    E0, F0 = model.energy_and_forces(torch.tensor(R))
    E1, F1 = model.energy_and_forces(torch.tensor(moved))
    np.testing.assert_allclose(E1.numpy(), E0.numpy(), rtol=0, atol=1e-8)
    np.testing.assert_allclose(F1.numpy(), F0.numpy() @ Q.T, atol=1e-9)
    # Permutation of frames in a batch permutes the energies (graph copies are independent).
    E2 = model.energy(torch.tensor(R[::-1].copy()))
    np.testing.assert_allclose(E2.detach().numpy(), E0.numpy()[::-1], atol=1e-9)


def test_batched_energies_equal_single_frame_energies_and_graph_is_cached():
    model, fr = tiny("aspirin", "float64")  # aspirin has pairs beyond the 5 Å cutoff
    R = torch.tensor(fr.R[:5])
    E_batch, F_batch = model.energy_and_forces(R)
    for b in range(5):
        E1, F1 = model.energy_and_forces(R[b : b + 1])
        assert E1.item() == pytest.approx(E_batch[b].item(), abs=1e-9)
        torch.testing.assert_close(F1[0], F_batch[b], rtol=0, atol=1e-10)
    g5 = model._graph(5)
    assert model._graph(5) is g5  # built once per batch size
    n = model.n_atoms
    assert g5[props.idx_i].numel() == 5 * n * (n - 1)
    i, j = pair_index(n)
    assert (i != j).all() and len(set(zip(i.tolist(), j.tolist(), strict=True))) == n * (n - 1)


def test_pruned_pair_list_gives_the_all_pairs_energy():
    model, fr = tiny("aspirin", "float64")
    R = torch.tensor(fr.R[:3])
    g = model._graph(3)
    Rf = R.reshape(-1, 3)
    Rij = Rf[g[props.idx_j]] - Rf[g[props.idx_i]]
    near = Rij.norm(dim=-1) < model.config["cutoff"]
    assert 0 < int((~near).sum())  # aspirin has pairs beyond the cutoff, so this prunes something
    E_pruned = model.energy_with_pairs(R, g[props.idx_i][near], g[props.idx_j][near], Rij[near])
    torch.testing.assert_close(E_pruned, model.energy(R), rtol=0, atol=1e-9)
    E1, F1 = model.energy_and_forces(R, prune=True)
    E0, F0 = model.energy_and_forces(R)
    torch.testing.assert_close(E1, E0, rtol=0, atol=1e-9)
    torch.testing.assert_close(F1, F0, rtol=0, atol=1e-9)


def test_absolute_energy_keeps_sub_0p01_resolution_in_float32():
    model32, fr = tiny("ethanol", "float32")
    model64 = build_model(fr.z, {**TINY, "dtype": "float64"}, fr)
    model64.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in model32.state_dict().items()})
    R = fr.R[:4]
    E32 = model32.energy(torch.tensor(R, dtype=torch.float32))
    E64 = model64.energy(torch.tensor(R))
    assert E32.dtype == torch.float64 and abs(E32.mean().item()) > 9e4  # absolute kcal/mol
    # float32 itself resolves only ~0.008 kcal/mol at 97,000; the float64 shift keeps ~1e-5.
    assert (E32 - E64).abs().max().item() < 1e-3


def test_scaling_is_fitted_on_training_energies():
    fr = frames("ethanol", 40)
    mean, std = energy_scaling(fr.z, fr.E)
    assert mean == pytest.approx(fr.E.mean() / 9)
    assert std == pytest.approx((fr.E / 9).std())
    model = build_model(fr.z, {**TINY, "dtype": "float64"}, fr)
    assert (model.mean, model.std) == (mean, std)
    # Untrained network: energies sit near the training mean, not near zero.
    E = model.energy(torch.tensor(fr.R)).detach().numpy()
    assert abs(E.mean() - fr.E.mean()) < 50


def test_save_load_gives_identical_outputs_and_needs_no_training_code(tmp_path):
    model, fr = tiny("ethanol", "float32")
    with torch.no_grad():  # make weights differ from a fresh initialisation
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, {"epochs": 3, "note": "x"})
    loaded, meta = load_checkpoint(path)
    assert meta == {"epochs": 3, "note": "x"}
    assert not loaded.training and loaded.config == model.config
    R = torch.tensor(fr.R[:4], dtype=torch.float32)
    E0, F0 = model.energy_and_forces(R)
    E1, F1 = loaded.energy_and_forces(R)
    assert torch.equal(E0, E1) and torch.equal(F0, F1)
    code = (
        "import sys, torch; from crmse.model import load_checkpoint; "
        f"m, meta = load_checkpoint({str(path)!r}); "
        f"R = torch.tensor({fr.R[:1].tolist()}, dtype=torch.float32); "
        "print(repr(m.energy(R).item())); assert 'crmse.train' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # Same batch shape as in the subprocess: float32 kernels may round differently per batch size.
    assert float(out.stdout) == loaded.energy(R[:1]).item()


def test_checkpoint_refuses_nan_weights_and_rejects_foreign_files(tmp_path):
    model, _ = tiny()
    with torch.no_grad():
        next(model.parameters())[0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        save_checkpoint(model, tmp_path / "nan.pt")
    assert not (tmp_path / "nan.pt").exists()
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a crmse potential checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_bytes_depend_only_on_the_content(tmp_path):
    """Issue 31.3: the same model saved twice (different paths, different times) is the same bytes."""
    import zipfile

    model, _ = tiny("ethanol", "float32")
    a, b = tmp_path / "a" / "mse.pt", tmp_path / "b" / "other_name.pt"
    save_checkpoint(model, a, {"epochs": 3})
    save_checkpoint(model, b, {"epochs": 3})
    assert a.read_bytes() == b.read_bytes()
    # torch.save to a file names the zip's records after it (an atomic temp name); in memory: "archive/".
    assert {n.split("/")[0] for n in zipfile.ZipFile(a).namelist()} == {"archive"}
    export_schnetpack(model, tmp_path / "a" / "spk.pt")
    export_schnetpack(model, tmp_path / "b" / "x_spk.pt")
    assert (tmp_path / "a" / "spk.pt").read_bytes() == (tmp_path / "b" / "x_spk.pt").read_bytes()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["mse.pt", "spk.pt"]  # no temp file left


def test_schnetpack_export_bytes_do_not_depend_on_the_string_hash_seed(tmp_path):
    """Issue 31.3: schnetpack keeps its output keys in a set; under PYTHONHASHSEED 1 and 3 their order differed."""
    script = (
        "import sys, torch; from pathlib import Path; sys.path.insert(0, sys.argv[2]);"
        "from test_model import tiny; from crmse.model import export_schnetpack;"
        "export_schnetpack(tiny('ethanol', 'float32')[0], Path(sys.argv[1]))"
    )
    tests = str(Path(__file__).parent)
    for seed in ("1", "3"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", script, str(tmp_path / f"{seed}.pt"), tests], env=env, check=True)
    assert (tmp_path / "1.pt").read_bytes() == (tmp_path / "3.pt").read_bytes()


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs two cores")
def test_stage_torch_setup_gives_two_threads_the_one_thread_force_bits():
    """Two threads accumulated the backward of SchNet's indexed reads atomically: forces and gradients changed in
    their last bits from run to run (and differed from one thread's). The stages' torch setup makes them exact."""
    script = (
        "import sys, hashlib, torch; sys.path.insert(0, sys.argv[1]); from test_model import frames;"
        "from crmse.model import build_model; from crmse.stage import configure_torch;"
        "configure_torch({'torch_threads': int(sys.argv[2]), 'device': 'cpu'});"
        "fr = frames('ethanol', 43); torch.manual_seed(0);"
        "m = build_model(fr.z, {'n_atom_basis': 64, 'n_filters': 64, 'n_interactions': 3, 'n_rbf': 20,"
        " 'cutoff': 5.0, 'dtype': 'float32'}, fr).train();"
        "R = torch.tensor(fr.R, dtype=torch.float32);"
        "print(len({hashlib.sha256(m.energy_and_forces(R)[1].detach().numpy().tobytes()).hexdigest()"
        " for _ in range(5)}), hashlib.sha256(m.energy_and_forces(R)[1].detach().numpy().tobytes()).hexdigest())"
    )
    tests = str(Path(__file__).parent)
    runs = [subprocess.run([sys.executable, "-c", script, tests, n], capture_output=True, text=True, check=True)
            .stdout.split() for n in ("1", "2")]
    assert runs[0][0] == runs[1][0] == "1"  # the same bits on every call
    assert runs[0][1] == runs[1][1]  # and the same bits on one thread and two


def test_unreadable_checkpoints_name_the_file_and_never_advise_weights_only_false(tmp_path):
    """Issue 31.7: a garbage checkpoint gets a clear error naming it, never torch's pickle advice."""
    from crmse.model import CheckpointError

    model, _ = tiny("ethanol", "float32")
    good = tmp_path / "good.pt"
    save_checkpoint(model, good, {})
    marker = tmp_path / "pwned"

    class Planted:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = {
        "text.pt": b"this is not a checkpoint\n" * 20,
        "truncated.pt": good.read_bytes()[: len(good.read_bytes()) // 2],
        "random.pt": np.random.default_rng(0).bytes(3000),
        "empty.pt": b"",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"format": "crmse-potential-1", "x": Planted()}, tmp_path / "planted.pt")
    for name in [*bad, "planted.pt"]:
        with pytest.raises(CheckpointError) as err:
            load_checkpoint(tmp_path / name)
        msg = str(err.value)
        assert str(tmp_path / name) in msg and "weights_only" not in msg, msg
        chained = err.value.__cause__ or (None if err.value.__suppress_context__ else err.value.__context__)
        assert chained is None  # no torch traceback (and its advice) shown above ours
    assert not marker.exists()  # the planted pickle never ran


def test_a_checkpoint_of_other_atoms_or_shapes_is_refused_with_both_atom_lists(tmp_path):
    """Issue 31.4: load_checkpoint(expected_z=...) is the one place that checks a checkpoint against the data."""
    from crmse.model import CheckpointError

    model, fr = tiny("ethanol", "float32")
    path = tmp_path / "mse.pt"
    save_checkpoint(model, path, {})
    load_checkpoint(path, expected_z=fr.z)  # the right atoms: fine
    other = fr.z.copy()
    other[-1] = 7
    expected = r"mse\.pt: the checkpoint is for atoms C2H6O \[6, 6, 8, 1, 1, 1, 1, 1, 1\] but the data has C2H5NO \[6"
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path, expected_z=other)
    aspirin_z = np.array(reference_frame("aspirin")[0])
    with pytest.raises(CheckpointError, match="C9H8O4"):
        load_checkpoint(path, expected_z=aspirin_z)  # another size
    # Weights that do not fit the checkpoint's own config: a clear error, not a bare size mismatch.
    payload = torch.load(path, weights_only=True)
    payload["config"]["n_atom_basis"] = 16
    torch.save(payload, tmp_path / "bent.pt")
    with pytest.raises(CheckpointError, match=r"bent\.pt: the weights do not fit"):
        load_checkpoint(tmp_path / "bent.pt")


def test_the_head_is_schnetpacks_atomwise_computed_row_by_row():
    """In eval mode the last head layer is a row-wise dot product (batch-size independent): the same function."""
    model, fr = tiny("ethanol", "float64")
    x = torch.randn(50, TINY["n_atom_basis"], dtype=torch.float64)
    assert torch.equal(model.train()._atom_outputs(x), model.head.outnet(x)[:, 0])  # training: schnetpack's layer
    torch.testing.assert_close(model.eval()._atom_outputs(x), model.head.outnet(x)[:, 0], rtol=1e-12, atol=1e-12)
    # Forces are the same bits in both modes; energies agree to rounding.
    R = torch.tensor(fr.R[:5])
    E_train, F_train = model.train().energy_and_forces(R)
    E_eval, F_eval = model.eval().energy_and_forces(R)
    assert torch.equal(F_train, F_eval)
    torch.testing.assert_close(E_train, E_eval, rtol=1e-14, atol=1e-9)


def test_bad_inputs_give_clear_errors():
    model, fr = tiny("ethanol", "float32")
    with pytest.raises(ValueError, match=r"shape \(B, 9, 3\)"):
        model.energy(torch.zeros(2, 8, 3))
    with pytest.raises(TypeError, match="dtype"):
        model.energy(torch.zeros(2, 9, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="lacks"):
        Potential(fr.z, {"n_atom_basis": 8})
    with pytest.raises(ValueError, match="different molecule"):
        build_model(np.array(reference_frame("aspirin")[0]), {**TINY, "dtype": "float32"}, fr)
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")


def test_energy_and_forces_modes():
    model, fr = tiny("ethanol", "float64")
    R = torch.tensor(fr.R[:2])
    with torch.no_grad():  # MD engines may call it without a grad context
        E, F = model.energy_and_forces(R)
    assert not E.requires_grad and not F.requires_grad
    E, F = model.energy_and_forces(R, create_graph=True)
    (F**2).sum().backward()  # force matching needs d|F|²/dθ
    # (The output bias cannot affect forces; every weight feeding them gets a gradient.)
    assert model.head.outnet[0].weight.grad.abs().sum() > 0
    assert all(p.grad is not None for p in model.representation.interactions.parameters())
    # A caller's R that requires grad stays connected (Laplacian / Hessian users).
    Rg = R.clone().requires_grad_(True)
    _, F = model.energy_and_forces(Rg, create_graph=True)
    (g,) = torch.autograd.grad(F.sum(), Rg)
    assert g.shape == R.shape and torch.isfinite(g).all()


def test_crmse_and_schnetpack_calculators_match_the_potential(tmp_path):
    z, R0, _ = reference_frame("aspirin")
    model, fr = tiny("aspirin", "float32")
    ckpt, spk_file = tmp_path / "m.pt", tmp_path / "m_spk.pt"
    save_checkpoint(model, ckpt, {})
    export_schnetpack(model, spk_file)
    E, F = model.energy_and_forces(torch.tensor(R0[None], dtype=torch.float32))
    E, F = E.item(), F[0].double().numpy()
    ev = kcal_per_mol_in_ev()
    for calc in (CRMSECalculator(model), CRMSECalculator(ckpt), spk_calculator(spk_file, cutoff=5.0)):
        atoms = Atoms(numbers=z, positions=R0)
        atoms.calc = calc
        assert atoms.get_potential_energy() / ev == pytest.approx(E, abs=2e-4)
        np.testing.assert_allclose(atoms.get_forces() / ev, F, atol=2e-4, rtol=1e-4)
    atoms = Atoms(numbers=z[::-1], positions=R0)
    atoms.calc = CRMSECalculator(model)
    with pytest.raises(ValueError, match="differ from the model"):
        atoms.get_potential_energy()
