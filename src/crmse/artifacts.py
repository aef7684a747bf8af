"""The contracts between stages: where each artifact lives and how it is read.

One place for every path (:class:`RunPaths`), the split and samples loaders, the valid-frame
definition, the reference pool's bond graph and spurious-state detector, and the resolution of a
temperature setting (``auto`` or K). evaluate, audit, report and the benchmarks use these and build
none of them themselves.

Layout of one run ``<mol>/n<size>/s<seed>`` (``<T>`` = ``T`` + a temperature setting as written in
params.yaml, e.g. ``Tauto``, ``T500``; ``<arm>`` ∈ :data:`ARMS`)::

    data/splits/<run>/{train,val,test,reference}.npz
    models/<run>/<arm>.pt, <arm>_metrics.json, <arm>_log.csv (+ <arm>_val.csv for post-trained arms)
    results/<run>/<T>/<arm>/samples.npz, sample.json
    metrics/<run>/<T>/reference/metrics.json, plots/
    metrics/<run>/<T>/<arm>/metrics.json, replicas.csv, worst_frame.json, plots/, audit.json, audit_frames.csv
    reports/<run>/<T>.ipynb, .html
    timings/<run>/[<T>/]<stage>[_<arm>].json   wall times, throughput, cache use: they vary from run to run,
        so they live apart from every stage's deps (an identical rerun then changes nothing downstream)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crmse.data import Frames
from crmse.io import read_json
from crmse.observables import BondReference, SpuriousDetector, first_unstable_frame, valid_mask

#: The arms in report order: plain MSE, the paper's CRMSE, CRMSE with a hole memory.
ARMS = ("mse", "crmse", "crmse_memory")
#: Arms made by the posttrain stage from the MSE checkpoint.
POSTTRAINED = ("crmse", "crmse_memory")
SAMPLE_KEYS = ("R", "E", "T_kin", "time_ps", "unstable_frame", "z", "temperature")


class ArtifactError(ValueError):
    """A stage's input is missing or does not hold what its producer writes."""


class CheckpointError(ArtifactError):
    """A checkpoint file is unreadable, not a crmse potential, or does not fit the data (crmse.model)."""


def temperature_folder(setting: Any) -> str:
    """``T`` + a temperature setting as written in params.yaml (``Tauto``, ``T500``); dvc.yaml builds the same."""
    return f"T{setting}"


@dataclass(frozen=True)
class RunPaths:
    """Every path of one (molecule, training size, seed) run below ``root``."""

    molecule: str
    size: int
    seed: int
    root: Path = Path(".")

    @property
    def rel(self) -> Path:
        return Path(self.molecule) / f"n{self.size}" / f"s{self.seed}"

    @property
    def split_dir(self) -> Path:
        return Path(self.root) / "data/splits" / self.rel

    def split(self, name: str) -> Path:
        """``train`` | ``val`` | ``test`` | ``reference`` split file."""
        return self.split_dir / f"{name}.npz"

    @property
    def models_dir(self) -> Path:
        return Path(self.root) / "models" / self.rel

    def checkpoint(self, arm: str) -> Path:
        return self.models_dir / f"{arm}.pt"

    def train_metrics(self, arm: str) -> Path:
        return self.models_dir / f"{arm}_metrics.json"

    def timing(self, stage: str, arm: str = "", temperature: Any = None) -> Path:
        """``timings/<run>/[<T>/]<stage>[_<arm>].json``: a stage's wall times (no stage depends on them)."""
        path = Path(self.root) / "timings" / self.rel
        if temperature is not None:
            path = path / temperature_folder(temperature)
        return path / (f"{stage}_{arm}.json" if arm else f"{stage}.json")

    def train_log(self, arm: str) -> Path:
        return self.models_dir / f"{arm}_log.csv"

    def val_log(self, arm: str) -> Path:
        return self.models_dir / f"{arm}_val.csv"

    def samples_dir(self, temperature: Any, arm: str) -> Path:
        return Path(self.root) / "results" / self.rel / temperature_folder(temperature) / arm

    def metrics_dir(self, temperature: Any, arm: str = "") -> Path:
        """``metrics/<run>/<T>/<arm>``; without ``arm`` the folder of every arm at that temperature."""
        path = Path(self.root) / "metrics" / self.rel / temperature_folder(temperature)
        return path / arm if arm else path

    def reference_dir(self, temperature: Any) -> Path:
        return self.metrics_dir(temperature, "reference")

    def report(self, temperature: Any, out: str | os.PathLike = "reports") -> Path:
        """The executed notebook ``reports/<run>/<T>.ipynb`` (the HTML page lies beside it)."""
        return Path(self.root) / out / self.rel / f"{temperature_folder(temperature)}.ipynb"


def load_split(path: str | os.PathLike) -> Frames:
    """A split file written by the split stage (z R E F md17_index) as :class:`Frames`."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"split file not found: {path} (run the split stage first)")
    with np.load(path) as d:
        return Frames(d["z"], d["R"], d["E"].reshape(-1), d["F"], d["md17_index"])


@dataclass
class Samples:
    """A sample stage output: R (T, M, n, 3) Å, E and T_kin (T, M), time_ps (T,), the sampler's
    unstable_frame (M,) (−1 = none), z (n,) and the set temperature (K)."""

    R: np.ndarray
    E: np.ndarray
    T_kin: np.ndarray
    time_ps: np.ndarray
    unstable_frame: np.ndarray
    z: np.ndarray
    temperature: float

    @property
    def n_replicas(self) -> int:
        return int(self.R.shape[1])


def load_samples(path: str | os.PathLike, z: np.ndarray | None = None) -> Samples:
    """Read and check a ``samples.npz`` (and, given ``z``, its atoms); raise :class:`ArtifactError` naming it."""
    path = Path(path)
    if not path.exists():
        raise ArtifactError(f"samples file not found: {path} (run the sample stage for this arm first)")
    with np.load(path) as d:
        missing = [k for k in SAMPLE_KEYS if k not in d]
        if missing:
            raise ArtifactError(f"{path}: missing keys {missing}; expected {list(SAMPLE_KEYS)}")
        s = Samples(
            R=d["R"].astype(np.float64),
            E=d["E"].astype(np.float64),
            T_kin=d["T_kin"].astype(np.float64),
            time_ps=d["time_ps"].astype(np.float64),
            unstable_frame=d["unstable_frame"].astype(np.int64),
            z=d["z"].astype(np.int64),
            temperature=float(d["temperature"]),
        )
    T, M = s.R.shape[:2] if s.R.ndim == 4 else (-1, -1)
    if s.R.ndim != 4 or s.R.shape[2:] != (len(s.z), 3):
        raise ArtifactError(f"{path}: R has shape {s.R.shape}, expected (T, M, {len(s.z)}, 3)")
    for name, arr, shape in (("E", s.E, (T, M)), ("T_kin", s.T_kin, (T, M)), ("time_ps", s.time_ps, (T,))):
        if arr.shape != shape:
            raise ArtifactError(f"{path}: {name} has shape {arr.shape}, expected {shape}")
    if s.unstable_frame.shape != (M,):
        raise ArtifactError(f"{path}: unstable_frame has shape {s.unstable_frame.shape}, expected ({M},)")
    if T < 1 or M < 1:
        raise ArtifactError(f"{path}: no saved frames ({T} frames × {M} replicas)")
    if z is not None and not np.array_equal(s.z, z):
        raise ArtifactError(f"{path}: atoms z={s.z.tolist()} differ from the reference pool's {np.asarray(z).tolist()}")
    return s


def valid_frames(samples: Samples, bonds: BondReference, bond_tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """(first unstable frame per replica (M,), −1 = never; valid-frame mask (T, M)).

    A frame is valid when it lies strictly before its replica's first bond deviation above
    ``bond_tolerance`` Å (re-checked against the reference bonds, the sampler's own record honoured)
    and its energy and positions are finite. Every metric of sampled frames counts valid frames only.
    """
    uf = first_unstable_frame(samples.R, bonds, bond_tolerance, samples.unstable_frame)
    valid = valid_mask(uf, len(samples.time_ps)) & np.isfinite(samples.E) & np.isfinite(samples.R).all((2, 3))
    return uf, valid


@dataclass(frozen=True)
class ReferenceMonitors:
    """The reference pool's bond graph and spurious-state detector, as evaluation uses them."""

    bonds: BondReference
    detector: SpuriousDetector

    @classmethod
    def from_pool(cls, pool: Frames, ev: dict[str, Any]) -> ReferenceMonitors:
        """From the pool frames and the ``evaluate`` params section (bond factor, spurious margins)."""
        bonds = BondReference.from_frames(pool.z, pool.R, ev["bond_factor"])
        detector = SpuriousDetector.from_reference(
            pool.z, pool.R, pool.E, bonds.bonds, ev["spurious_energy_margin"], ev["spurious_distance_margin"]
        )
        return cls(bonds, detector)


def resolve_temperature(setting: Any, paths: RunPaths) -> float:
    """A temperature setting in K; ``auto`` = the pretrain stage's T_conf of the reference pool (T_auto_K)."""
    if str(setting) != "auto":
        return float(setting)
    path = paths.train_metrics("mse")
    if not path.exists():
        raise ArtifactError(f"temperature auto needs {path} (run the pretrain stage)")
    return float(read_json(path)["T_auto_K"])
