"""Per-molecule facts: MD17 atom order and the named torsions.

Atom indices are 0-based in the MD17 atom order. A test checks every torsion
against the covalent bond graph of a real frame.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Atomic numbers in MD17 (and rMD17) atom order.
ATOMIC_NUMBERS: dict[str, tuple[int, ...]] = {
    # 0 C (CH2, bonded to O), 1 C (methyl), 2 O, 3-8 H; 8 is the hydroxyl H.
    "ethanol": (6, 6, 8, 1, 1, 1, 1, 1, 1),
    # ring C0 C1 C2 C3 C5 C6; acid C10(=O7)-O9-H13 on C5; ester C6-O12-C11(=O8)-C4H3.
    "aspirin": (6, 6, 6, 6, 6, 6, 6, 8, 8, 8, 6, 6, 8, 1, 1, 1, 1, 1, 1, 1, 1),
}


@dataclass(frozen=True)
class Torsion:
    """A named dihedral; ``atoms`` lists one or more (i, j, k, l) quadruples pooled together."""

    name: str
    label: str
    atoms: tuple[tuple[int, int, int, int], ...]


TORSIONS: dict[str, tuple[Torsion, ...]] = {
    "ethanol": (
        Torsion("hydroxyl", "H–O–C–C (hydroxyl)", ((8, 2, 0, 1),)),
        # The trajectory rotates the methyl rarely, so pool the three symmetric H.
        Torsion("methyl", "H–C–C–O (methyl, 3 H pooled)", ((5, 1, 0, 2), (6, 1, 0, 2), (7, 1, 0, 2))),
    ),
    "aspirin": (
        Torsion("ester", "C(ring)–O–C(=O)–CH3 (ester)", ((6, 12, 11, 4),)),
        Torsion("ring_ester", "C–C–O–C (ring–O rotation)", ((5, 6, 12, 11),)),
        Torsion("carboxyl", "C(ring)–C–C=O (carboxyl)", ((6, 5, 10, 7),)),
        Torsion("acid", "O=C–O–H (acid)", ((7, 10, 9, 13),)),
    ),
}


def check_molecule(name: str) -> str:
    """Return ``name`` if it is a known molecule, else raise naming the known ones."""
    if name not in ATOMIC_NUMBERS:
        raise ValueError(f"unknown molecule {name!r}; known molecules: {', '.join(sorted(ATOMIC_NUMBERS))}")
    return name
