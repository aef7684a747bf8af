"""MD17 frames: reading, validating and splitting.

Both key layouts are accepted: sGDML/MD17 (``z R E F`` [+ ``md17_index``]) and
rMD17 (``nuclear_charges coords energies forces old_indices`` ...). Internally a
molecule's frames are a :class:`Frames` with ``E`` of shape (N,).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crmse.io import write_npz
from crmse.molecules import ATOMIC_NUMBERS, check_molecule
from crmse.units import HARTREE, formula

# Free-atom PBE energies (Hartree) used only to check that energies are in kcal/mol.
_ATOM_ENERGY_HA = {1: -0.50, 6: -37.80, 7: -54.55, 8: -75.00}


class DataError(ValueError):
    """A data file is corrupt, truncated, of the wrong molecule or in the wrong units."""


@dataclass
class Frames:
    """Frames of one molecule. Units: R Å, E kcal/mol (N,), F kcal/mol/Å."""

    z: np.ndarray
    R: np.ndarray
    E: np.ndarray
    F: np.ndarray
    md17_index: np.ndarray

    def __len__(self) -> int:
        return len(self.R)

    @property
    def n_atoms(self) -> int:
        return len(self.z)

    def subset(self, idx: np.ndarray) -> Frames:
        idx = np.asarray(idx)
        return Frames(self.z, self.R[idx], self.E[idx], self.F[idx], self.md17_index[idx])

    def save(self, path: str | Path) -> None:
        write_npz(path, z=self.z, R=self.R, E=self.E, F=self.F, md17_index=self.md17_index)


_LAYOUTS: dict[str, dict[str, str]] = {
    "md17": {"z": "z", "R": "R", "E": "E", "F": "F", "md17_index": "md17_index"},
    "rmd17": {"z": "nuclear_charges", "R": "coords", "E": "energies", "F": "forces", "md17_index": "old_indices"},
}


def _open_npz(path: Path, name: str) -> Any:
    """``np.load`` of an npz, or a :class:`DataError` naming ``name`` that says what the file is instead."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head.lstrip().lower().startswith((b"<!doctype", b"<html", b"<?xml", b"<head")):
        raise DataError(f"{name}: this is an HTML/XML page, not an npz file (the server sent an error page?)")
    # An npz is a zip archive (np.load would try any other file as a pickle and call it "pickled data").
    if not head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        if not head:
            what = "an empty file"
        elif _looks_like_text(head):
            what = f"a text file (it starts {head[:40].decode('utf-8', 'replace')!r})"
        elif head.startswith(b"\x93NUMPY"):
            what = "a single .npy array"
        else:
            what = f"not a zip archive (it starts with {head[:8]!r})"
        raise DataError(f"{name}: not an npz file: {what}; a wrong, truncated or corrupt download?")
    try:
        return np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{name}: not a readable npz file (truncated or corrupt download?): {exc}") from None


def _looks_like_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\r\n\t" for c in text)


def load_frames(path: str | Path, molecule: str, variant: str = "md17", name: str | None = None) -> Frames:
    """Read and validate an MD17-style npz of ``molecule``; raise :class:`DataError` on any problem.

    ``variant='rmd17'`` selects the rMD17 PBE/def2-SVP labels of an rMD17-layout file.
    A file already in the sGDML layout is read as is whatever the variant. Errors name the file
    as ``name`` (e.g. the URL a temporary download came from), by default its path.
    """
    check_molecule(molecule)
    path = Path(path)
    name = str(path) if name is None else name
    if not path.exists():
        raise DataError(f"{name}: file not found")
    npz = _open_npz(path, name)
    try:
        files = set(npz.files)
    except Exception as exc:  # noqa: BLE001 - zip directory unreadable
        raise DataError(f"{name}: not a readable npz file: {exc}") from None
    layout = _LAYOUTS["md17"] if {"z", "R", "E", "F"} <= files else _LAYOUTS["rmd17"]
    if layout is _LAYOUTS["rmd17"] and variant == "md17" and "old_energies" in files:
        # rMD17 file but MD17 labels wanted: the file carries them as old_*.
        layout = dict(layout, E="old_energies", F="old_forces")
    missing = [v for k, v in layout.items() if k != "md17_index" and v not in files]
    if missing:
        raise DataError(
            f"{name}: missing keys {missing}; expected sGDML keys z, R, E, F or rMD17 keys "
            f"nuclear_charges, coords, energies, forces (found {sorted(files)})"
        )
    try:
        arrays = {k: npz[v] for k, v in layout.items() if v in files}
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{name}: an array could not be read (truncated or corrupt file?): {exc}") from None
    if "md17_index" not in arrays:
        arrays["md17_index"] = np.arange(len(arrays["R"]))
    return validate_frames(arrays, molecule, source=name)


def validate_frames(arrays: dict[str, np.ndarray], molecule: str, source: str = "data") -> Frames:
    """Check shapes, atoms, finiteness and units of raw arrays and return :class:`Frames`."""
    z = np.asarray(arrays["z"]).astype(np.int64)
    R = np.asarray(arrays["R"], dtype=np.float64)
    E = np.asarray(arrays["E"], dtype=np.float64)
    F = np.asarray(arrays["F"], dtype=np.float64)
    idx = np.asarray(arrays["md17_index"]).astype(np.int64)
    if z.ndim != 1:
        raise DataError(f"{source}: z must have shape (n_atoms,), got {z.shape}")
    n = len(z)
    if R.ndim != 3 or R.shape[1:] != (n, 3):
        raise DataError(f"{source}: R must have shape (n_frames, {n}, 3), got {R.shape}")
    N = len(R)
    if N == 0:
        raise DataError(f"{source}: no frames")
    if E.shape not in ((N,), (N, 1)):
        raise DataError(f"{source}: E must have shape ({N},) or ({N}, 1), got {E.shape}")
    E = E.reshape(N)
    if F.shape != R.shape:
        raise DataError(f"{source}: F must have the shape of R {R.shape}, got {F.shape}")
    if idx.shape != (N,):
        raise DataError(f"{source}: md17_index must have shape ({N},), got {idx.shape}")
    expected = np.array(ATOMIC_NUMBERS[molecule])
    if len(z) != len(expected) or not np.array_equal(z, expected):
        raise DataError(
            f"{source}: atomic numbers {formula(z)} {z.tolist()} do not match {molecule} "
            f"({formula(expected)} {expected.tolist()}): wrong molecule?"
        )
    for name, arr in (("R", R), ("E", E), ("F", F)):
        bad = ~np.isfinite(arr)
        if bad.any():
            frames = np.unique(np.nonzero(bad)[0])
            raise DataError(
                f"{source}: {name} has non-finite values in {len(frames)} frame(s), first at frame {frames[0]}"
            )
    # Units: total energies must be near the sum of free-atom energies in kcal/mol
    # (eV, Hartree or kJ/mol are off by factors of 23, 627 or 4.2).
    atoms = sum(_ATOM_ENERGY_HA.get(int(a), -0.5 * int(a) ** 2) for a in z) * HARTREE
    ratio = float(E.mean()) / atoms
    if not 0.97 < ratio < 1.03:
        raise DataError(
            f"{source}: mean energy {E.mean():.1f} is not within 3% of the free-atom sum "
            f"{atoms:.0f} kcal/mol (ratio {ratio:.3f}); energies must be in kcal/mol"
        )
    f_rms = float(np.sqrt(np.mean(F**2)))
    if not 1.0 < f_rms < 500.0:
        raise DataError(f"{source}: RMS force {f_rms:.3g} is outside 1–500; forces must be in kcal/mol/Å")
    order = np.argsort(idx, kind="stable")
    return Frames(z, R[order], E[order], F[order], idx[order])


def make_split(
    n_frames: int, n_train: int, n_val: int, n_test: int, seed: int
) -> dict[str, np.ndarray]:
    """Seeded disjoint indices (into frames sorted by md17_index).

    One permutation per seed: val and test come first, train after them, so for a
    given seed every training size shares the same val/test sets and smaller
    training sets are nested in larger ones. The reference pool is every frame
    not in train or val (it contains the test frames), sorted in MD17 order.
    """
    if n_train + n_val + n_test > n_frames:
        raise ValueError(f"n_train + n_val + n_test = {n_train + n_val + n_test} exceeds the {n_frames} frames")
    perm = np.random.default_rng(seed).permutation(n_frames)
    val = np.sort(perm[:n_val])
    test = np.sort(perm[n_val : n_val + n_test])
    train = np.sort(perm[n_val + n_test : n_val + n_test + n_train])
    reference = np.setdiff1d(np.arange(n_frames), np.concatenate([train, val]))
    return {"train": train, "val": val, "test": test, "reference": reference}


def stride_to(indices: np.ndarray, max_count: int) -> np.ndarray:
    """Evenly strided subset of at most ``max_count`` of ``indices`` (keeps MD order)."""
    if len(indices) <= max_count:
        return indices
    return indices[np.linspace(0, len(indices) - 1, max_count).round().astype(int)]
