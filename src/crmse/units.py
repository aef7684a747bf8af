"""The one place for physical constants and unit conversions.

Internal units: length Å, energy kcal/mol, force kcal/mol/Å, time fs,
mass amu (g/mol), temperature K.
"""

from __future__ import annotations

import numpy as np
from ase.data import atomic_masses, chemical_symbols

#: Boltzmann constant in kcal/mol/K.
KB = 0.0019872041

#: Acceleration of a force of 1 kcal/mol/Å on a mass of 1 amu, in Å/fs².
#: 1 kcal/mol = 4184 J/mol; (4184 J/mol) / (1 g/mol · 1 Å) = 4.184e13 m/s² = 4.184e-4 Å/fs².
ACCEL = 4.184e-4

#: Kinetic energy of 1 amu·Å²/fs² in kcal/mol (= 1 / ACCEL).
KINETIC = 1.0 / ACCEL

#: 1 Hartree in kcal/mol (CODATA 2018), 1 Bohr in Å.
HARTREE = 627.5094740631
BOHR = 0.529177210903


def beta(temperature: float) -> float:
    """Inverse temperature 1/(k_B T) in mol/kcal for T in K."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature} K")
    return 1.0 / (KB * temperature)


def masses(z: np.ndarray) -> np.ndarray:
    """Atomic masses in amu for atomic numbers ``z`` (ASE's table)."""
    return np.asarray(atomic_masses[np.asarray(z, dtype=int)], dtype=float)


def formula(z: np.ndarray) -> str:
    """Hill-order chemical formula, e.g. ``C2H6O``."""
    symbols = [chemical_symbols[int(a)] for a in z]
    counts = {s: symbols.count(s) for s in sorted(set(symbols))}
    order = [s for s in ("C", "H") if s in counts] + [s for s in counts if s not in ("C", "H")]
    return "".join(s + (str(counts[s]) if counts[s] > 1 else "") for s in order)
