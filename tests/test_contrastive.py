"""CRMSE: the contrastive gradient, chain handling, the hole term, selection, and a toy model with a spurious well."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crmse.contrastive import (
    VAL_COLUMNS,
    ChainConfig,
    ContrastiveTerm,
    CRMSEConfig,
    MSETerm,
    PersistentChains,
    contrastive_loss,
    log_columns,
    train_crmse,
)
from crmse.data import Frames
from crmse.holes import HoleConfig, HoleMemory, HoleTerm, Projection, ScoutConfig, combine_hole_gradient
from crmse.langevin import Langevin
from crmse.selection import SelectionConfig
from crmse.train import refit_energy_offset
from crmse.units import KB, masses

# A diatomic "molecule" (2 H atoms) whose energy depends on the bond length r (Å):
#   E_θ(r) = k/2 (r − r0)² − A·s(r) + c,   s(r) = (1 − ((r − r_w)/w)²)² on |r − r_w| < w, else 0.
# The true surface has A = 0. The bump s lives on [1.5, 2.3] Å where the data never goes
# (training frames have r < 1.45 Å), so MSE has exactly zero gradient on A: a model born
# with A > 0 keeps its spurious well however long MSE trains. Only sampling finds it.
R_WELL, W_WELL, T_TOY = 1.9, 0.4, 400.0


class ToyDiatomic(torch.nn.Module):
    def __init__(self, k: float = 20.0, r0: float = 1.0, A: float = 12.0) -> None:
        super().__init__()
        self.k = torch.nn.Parameter(torch.tensor(k, dtype=torch.float64))
        self.r0 = torch.nn.Parameter(torch.tensor(r0, dtype=torch.float64))
        self.A = torch.nn.Parameter(torch.tensor(A, dtype=torch.float64))
        self.c = 0.0  # a plain float, like Potential.mean: not in the state dict

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def energy(self, R: torch.Tensor, prune: bool = False) -> torch.Tensor:
        r = (R[:, 1] - R[:, 0]).norm(dim=-1)
        u = (r - R_WELL) / W_WELL
        bump = torch.where(u.abs() < 1, (1 - u * u) ** 2, torch.zeros_like(u))
        return 0.5 * self.k * (r - self.r0) ** 2 - self.A * bump + self.c

    def energy_and_forces(self, R: torch.Tensor, create_graph: bool = False, prune: bool = False):
        with torch.enable_grad():
            x = R if R.requires_grad else R.detach().requires_grad_(True)
            E = self.energy(x)
            (g,) = torch.autograd.grad(E.sum(), x, create_graph=create_graph)
        return E, -g

    def shift_energy(self, delta: float) -> None:
        self.c += delta


def _sample_bond_lengths(model: ToyDiatomic, n_rep: int, n_steps: int, seed: int, r_start: np.ndarray) -> np.ndarray:
    """Bond lengths of Langevin samples of exp(−E_θ/k_BT) at T_TOY (model frozen)."""
    R = np.zeros((n_rep, 2, 3))
    R[:, 1, 0] = r_start
    engine = Langevin(
        lambda x: model.energy_and_forces(x), masses(np.array([1, 1])), 1.0, T_TOY, 0.05, dtype=torch.float64
    )
    state = engine.init_state(R, seed)
    out = engine.run(state, n_steps, save_every=10)
    pos = out["R"][n_steps // 20 :]  # drop the first half as equilibration
    return (pos[..., 1, :] - pos[..., 0, :]).norm(dim=-1).flatten().numpy()


def _toy_data(n: int, seed: int = 0) -> Frames:
    """Boltzmann samples of the true surface (A = 0) at T_TOY, never beyond 1.45 Å."""
    rng = np.random.default_rng(seed)
    sigma = np.sqrt(KB * T_TOY / 20.0)
    r = 1.0 + sigma * rng.standard_normal(4 * n)
    r = r[(r > 0.5) & (r < 1.45)][:n]
    directions = rng.standard_normal((n, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    R = np.zeros((n, 2, 3))
    R[:, 1] = r[:, None] * directions
    E = 0.5 * 20.0 * (r - 1.0) ** 2
    F = np.zeros_like(R)
    F[:, 1] = -(20.0 * (r - 1.0))[:, None] * directions
    F[:, 0] = -F[:, 1]
    return Frames(np.array([1, 1]), R, E, F, np.arange(n))


def _in_well(R: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
    """Spurious-state detector of the toy: the bond is stretched into the well's range."""
    return (R[:, 1] - R[:, 0]).norm(dim=-1) > 1.5


def _cfg(chains: dict | None = None, selection: dict | None = None, **kw) -> CRMSEConfig:
    """A toy run: 32 chains at T_TOY, no weight averaging, the last weights kept."""
    chain = {"temperature": T_TOY, "n": 32, "steps_per_iter": 20, "dt": 1.0, "friction": 0.05, "p_reset": 0.0}
    select = {"rule": "last", "every": 50, "after": 0.5, "max_gap": 100.0}
    base = {"lam": 1.0, "iterations": 150, "lr": 0.05, "batch_size": 32, "rho_energy": 0.01, "rho_forces": 0.99,
            "grad_clip": 100.0, "ema_decay": 0.0, "seed": 0}
    return CRMSEConfig(ChainConfig(**{**chain, **(chains or {})}), SelectionConfig(**{**select, **(selection or {})}),
                       **{**base, **kw})


def _holes(**kw) -> HoleConfig:
    """A toy hole term: 64 slots, no scouts, no projection."""
    return HoleConfig(**{"slots": 64, "weight": 1.0, "scouts": ScoutConfig(0), "projection": Projection.OFF, **kw})


def _run(model, data, cfg, holes=None, stability=None, detector=_in_well):
    return train_crmse(model, data, data, cfg, holes, stability, detector, progress=False)


def test_configs_from_the_params_sections():
    crmse = {
        "lam": 0.5, "iterations": 300, "lr": 2e-4, "batch_size": 16, "rho_energy": 0.02, "rho_forces": 0.98,
        "grad_clip": 5.0, "ema_decay": 0.9,
        "chains": {"n": 8, "steps_per_iter": 10, "temperature": "auto", "dt": 0.25, "friction": 0.02, "p_reset": 0.1},
        "selection": {"rule": "best_val_forces", "every": 25, "after": 0.4, "max_gap": 2.0, "max_energy_rise": 0.2},
    }
    cfg = CRMSEConfig.from_params(crmse, 321.0, 7)
    assert cfg.chains == ChainConfig(321.0, 8, 10, 0.25, 0.02, 0.1)  # temperature: the resolved value, K
    assert cfg.selection == SelectionConfig("best_val_forces", 25, 0.4, 2.0, 0.2)
    assert (cfg.lam, cfg.iterations, cfg.lr, cfg.batch_size, cfg.ema_decay, cfg.seed) == (0.5, 300, 2e-4, 16, 0.9, 7)
    memory = {"slots": 128, "weight": 2.0, "scouts": {"n": 4, "temperature_ratio": 2.5}, "projection": "fit_and_energy"}
    assert HoleConfig.from_params(memory) == HoleConfig(128, 2.0, ScoutConfig(4, 2.5), Projection.FIT_AND_ENERGY)
    with pytest.raises(ValueError):
        HoleConfig.from_params({**memory, "projection": "both"})
    with pytest.raises(ValueError, match="unknown selection rule"):
        SelectionConfig(rule="best")


@pytest.mark.parametrize("weighted", [False, True])
def test_contrastive_gradient_is_the_kl_gradient(weighted):
    torch.manual_seed(0)
    model = ToyDiatomic(A=3.0)
    data = _toy_data(16)
    R_data = torch.as_tensor(data.R)
    R_chain = R_data.clone()
    R_chain[:, 1] *= 1.9 / R_chain[:, 1].norm(dim=-1, keepdim=True)  # chains sitting in the well
    beta = 1 / (KB * T_TOY)
    R_chain[::2, 1] *= 1.2  # chains at several places in the well
    # weights: 0 = a dead chain, 5 = an up-weighted chain
    w = torch.tensor([1.0, 5.0, 0.0, 1.0] * 4, dtype=torch.float64) if weighted else torch.ones(16, dtype=torch.float64)
    E_data = model.energy(R_data)
    loss, _ = contrastive_loss(E_data, model, R_chain, beta, w if weighted else None)
    grads = torch.autograd.grad(loss, list(model.parameters()))

    def mean_grad(R: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
        per = [torch.autograd.grad(model.energy(R[i : i + 1]).sum(), list(model.parameters())) for i in range(len(R))]
        return [(torch.stack([p[j] for p in per]) * weights).sum(0) / weights.sum() for j in range(len(per[0]))]

    ones = torch.ones(16, dtype=torch.float64)
    expected = [beta * (gd - gc) for gd, gc in zip(mean_grad(R_data, ones), mean_grad(R_chain, w), strict=True)]
    for g, e in zip(grads, expected, strict=True):
        torch.testing.assert_close(g, e)
    assert grads[2] > 0  # d/dA > 0: gradient descent lowers A, i.e. raises the well


def test_no_gradient_flows_into_chain_positions():
    model = ToyDiatomic()
    R_chain = torch.as_tensor(_toy_data(8).R).requires_grad_(True)
    loss, _ = contrastive_loss(model.energy(torch.as_tensor(_toy_data(8, 1).R)), model, R_chain, 1.0)
    loss.backward()
    assert R_chain.grad is None
    assert model.A.grad is not None


def test_dead_chains_are_left_out_of_the_mean():
    model = ToyDiatomic(A=0.0)
    R = torch.as_tensor(_toy_data(4).R)
    E_data = model.energy(R)
    alive = torch.tensor([True, True, False, False])
    loss, E_chain = contrastive_loss(E_data, model, R, 2.0, alive)
    torch.testing.assert_close(loss, 2.0 * (E_data.mean() - E_chain[:2].mean()))


def test_blown_up_chains_restart_from_training_frames_and_are_counted():
    model = ToyDiatomic(A=0.0)
    data = _toy_data(32)
    gen = torch.Generator().manual_seed(0)
    chains = PersistentChains(model, torch.as_tensor(data.R), masses(data.z), _cfg(chains={"n": 8}).chains, None, gen)
    chains.state.R[3] = float("nan")  # one chain explodes
    chains.state.alive[3] = False
    stats = chains.advance(5)
    assert int(stats["blowups"]) == 1
    assert bool(chains.state.alive.all()) and torch.isfinite(chains.state.R).all()
    r = (chains.state.R[3, 1] - chains.state.R[3, 0]).norm()
    assert r < 1.5  # back at a training-like geometry
    assert int(chains.age[3]) == 0 and int(chains.age[0]) == 5


def test_lambda_zero_is_mse_fine_tuning_whatever_the_chains_do():
    data = _toy_data(64)
    runs = []
    for temperature, p_reset in ((200.0, 0.0), (900.0, 0.3)):
        model = ToyDiatomic(k=15.0, A=12.0)
        _run(model, data, _cfg(lam=0.0, iterations=30, chains={"temperature": temperature, "p_reset": p_reset}))
        runs.append({k: v.clone() for k, v in model.state_dict().items()})
    for key in runs[0]:
        torch.testing.assert_close(runs[0][key], runs[1][key])
    assert runs[0]["k"].item() > 16.0  # MSE moved k from 15 towards the true 20
    assert runs[0]["A"].item() == 12.0  # and cannot see the well


def test_offset_refit_removes_a_constant_error():
    data = _toy_data(64)
    model = ToyDiatomic(A=0.0)
    model.c += 3.0
    delta = refit_energy_offset(model, data)
    assert delta == pytest.approx(-3.0, abs=1e-9)
    assert float(model.c) == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
def test_crmse_raises_a_spurious_well_that_mse_cannot_see():
    data = _toy_data(256)
    r_data = np.linalg.norm(data.R[:, 1] - data.R[:, 0], axis=1)
    models = {}
    for name, lam in (("mse", 0.0), ("crmse", 1.0)):
        model = ToyDiatomic(A=12.0)
        _run(model, data, _cfg(lam=lam, iterations=200, lr=0.1))
        models[name] = model
    assert models["mse"].A.item() == 12.0
    assert models["crmse"].A.item() < 9.0  # the well was raised by > 3 kcal/mol

    start = np.random.default_rng(1).choice(r_data, 64)
    occupancy, w1 = {}, {}
    from scipy.stats import wasserstein_distance

    for name, model in models.items():
        r = _sample_bond_lengths(model, 64, 4000, seed=2, r_start=start)
        occupancy[name] = float(np.mean(r > 1.5))
        w1[name] = wasserstein_distance(r, r_data)
    # MSE's samples pile into the spurious well; CRMSE's look like the data.
    assert occupancy["mse"] > 0.3
    assert occupancy["crmse"] < 0.1 * occupancy["mse"]
    assert w1["crmse"] < 0.25 * w1["mse"]


def test_selected_weights_come_with_their_own_energy_offset():
    # Selection restores an earlier state dict; the offset (not a parameter) must be refitted for it.
    data = _toy_data(64)
    model = ToyDiatomic(A=0.0)
    model.c += 5.0
    _run(model, data, _cfg(iterations=20, selection={"every": 5, "rule": "best_val_forces", "after": 0.0}))
    residual = data.E - model.energy(torch.as_tensor(data.R)).detach().numpy()
    assert abs(residual.mean()) < 1e-9


def test_fewest_chain_failures_selects_a_checkpoint_whose_chains_stayed_out_of_the_well():
    data = _toy_data(128)

    model = ToyDiatomic(A=12.0)
    res = _run(model, data, _cfg(iterations=200, lr=0.1,
                                 selection={"every": 20, "after": 0.0, "rule": "fewest_chain_failures"}))
    failures = {int(r["iteration"]): r["chain_failures"] for r in res.val_log}
    assert max(failures.values()) > 0  # the chains did fall into the well early on
    assert failures[res.selected_iteration] == min(failures.values())
    ties = [it for it, f in failures.items() if f == min(failures.values())]
    forces = {int(r["iteration"]): r["val_force_mae"] for r in res.val_log}
    assert forces[res.selected_iteration] == min(forces[it] for it in ties)  # ties broken by validation forces
    assert "fewest chain failures" in res.selection_note
    torch.testing.assert_close(model.A.detach(), res.state_dict["A"])  # the model holds the selected weights


@pytest.mark.parametrize(
    ("max_energy_rise", "selected", "note"),
    [
        (math.inf, 30, "best validation force MAE after"),
        (0.1, 20, "validation energy MAE <= 1.100 kcal/mol"),  # 30 and 40 have the better forces, worse energies
        (0.0, 60, "last iteration: no evaluation"),  # every evaluation is above the starting model's energy MAE
    ],
)
def test_selection_skips_checkpoints_whose_energy_error_rose(monkeypatch, max_energy_rise, selected, note):
    import crmse.contrastive as contrastive
    import crmse.selection as selection

    # Validation errors (energy MAE, force MAE) of the starting model, then of iterations 10, 20, ..., 60.
    scripted = iter([(1.0, 9.9), (1.05, 3.0), (1.02, 2.5), (1.30, 2.0), (1.20, 2.2), (1.09, 2.6), (1.5, 2.1)])
    if not math.isfinite(max_energy_rise):
        next(scripted)  # no guard: the starting model is not evaluated

    def errors(*args, **kwargs):
        return dict(zip(("energy_mae", "force_mae"), next(scripted), strict=True))

    monkeypatch.setattr(contrastive, "evaluate_errors", errors)
    monkeypatch.setattr(selection, "evaluate_errors", errors)
    data = _toy_data(32)
    cfg = _cfg(iterations=60, selection={"every": 10, "after": 0.0, "rule": "best_val_forces",
                                         "max_energy_rise": max_energy_rise})
    res = _run(ToyDiatomic(A=0.0), data, cfg)
    assert res.selected_iteration == selected
    assert note in res.selection_note


def test_the_chain_mean_weighs_every_live_chain_alike(monkeypatch):
    # Flagged chains enter L_C like any other live chain (weight 1); dead chains are left out (weight 0).
    import crmse.contrastive as contrastive

    seen = []

    def recording_loss(E_data, model, R_chains, beta, weights=None, prune=False):
        seen.append((R_chains.clone(), weights.clone()))
        return contrastive_loss(E_data, model, R_chains, beta, weights, prune)

    def short_bond(R: torch.Tensor, E: torch.Tensor) -> torch.Tensor:
        return (R[:, 1] - R[:, 0]).norm(dim=-1) < 1.0  # about half of the chains at any time

    monkeypatch.setattr(contrastive, "contrastive_loss", recording_loss)
    res = _run(ToyDiatomic(A=0.0), _toy_data(64), _cfg(iterations=5), detector=short_bond)
    for (R, w), row in zip(seen, res.log, strict=True):
        flagged = short_bond(R, None)
        assert 0 < int(flagged.sum()) < len(flagged)
        assert row["n_spurious"] == int(flagged.sum())
        torch.testing.assert_close(w, torch.ones_like(w))


def test_ema_decay_selects_the_polyak_average_of_the_live_weights(monkeypatch):
    live = []
    adam_step = torch.optim.Adam.step

    def recording_step(self, *args, **kwargs):
        out = adam_step(self, *args, **kwargs)
        live.append([p.detach().clone() for p in self.param_groups[0]["params"]])
        return out

    monkeypatch.setattr(torch.optim.Adam, "step", recording_step)
    model = ToyDiatomic(k=15.0, A=12.0)
    average = [p.detach().clone() for p in model.parameters()]
    res = _run(model, _toy_data(64), _cfg(iterations=12, lr=0.1, ema_decay=0.7))
    assert "moving average, decay 0.7" in res.selection_note  # recorded in <arm>_metrics.json and the report
    for step in live:
        average = [0.7 * a + 0.3 * w for a, w in zip(average, step, strict=True)]
    for got, want in zip(model.parameters(), average, strict=True):
        torch.testing.assert_close(got.detach(), want)
    assert not torch.allclose(model.k.detach(), live[-1][0])  # not simply the last weights


def test_hole_memory_keeps_the_newest_flagged_configurations():
    memory = HoleMemory(3, torch.zeros(2, 3, dtype=torch.float64))
    frames = torch.arange(5, dtype=torch.float64)[:, None, None].expand(5, 2, 3).clone()  # frame k is all k
    memory.add(frames, torch.tensor([False, True, False, True, False]))
    assert int(memory.count) == 2
    assert sorted(memory.R[:2, 0, 0].tolist()) == [1.0, 3.0]
    memory.add(frames + 10, torch.tensor([True, True, True, False, False]))  # 3 more into 3 slots: wraps
    assert int(memory.count) == 3
    assert sorted(memory.R[:3, 0, 0].tolist()) == [10.0, 11.0, 12.0]  # the oldest two were overwritten
    drawn = memory.sample(200, torch.Generator().manual_seed(0))[:, 0, 0]
    assert set(drawn.tolist()) == {10.0, 11.0, 12.0}


@pytest.mark.parametrize(("weight", "projection"), [(0.0, Projection.OFF), (1.0, Projection.OFF),
                                                    (1.0, Projection.FIT)])
def test_hole_memory_lifts_remembered_holes_to_the_highest_training_energy_and_no_further(weight, projection):
    # λ = 0: MSE cannot see the well (A has no MSE gradient), so only the remembered-hole hinge can raise it;
    # the projection removes only what opposes the fit, which here is nothing.
    data = _toy_data(128)

    model = ToyDiatomic(A=12.0)
    res = _run(model, data, _cfg(lam=0.0, iterations=300, lr=0.05), _holes(weight=weight, projection=projection))
    stored = [r["holes_stored"] for r in res.log]
    assert max(stored) > 0  # chains fell into the well and were remembered
    if weight == 0:
        assert model.A.item() == 12.0
        return
    ceiling = float(np.max(data.E))
    # The bottom of the well (r = 1.9 Å) now lies above every training energy ...
    bottom = torch.zeros(1, 2, 3, dtype=torch.float64)
    bottom[0, 1, 0] = R_WELL
    assert model.energy(bottom).item() > ceiling
    # ... and the hinge switched itself off there instead of raising the well without bound.
    assert res.log[-1]["l_hole"] == 0.0
    assert model.A.item() > 3.0  # the well is lifted above the data, not flattened


@pytest.mark.parametrize("scouts", [0, 32])
def test_hot_scouts_find_a_hole_behind_a_barrier_the_chains_do_not_cross(scouts):
    # Chains at 100 K do not cross the barrier between the data and the well in 150 iterations; scouts at 300 K do.
    data = _toy_data(128)

    model = ToyDiatomic(A=12.0)
    cfg = _cfg(lam=0.0, iterations=150, lr=0.05, chains={"temperature": 100.0})
    res = _run(model, data, cfg, _holes(scouts=ScoutConfig(scouts, temperature_ratio=3.0)))
    assert sum(r["n_spurious"] for r in res.log) == 0  # the chains themselves never reach the well
    if scouts == 0:
        assert res.log[-1]["holes_stored"] == 0 and model.A.item() == 12.0
        assert all(math.isnan(r["scout_spurious"]) and math.isnan(r["scout_blowups"]) for r in res.log)
    else:
        assert sum(r["scout_spurious"] for r in res.log) > 0
        assert model.A.item() < 9.0  # what the scouts found was lifted


@pytest.mark.parametrize("hole_sign", [-1.0, 1.0])
def test_projected_hole_gradient_never_opposes_the_fit(hole_sign):
    # Linear losses with known gradients a (fit) and b (hole): a·b < 0 conflicts, a·b > 0 does not.
    theta = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    a = torch.tensor([1.0, 0.0, 2.0], dtype=torch.float64)
    b = hole_sign * torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64)
    for projection in (Projection.OFF, Projection.FIT):
        stats = combine_hole_gradient([theta], (a * theta).sum(), (b * theta).sum(), projection)
        assert stats["grad_cos"].item() == pytest.approx((a @ b / (a.norm() * b.norm())).item())
        assert math.isnan(stats["grad_cos_energy"].item())  # only fit_and_energy projects off the energy term
        if projection is Projection.FIT and hole_sign < 0:
            # The hole part left is orthogonal to the fit's gradient: its first-order effect on the fit is zero.
            assert (theta.grad - a) @ a == pytest.approx(0.0, abs=1e-12)
            assert torch.allclose(theta.grad, a + b - (a @ b) / (a @ a) * a)
        else:
            assert torch.allclose(theta.grad, a + b)


def test_energy_projection_leaves_a_hole_gradient_that_never_opposes_the_energy_term():
    # fit = energy term e + force term f; the hole gradient b agrees with the fit (no first projection) but
    # opposes e, the direction that would bend relative energies inside the data's range.
    theta = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    e = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    f = torch.tensor([0.0, 4.0, 0.0], dtype=torch.float64)
    b = torch.tensor([-2.0, 3.0, 1.0], dtype=torch.float64)
    fit = (e * theta).sum() + (f * theta).sum()
    assert (e + f) @ b > 0 and e @ b < 0
    stats = combine_hole_gradient([theta], fit, (b * theta).sum(), Projection.FIT_AND_ENERGY, (e * theta).sum())
    hole_left = theta.grad - (e + f)
    assert hole_left @ e == pytest.approx(0.0, abs=1e-12)  # the energy term's first-order change is zero
    assert torch.allclose(hole_left, torch.tensor([0.0, 3.0, 1.0], dtype=torch.float64))
    assert stats["grad_cos_energy"].item() == pytest.approx((e @ b / (e.norm() * b.norm())).item())
    theta.grad = None
    combine_hole_gradient([theta], (e * theta).sum() + (f * theta).sum(), (b * theta).sum(), Projection.FIT)
    assert torch.allclose(theta.grad, e + f + b)  # projected off the fit only, the hole gradient passes unchanged


CRMSE_COLUMNS = {"iteration", "l_mse", "l_c", "gap", "e_data", "e_chain", "e_chain_min", "blowups", "random_resets",
                 "chain_age", "n_spurious", "d_chain_min", "grad_norm"}
HOLE_COLUMNS = {"l_hole", "holes_stored", "holes_below_ceiling", "grad_fit_norm", "grad_hole_norm", "grad_cos",
                "grad_cos_energy", "scout_spurious", "scout_blowups"}


@pytest.mark.parametrize(("arm", "holes"), [
    ("crmse", None),
    ("crmse_memory", _holes(projection=Projection.FIT)),
    ("crmse_memory", _holes(scouts=ScoutConfig(4), projection=Projection.FIT_AND_ENERGY)),
])
def test_log_columns_are_fixed_per_arm(arm, holes):
    # Whatever the options and whatever happens (chains falling into the well or not), every row of a run has
    # its arm's columns: the crmse arm's, and for crmse_memory those plus the hole term's.
    res = _run(ToyDiatomic(A=12.0), _toy_data(32), _cfg(iterations=6, selection={"every": 3}, ema_decay=0.5), holes)
    expected = CRMSE_COLUMNS | (HOLE_COLUMNS if arm == "crmse_memory" else set())
    assert set(res.log_columns) == expected
    assert res.log_columns == log_columns(holes)
    assert log_columns(holes)[: len(log_columns(None)) - 1] == log_columns(None)[:-1]  # the crmse arm's come first
    assert [list(r) for r in res.log] == [list(res.log_columns)] * 6
    assert [tuple(r) for r in res.val_log] == [VAL_COLUMNS] * 2
    assert set(VAL_COLUMNS) == {"iteration", "val_energy_mae", "val_force_mae", "gap", "offset_refit", "blowups",
                                "n_spurious", "chain_failures"}
    assert len(res.val_wall_s) == 2 and 0 < res.val_wall_s[0] <= res.val_wall_s[1] <= res.wall_s


def test_each_term_writes_its_own_columns():
    assert set(MSETerm.columns) == {"l_mse"}
    assert set(ContrastiveTerm.columns) == CRMSE_COLUMNS - {"iteration", "l_mse", "grad_norm"}
    assert set(HoleTerm.columns) == HOLE_COLUMNS
    holes = _holes(scouts=ScoutConfig(4), projection=Projection.FIT_AND_ENERGY)
    res = _run(ToyDiatomic(A=12.0), _toy_data(32), _cfg(iterations=3), holes)
    nan_by_design = {"d_chain_min"}  # the toy's detector is a plain function: no non-bonded distances
    for term in (MSETerm, ContrastiveTerm, HoleTerm):
        for c in set(term.columns) - nan_by_design:
            assert all(math.isfinite(r[c]) for r in res.log), c
    assert all(math.isnan(r["d_chain_min"]) for r in res.log)


def test_the_same_seed_repeats_a_memory_run_to_the_bit():
    runs = []
    for _ in range(2):
        model = ToyDiatomic(A=12.0)
        cfg = _cfg(iterations=8, chains={"p_reset": 0.2}, selection={"every": 4, "rule": "best_val_forces",
                                                                      "after": 0.0}, ema_decay=0.5, seed=3)
        res = _run(model, _toy_data(32), cfg, _holes(scouts=ScoutConfig(4), projection=Projection.FIT))
        runs.append((res, {k: v.clone() for k, v in model.state_dict().items()}))
    (a, sa), (b, sb) = runs
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    nan_equal = lambda x, y: x == y or (math.isnan(x) and math.isnan(y))  # noqa: E731
    assert all(nan_equal(x[k], y[k]) for x, y in zip(a.log, b.log, strict=True) for k in x)
    assert a.selected_iteration == b.selected_iteration
