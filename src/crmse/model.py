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
import io
import math
import pickle
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

from crmse.artifacts import CheckpointError
from crmse.io import write_bytes
from crmse.units import formula

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
        x = self.representation(inputs)["scalar_representation"]
        y = self._atom_outputs(x).reshape(B, self.n_atoms)
        return (y.double() * self.std).sum(1) + self.n_atoms * self.mean

    def _atom_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """Per-atom outputs y_i (N,) of the head from atom features x (N, n_atom_basis).

        In eval mode (MD, evaluation) the head's last layer (one output) runs as a row-wise dot
        product instead of schnetpack's matrix-vector product: BLAS gemv rounds a row differently
        depending on how many rows there are, a row-wise sum does not, so an atom's energy does not
        depend on the batch it is evaluated in (the Langevin engine drops frozen replicas from the
        batch and must not change the others' energies). Forces are the same bits either way (the
        layer's input gradient is an exact product). In training mode schnetpack's layer as it is,
        so that training gives the numbers it always gave.
        """
        if self.training:
            return self.head.outnet(x)[:, 0]
        *hidden, last = self.head.outnet
        for layer in hidden:
            x = layer(x)
        return (x * last.weight[0]).sum(-1) + last.bias[0]

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
    write_bytes(path, torch_bytes(payload))


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` of ``obj`` as bytes that depend only on ``obj``.

    ``torch.save`` to a file names the zip's records after the file (``<stem>/data.pkl``), so a save
    through an atomic temporary path (a random name) changed the bytes on every run and DVC reran
    everything downstream; in memory the records are always ``archive/...``.
    """
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _read_payload(path: Path) -> dict[str, Any]:
    """The checkpoint's payload dict, or :class:`CheckpointError` naming the file (never torch's pickle advice)."""
    with open(path, "rb") as fh:
        head = fh.read(16)
    if not head.startswith(b"PK\x03\x04"):  # torch.save writes a zip archive
        raise CheckpointError(
            f"{path}: not a crmse checkpoint: not a torch zip archive (it starts with {head!r}); "
            "a foreign, empty or overwritten file? Rerun the stage that writes it"
        )
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        # torch's message advises weights_only=False: never the right advice for a file that should hold tensors.
        raise CheckpointError(
            f"{path}: not a crmse checkpoint: it holds objects other than tensors and plain data "
            "(a foreign or tampered file; it was not unpickled). Rerun the stage that writes it"
        ) from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a damaged archive
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(
            f"{path}: not a readable crmse checkpoint: truncated or corrupt archive ({type(exc).__name__}"
            f"{': ' + reason if reason else ''}); rerun the stage that writes it"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a crmse potential checkpoint (format {CHECKPOINT_FORMAT})")
    missing = [k for k in ("z", "config", "scaling", "state_dict", "meta") if k not in payload]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing} (format {CHECKPOINT_FORMAT})")
    return payload


def check_atoms(path: str | Path, model_z: Any, expected_z: Any) -> None:
    """Raise :class:`CheckpointError` unless a checkpoint's atoms equal the data's, in order."""
    model_z = np.asarray(model_z).astype(np.int64).reshape(-1)
    expected_z = np.asarray(expected_z).astype(np.int64).reshape(-1)
    if not np.array_equal(model_z, expected_z):
        raise CheckpointError(
            f"{path}: the checkpoint is for atoms {formula(model_z)} {model_z.tolist()} but the data has "
            f"{formula(expected_z)} {expected_z.tolist()}: a checkpoint of another molecule (or atom order)?"
        )


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", expected_z: Any | None = None
) -> tuple[Potential, dict[str, Any]]:
    """(model in eval mode on ``device``, meta) from a :func:`save_checkpoint` file.

    ``expected_z`` (the data's atomic numbers, in order), if given, must equal the checkpoint's:
    checked before the model is built, so a checkpoint of another molecule fails before any work.
    Every failure is a :class:`CheckpointError` (or FileNotFoundError) naming the file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    payload = _read_payload(path)
    if expected_z is not None:
        check_atoms(path, payload["z"], expected_z)
    s = payload["scaling"]
    try:
        model = Potential(payload["z"], payload["config"], s["mean_per_atom"], s["std_per_atom"])
        model.load_state_dict(payload["state_dict"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: the weights do not fit the model its config describes: {reason}") from None
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
    # schnetpack collects the output keys in a set: sorted, the pickled file no longer depends on PYTHONHASHSEED.
    nnp.model_outputs = sorted(nnp.model_outputs)
    # No nnp.to(dtype): that would round the float64 mean offset to float32.
    return nnp.cpu().eval()


def export_schnetpack(model: Potential, path: str | Path) -> None:
    """Write :func:`to_schnetpack` of ``model`` with ``torch.save`` (loadable by ``schnetpack.utils.load_model``)."""
    write_bytes(path, torch_bytes(to_schnetpack(model)))


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
