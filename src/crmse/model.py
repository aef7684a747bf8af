"""SchNet potential of one fixed molecule: energies, forces, checkpoints, ASE calculators.

The network is schnetpack's: :class:`schnetpack.representation.SchNet` (Gaussian
radial basis, cosine cutoff) and an :class:`schnetpack.atomistic.Atomwise` head
giving per-atom outputs ``y_i``. The energy is

    E = Σ_i (std · y_i + mean)      [kcal/mol]

with ``mean``/``std`` the per-atom mean and standard deviation of the training
energies (E/n, as schnetpack's ``divide_by_atoms`` statistics). The sum and the
mean shift are done in float64: MD17 energies are ~ −97,000 kcal/mol, where
float32 resolves only ~0.008 kcal/mol.

All frames of a molecule share the same atoms, so a batch is B copies of one
graph: the all-pairs index is built once per (B, device) and cached, never per
frame; the cutoff acts inside the model (pairs beyond it get zero weight).
:meth:`Potential.energy_and_forces` is the single evaluation function used by
training, the Langevin engine, CRMSE and the ASE calculators.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import schnetpack.properties as props
import torch
from ase.calculators.calculator import Calculator, all_changes
from schnetpack.atomistic import Atomwise
from schnetpack.nn.cutoff import CosineCutoff
from schnetpack.nn.radial import GaussianRBF
from schnetpack.representation import SchNet
from torch import nn

from crmse.io import atomic_path

CHECKPOINT_FORMAT = "crmse-potential-1"
MODEL_KEYS = ("n_atom_basis", "n_filters", "n_interactions", "n_rbf", "cutoff", "dtype")
_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_MAX_CACHED_GRAPHS = 16


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` fails clearly when there is no GPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but torch sees no CUDA device (use auto or cpu)")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def pair_index(n_atoms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs (i, j), i ≠ j, of one molecule: the neighbour list of a fixed molecule.

    Kept as one small function so that a pruned (e.g. Verlet) pair list can replace it.
    """
    i, j = torch.meshgrid(torch.arange(n_atoms), torch.arange(n_atoms), indexing="ij")
    keep = i != j
    return i[keep], j[keep]


class Potential(nn.Module):
    """SchNet energy model of one molecule. Units: R Å, E kcal/mol, F kcal/mol/Å.

    ``mean`` and ``std`` (per atom, kcal/mol) are Python floats rather than buffers so that
    ``.to(float32)`` can never round the −10⁴ kcal/mol shift.
    """

    def __init__(self, z: np.ndarray | list[int], config: dict[str, Any], mean: float = 0.0, std: float = 1.0):
        super().__init__()
        missing = [k for k in MODEL_KEYS if k not in config]
        if missing:
            raise ValueError(f"model config lacks {missing}; needs {list(MODEL_KEYS)}")
        if config["dtype"] not in _DTYPES:
            raise ValueError(f"model dtype must be float32 or float64, got {config['dtype']!r}")
        if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
            raise ValueError(f"energy scaling must be finite with std > 0, got mean={mean}, std={std}")
        self.config = {k: config[k] for k in MODEL_KEYS}
        self.register_buffer("z", torch.as_tensor(np.asarray(z), dtype=torch.long))
        self.n_atoms = int(self.z.numel())
        self.mean = float(mean)
        self.std = float(std)
        c = self.config
        self.representation = SchNet(
            n_atom_basis=int(c["n_atom_basis"]),
            n_interactions=int(c["n_interactions"]),
            radial_basis=GaussianRBF(n_rbf=int(c["n_rbf"]), cutoff=float(c["cutoff"])),
            cutoff_fn=CosineCutoff(float(c["cutoff"])),
            n_filters=int(c["n_filters"]),
        )
        # Per-atom outputs only: the sum over atoms is done here, in float64 and without
        # Atomwise's host synchronisation (int(idx_m[-1])) on every call.
        self.head = Atomwise(
            n_in=int(c["n_atom_basis"]), n_out=1, aggregation_mode=None, per_atom_output_key="y_atom"
        )
        self.to(_DTYPES[c["dtype"]])
        self._graphs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        base_i, base_j = pair_index(self.n_atoms)
        self.register_buffer("pair_i", base_i, persistent=False)
        self.register_buffer("pair_j", base_j, persistent=False)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.outnet[0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.z.device

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _graph(self, B: int) -> dict[str, torch.Tensor]:
        """Index tensors of B copies of the molecule, cached per (B, device)."""
        key = (B, str(self.z.device))
        g = self._graphs.get(key)
        if g is None:
            if len(self._graphs) >= _MAX_CACHED_GRAPHS:
                self._graphs.clear()
            n, dev = self.n_atoms, self.z.device
            shift = (torch.arange(B, device=dev) * n)[:, None]
            g = {
                props.Z: self.z.repeat(B),
                props.idx_i: (self.pair_i[None] + shift).reshape(-1),
                props.idx_j: (self.pair_j[None] + shift).reshape(-1),
                props.idx_m: torch.arange(B, device=dev).repeat_interleave(n),
                props.n_atoms: torch.full((B,), n, device=dev, dtype=torch.long),
            }
            self._graphs[key] = g
        return g

    def _check(self, R: torch.Tensor) -> None:
        if R.ndim != 3 or R.shape[1:] != (self.n_atoms, 3):
            raise ValueError(f"R must have shape (B, {self.n_atoms}, 3), got {tuple(R.shape)}")
        if R.dtype != self.dtype:
            raise TypeError(f"R has dtype {R.dtype} but the model is {self.dtype}; convert R first")

    def energy(self, R: torch.Tensor, prune: bool = False) -> torch.Tensor:
        """Absolute energies (B,) float64 kcal/mol of frames R (B, n, 3) Å; differentiable in R and θ.

        ``prune=True`` drops pairs beyond the cutoff before the network (same energies: their
        weight is exactly zero; a training step is ~1.3× faster for aspirin, where 29 % of pairs lie
        beyond 5 Å).
        It costs a host synchronisation, so MD on a GPU should leave it off.
        """
        self._check(R)
        g = self._graph(R.shape[0])
        # Pair vectors straight from the per-molecule pair list (same order as idx_i/idx_j).
        Rij = (R[:, self.pair_j] - R[:, self.pair_i]).reshape(-1, 3)
        idx_i, idx_j = g[props.idx_i], g[props.idx_j]
        if prune:
            near = torch.nonzero(Rij.detach().norm(dim=-1) < self.config["cutoff"], as_tuple=True)[0]
            idx_i, idx_j, Rij = idx_i[near], idx_j[near], Rij[near]
        return self.energy_with_pairs(R, idx_i, idx_j, Rij)

    def energy_with_pairs(
        self, R: torch.Tensor, idx_i: torch.Tensor, idx_j: torch.Tensor, Rij: torch.Tensor
    ) -> torch.Tensor:
        """Energies (B,) float64 kcal/mol on a given pair list (flat indices into the B·n atoms).

        ``Rij`` (P, 3) = R_j − R_i of those pairs. The hook for pruned (e.g. Verlet) pair lists:
        pairs beyond the cutoff contribute exactly zero, so any list holding every pair within
        the cutoff gives the all-pairs energy.
        """
        self._check(R)
        B = R.shape[0]
        g = self._graph(B)
        inputs = {
            props.Z: g[props.Z],
            props.idx_m: g[props.idx_m],
            props.n_atoms: g[props.n_atoms],
            props.idx_i: idx_i,
            props.idx_j: idx_j,
            props.R: R.reshape(-1, 3),
            props.Rij: Rij,
        }
        inputs = self.representation(inputs)
        y = self.head(inputs)["y_atom"].reshape(B, self.n_atoms)
        return (y.double() * self.std).sum(1) + self.n_atoms * self.mean

    def energy_and_forces(
        self, R: torch.Tensor, create_graph: bool = False, prune: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(E (B,) float64 kcal/mol, F = −∂E/∂R (B, n, 3) model dtype kcal/mol/Å).

        With ``create_graph=False`` both are detached (MD, evaluation); with ``True`` they stay
        differentiable in θ (and in R when R itself requires grad), e.g. for force-matching losses.
        Works under ``torch.no_grad()``. ``prune``: see :meth:`energy`.
        """
        with torch.enable_grad():
            Rg = R if R.requires_grad else R.detach().requires_grad_(True)
            E = self.energy(Rg, prune=prune)
            (dE,) = torch.autograd.grad(E.sum(), Rg, create_graph=create_graph)
        F = -dE
        if not create_graph:
            return E.detach(), F.detach()
        return E, F

    def forward(self, R: torch.Tensor) -> torch.Tensor:
        return self.energy(R)

    def shift_energy(self, delta: float) -> None:
        """Add a constant ``delta`` (kcal/mol) to every energy; forces are unchanged."""
        self.mean += float(delta) / self.n_atoms


def energy_scaling(z: np.ndarray, E: np.ndarray) -> tuple[float, float]:
    """Per-atom mean and std (kcal/mol) of training energies E (N,): mean(E)/n, std(E/n)."""
    n = len(z)
    e = np.asarray(E, dtype=np.float64).reshape(-1) / n
    if len(e) == 0 or not np.all(np.isfinite(e)):
        raise ValueError("training energies must be a non-empty finite array")
    std = float(e.std()) if len(e) > 1 else 0.0
    if not std > 1e-8:
        std = 1.0 / n  # a single frame or constant energies: no spread to learn from
    return float(e.mean()), std


def build_model(z: np.ndarray, model_params: dict[str, Any], train: Any) -> Potential:
    """New SchNet potential sized by params ``model``; scaling fitted on ``train`` (a Frames)."""
    z = np.asarray(z)
    if not np.array_equal(np.asarray(train.z), z):
        raise ValueError("training frames are of a different molecule than z")
    mean, std = energy_scaling(z, train.E)
    return Potential(z, model_params, mean, std)


def save_checkpoint(model: Potential, path: str | Path, meta: dict[str, Any] | None = None) -> None:
    """Write config + weights + scaling + meta atomically; refuses a model with non-finite weights."""
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"refusing to save a model with non-finite weights in {bad[:3]}")
    payload = {
        "format": CHECKPOINT_FORMAT,
        # The actual dtype, in case the model was cast after construction (e.g. .double()).
        "config": {**model.config, "dtype": {v: k for k, v in _DTYPES.items()}[model.dtype]},
        "z": model.z.cpu().tolist(),
        "scaling": {"mean_per_atom": model.mean, "std_per_atom": model.std},
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "meta": dict(meta or {}),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[Potential, dict[str, Any]]:
    """(model in eval mode on ``device``, meta) from a :func:`save_checkpoint` file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a crmse potential checkpoint (format {CHECKPOINT_FORMAT})")
    s = payload["scaling"]
    model = Potential(payload["z"], payload["config"], s["mean_per_atom"], s["std_per_atom"])
    model.load_state_dict(payload["state_dict"])
    dev = resolve_device(device) if isinstance(device, str) else device
    return model.to(dev).eval(), payload["meta"]


def _as_model(model_or_path: Potential | str | Path, device: str | torch.device) -> Potential:
    if isinstance(model_or_path, Potential):
        return model_or_path
    model, _ = load_checkpoint(model_or_path, device)
    return model


def kcal_per_mol_in_ev() -> float:
    from ase import units

    return units.kcal / units.mol


class CRMSECalculator(Calculator):
    """ASE calculator (eV, eV/Å) driving a :class:`Potential` or a checkpoint file through ``energy_and_forces``."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, model: Potential | str | Path, device: str | torch.device = "cpu", **kwargs: Any):
        super().__init__(**kwargs)
        self.model = _as_model(model, device).eval()

    def calculate(self, atoms: Any = None, properties: Any = ("energy",), system_changes: Any = all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        z = self.atoms.get_atomic_numbers()
        if not np.array_equal(z, self.model.z.cpu().numpy()):
            raise ValueError(f"atoms {z.tolist()} differ from the model's molecule {self.model.z.tolist()}")
        R = torch.as_tensor(self.atoms.get_positions(), dtype=self.model.dtype, device=self.model.device)
        E, F = self.model.energy_and_forces(R[None])
        conv = kcal_per_mol_in_ev()
        self.results = {
            "energy": float(E[0]) * conv,
            "forces": F[0].double().cpu().numpy() * conv,
        }


def to_schnetpack(model: Potential) -> nn.Module:
    """The same potential as a schnetpack ``NeuralNetworkPotential`` (kcal/mol, Å; keys energy/forces).

    The per-atom std is folded into the head's last layer and the per-atom mean is added by
    ``AddOffsets`` after casting to float64, so the file needs nothing but schnetpack to run
    (``schnetpack.interfaces.SpkCalculator``, neighbour list with cutoff ≥ the model's).
    """
    import schnetpack as spk

    rep = copy.deepcopy(model.representation).cpu()
    head = Atomwise(n_in=int(model.config["n_atom_basis"]), n_out=1, output_key=props.energy)
    head.outnet.load_state_dict(model.head.outnet.state_dict())
    head = head.to(model.dtype)
    last = head.outnet[-1]
    with torch.no_grad():
        last.weight.mul_(model.std)
        last.bias.mul_(model.std)
    nnp = spk.model.NeuralNetworkPotential(
        representation=rep,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[head, spk.atomistic.Forces(energy_key=props.energy, force_key=props.forces)],
        postprocessors=[
            spk.transform.CastTo64(),
            spk.transform.AddOffsets(
                props.energy, add_mean=True, property_mean=torch.tensor([model.mean], dtype=torch.float64)
            ),
        ],
        input_dtype_str=model.config["dtype"],
    )
    # No nnp.to(dtype): that would round the float64 mean offset to float32.
    return nnp.cpu().eval()


def export_schnetpack(model: Potential, path: str | Path) -> None:
    """Write :func:`to_schnetpack` of ``model`` with ``torch.save`` (loadable by ``schnetpack.utils.load_model``)."""
    nnp = to_schnetpack(model)
    with atomic_path(path) as tmp:
        torch.save(nnp, tmp)


def spk_calculator(path: str | Path, cutoff: float, device: str = "cpu", dtype: torch.dtype = torch.float64) -> Any:
    """A ``schnetpack.interfaces.SpkCalculator`` for an exported file (units kcal/mol, Å → ASE eV).

    float64 by default: SpkCalculator casts the whole model, offset included, to ``dtype``, and a
    float32 offset of ~ −10⁴ kcal/mol per atom is only good to ~0.001 kcal/mol per atom.
    """
    import schnetpack as spk

    return spk.interfaces.SpkCalculator(
        model=str(path),
        neighbor_list=spk.transform.ASENeighborList(cutoff=cutoff),
        energy_key=props.energy,
        force_key=props.forces,
        energy_unit="kcal/mol",
        position_unit="Angstrom",
        device=device,
        dtype=dtype,
    )
