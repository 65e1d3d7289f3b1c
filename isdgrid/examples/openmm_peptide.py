"""Alanine dipeptide (Ace-Ala-Nme) for OpenMM, built from internal coordinates.

Nothing is read from disk: :func:`build_dipeptide` places the 22 atoms from standard bond
lengths, angles and the backbone dihedrals ``phi`` and ``psi`` (the natural extension
reference frame, "NeRF"), with the L chirality at the alpha carbon, and makes the OpenMM
``Topology`` with its bonds. :func:`make_system` parametrizes it with a force field that
ships with OpenMM (Amber99SB-ILDN, in vacuum or with the OBC implicit solvent) and returns the
``System`` as XML, the form that travels to the hosts (an OpenMM object cannot be pickled).

:func:`backbone_basin` names the Ramachandran region of a ``(phi, psi)`` pair, for the
populations the tempering demo reports at its lowest temperature.

Needs ``openmm`` (``pip install 'isdgrid[openmm]'``); it is imported inside the functions
that use it, so this module imports without it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BASINS",
    "PHI_ATOMS",
    "PSI_ATOMS",
    "SOLVENTS",
    "Peptide",
    "backbone_basin",
    "build_dipeptide",
    "dihedral",
    "make_system",
    "minimize",
]

Vec = tuple[float, float, float]

# (residue, atom, element, (i, j, k) atoms already placed, bond to k in Angstrom,
#  angle j-k-new in degrees, dihedral i-j-k-new in degrees, or the names "phi"/"psi").
# The first three atoms are placed by hand; every row after refers to earlier rows.
_ATOMS: tuple[tuple[str, str, str, tuple[int, int, int], float, float, float | str], ...] = (
    ("ACE", "CH3", "C", (-1, -1, -1), 0.0, 0.0, 0.0),  # 0
    ("ACE", "C", "C", (-1, -1, 0), 1.52, 0.0, 0.0),  # 1
    ("ALA", "N", "N", (-1, 0, 1), 1.33, 116.0, 0.0),  # 2
    ("ALA", "CA", "C", (0, 1, 2), 1.46, 122.0, 180.0),  # 3: omega = 180 (trans)
    ("ALA", "C", "C", (1, 2, 3), 1.52, 111.0, "phi"),  # 4
    ("NME", "N", "N", (2, 3, 4), 1.33, 116.0, "psi"),  # 5
    ("NME", "C", "C", (3, 4, 5), 1.46, 122.0, 180.0),  # 6
    ("ACE", "O", "O", (3, 2, 1), 1.23, 121.0, 0.0),  # 7
    ("ALA", "H", "H", (7, 1, 2), 1.01, 119.0, 180.0),  # 8
    ("ALA", "O", "O", (6, 5, 4), 1.23, 121.0, 0.0),  # 9
    ("NME", "H", "H", (9, 4, 5), 1.01, 119.0, 180.0),  # 10
    ("ALA", "CB", "C", (2, 4, 3), 1.53, 109.5, 122.7),  # 11: L chirality
    ("ALA", "HA", "H", (2, 4, 3), 1.09, 109.5, -118.0),  # 12
    ("ACE", "H1", "H", (2, 1, 0), 1.09, 109.5, 0.0),  # 13
    ("ACE", "H2", "H", (2, 1, 0), 1.09, 109.5, 120.0),  # 14
    ("ACE", "H3", "H", (2, 1, 0), 1.09, 109.5, 240.0),  # 15
    ("ALA", "HB1", "H", (2, 3, 11), 1.09, 109.5, 60.0),  # 16
    ("ALA", "HB2", "H", (2, 3, 11), 1.09, 109.5, 180.0),  # 17
    ("ALA", "HB3", "H", (2, 3, 11), 1.09, 109.5, 300.0),  # 18
    ("NME", "H1", "H", (4, 5, 6), 1.09, 109.5, 60.0),  # 19
    ("NME", "H2", "H", (4, 5, 6), 1.09, 109.5, 180.0),  # 20
    ("NME", "H3", "H", (4, 5, 6), 1.09, 109.5, 300.0),  # 21
)
_BONDS = (
    (0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (1, 7), (2, 8), (4, 9), (5, 10), (3, 11), (3, 12),
    (0, 13), (0, 14), (0, 15), (11, 16), (11, 17), (11, 18), (6, 19), (6, 20), (6, 21),
)  # fmt: skip
_RESIDUES = ("ACE", "ALA", "NME")
# The topology lists the atoms residue by residue (as OpenMM and PDB files want): the
# position of each row of _ATOMS there.
_ORDER = sorted(range(len(_ATOMS)), key=lambda row: _RESIDUES.index(_ATOMS[row][0]))
_INDEX = {row: i for i, row in enumerate(_ORDER)}

#: Atom indices of the backbone dihedrals: phi = C(Ace)-N-CA-C, psi = N-CA-C-N(Nme).
PHI_ATOMS = tuple(_INDEX[row] for row in (1, 2, 3, 4))
PSI_ATOMS = tuple(_INDEX[row] for row in (2, 3, 4, 5))

#: Force field files (shipped with OpenMM) per solvent model.
SOLVENTS = {"obc": ("amber99sbildn.xml", "amber99_obc.xml"), "vacuum": ("amber99sbildn.xml",)}

#: Ramachandran regions reported by the demo, in the order of :func:`backbone_basin`'s tests.
BASINS = ("alpha_R", "beta", "PPII", "alpha_L/C7ax", "other")


def _place(a: Vec, b: Vec, c: Vec, bond: float, angle: float, torsion: float) -> Vec:
    """The point at ``bond`` from ``c``, angle ``b-c-new``, dihedral ``a-b-c-new`` (degrees)."""
    bc = _unit(_sub(c, b))
    n = _unit(_cross(_sub(b, a), bc))
    m = _cross(n, bc)
    th, ph = math.radians(angle), math.radians(torsion)
    x, y, z = -bond * math.cos(th), bond * math.sin(th) * math.cos(ph), bond * math.sin(th) * math.sin(ph)
    return (
        c[0] + x * bc[0] + y * m[0] + z * n[0],
        c[1] + x * bc[1] + y * m[1] + z * n[1],
        c[2] + x * bc[2] + y * m[2] + z * n[2],
    )


def _sub(a: Vec, b: Vec) -> Vec:
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


def _dot(a: Vec, b: Vec) -> float:
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _cross(a: Vec, b: Vec) -> Vec:
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _unit(a: Vec) -> Vec:
    norm = math.sqrt(_dot(a, a))
    return (a[0] / norm, a[1] / norm, a[2] / norm)


def dihedral(p0: Sequence[float], p1: Sequence[float], p2: Sequence[float], p3: Sequence[float]) -> float:
    """The dihedral angle ``p0-p1-p2-p3`` in degrees, in (-180, 180] (IUPAC sign)."""
    a, b, c, d = (tuple(map(float, p)) for p in (p0, p1, p2, p3))
    b0, b1, b2 = _sub(a, b), _unit(_sub(c, b)), _sub(d, c)  # type: ignore[arg-type]
    v = _sub(b0, tuple(_dot(b0, b1) * x for x in b1))  # type: ignore[arg-type]
    w = _sub(b2, tuple(_dot(b2, b1) * x for x in b1))  # type: ignore[arg-type]
    return math.degrees(math.atan2(_dot(_cross(b1, v), w), _dot(v, w)))


def backbone_basin(phi: float, psi: float) -> str:
    """The Ramachandran region of ``(phi, psi)`` (degrees), one of :data:`BASINS`.

    alpha_R: phi < 0 and -120 <= psi < 50; of the rest with phi < 0, beta (the extended
    region, C5 included) for phi < -90, PPII (the polyproline II region) for -90 <= phi
    and psi >= 50; alpha_L/C7ax: phi >= 0 (in vacuum the C7ax minimum is there).
    """
    if phi >= 0.0:
        return "alpha_L/C7ax"
    if -120.0 <= psi < 50.0:
        return "alpha_R"
    if phi < -90.0:
        return "beta"
    if psi >= 50.0:
        return "PPII"
    return "other"


@dataclass(frozen=True)
class Peptide:
    """A built structure: OpenMM ``Topology`` and positions (nm), as plain tuples."""

    topology: Any  # openmm.app.Topology
    positions: tuple[Vec, ...]

    def to_pdb(self) -> str:
        """The structure as PDB text (OpenMM's writer)."""
        import io

        from openmm import app, unit

        out = io.StringIO()
        app.PDBFile.writeFile(self.topology, unit.Quantity([list(p) for p in self.positions], unit.nanometer), out)
        return out.getvalue()


def build_dipeptide(phi: float = -150.0, psi: float = 150.0) -> Peptide:
    """Ace-Ala-Nme with backbone dihedrals ``phi``, ``psi`` (degrees); positions in nm."""
    from openmm import app

    angstrom: list[Vec] = [(0.0, 0.0, 0.0), (1.52, 0.0, 0.0)]
    for _res, _name, _element, (i, j, k), bond, angle, torsion in _ATOMS[2:]:
        value = phi if torsion == "phi" else psi if torsion == "psi" else float(torsion)
        if i < 0:  # the third atom: in the xy plane
            a = (angstrom[k][0], 1.0, 0.0)
            angstrom.append(_place(a, angstrom[j], angstrom[k], bond, angle, 180.0))
        else:
            angstrom.append(_place(angstrom[i], angstrom[j], angstrom[k], bond, angle, value))
    topology = app.Topology()
    chain = topology.addChain()
    residues = {name: topology.addResidue(name, chain) for name in _RESIDUES}
    atoms: dict[int, Any] = {}
    for row in _ORDER:
        res, name, element, *_ = _ATOMS[row]
        atoms[row] = topology.addAtom(name, app.Element.getBySymbol(element), residues[res])
    for first, second in _BONDS:
        topology.addBond(atoms[first], atoms[second])
    return Peptide(topology, tuple((x / 10.0, y / 10.0, z / 10.0) for x, y, z in (angstrom[r] for r in _ORDER)))


def make_system(peptide: Peptide, solvent: str = "obc") -> str:
    """The OpenMM ``System`` of ``peptide`` as XML: Amber99SB-ILDN, no cutoff, bonds to H constrained.

    ``solvent``: ``"obc"`` (the OBC generalized Born implicit solvent, ``amber99_obc.xml``,
    a native ``GBSAOBCForce``) or ``"vacuum"``. Both force field files ship with OpenMM.
    """
    from openmm import XmlSerializer, app

    if solvent not in SOLVENTS:
        raise ValueError(f"unknown solvent {solvent!r}; choose one of: {', '.join(SOLVENTS)}")
    forcefield = app.ForceField(*SOLVENTS[solvent])
    system = forcefield.createSystem(peptide.topology, nonbondedMethod=app.NoCutoff, constraints=app.HBonds)
    return str(XmlSerializer.serialize(system))


def minimize(system_xml: str, positions: Sequence[Vec], tolerance: float = 1.0) -> tuple[Vec, ...]:
    """Positions (nm) after a local energy minimization (Reference platform; ``tolerance`` in kJ/mol/nm)."""
    import openmm
    from openmm import unit

    system = openmm.XmlSerializer.deserialize(system_xml)
    context = openmm.Context(
        system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference")
    )
    context.setPositions(unit.Quantity([list(p) for p in positions], unit.nanometer))
    openmm.LocalEnergyMinimizer.minimize(context, tolerance, 1000)
    done = context.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
    return tuple((float(x), float(y), float(z)) for x, y, z in done)
