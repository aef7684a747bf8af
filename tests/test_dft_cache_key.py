"""Issue 31.1: the audit's DFT cache key holds the level of theory, every SCF setting, the code and the geometry."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

import crmse.audit
from crmse.audit import DFTSettings, frame_key

Z = np.array([8, 1, 1])
R = np.array([[0.0, 0.0, 0.117], [0.0, 0.757, -0.467], [0.0, -0.757, -0.467]])
BASE = DFTSettings(basis="sto-3g", threads=1)


@pytest.fixture
def fresh_code_digest(monkeypatch):
    monkeypatch.setattr(crmse.audit, "_SINGLE_POINT_CODE", None)


def test_every_scf_setting_and_the_level_of_theory_enter_the_key():
    key = frame_key(Z, R, BASE)
    changed = {
        "xc": "lda", "basis": "def2-svp", "max_cycle": 50, "conv_tol": 1e-8, "density_fit": False,
        "grid_level": 4, "soscf_fallback": False,
    }
    assert set(changed) == {f.name for f in dataclasses.fields(DFTSettings)} - {"threads"}
    for name, value in changed.items():
        assert frame_key(Z, R, dataclasses.replace(BASE, **{name: value})) != key, name
    assert frame_key(Z, R, dataclasses.replace(BASE, threads=4)) == key  # threads do not change the numbers
    fields = BASE.key_fields()
    assert {"method": "RKS", "charge": 0, "spin": 0}.items() <= fields.items()
    assert fields["pyscf"] and len(fields["code"]) == 64


def test_the_geometry_bytes_enter_the_key():
    key = frame_key(Z, R, BASE)
    assert frame_key(Z, R + 2e-6, BASE) != key  # beyond the 1e-6 Å rounding
    assert frame_key(Z, R + 2e-8, BASE) == key  # float32 noise of sampled positions
    assert frame_key(np.array([8, 1, 9]), R, BASE) != key


def test_the_pyscf_version_enters_the_key(monkeypatch):
    import pyscf

    key = frame_key(Z, R, BASE)
    monkeypatch.setattr(pyscf, "__version__", "0.0.0")
    assert frame_key(Z, R, BASE) != key


def test_the_single_point_code_enters_the_key_but_not_its_comments(tmp_path, monkeypatch, fresh_code_digest):
    source = Path(crmse.audit.__file__).read_text()
    key = frame_key(Z, R, BASE)

    def key_with(text: str) -> str:
        copy = tmp_path / f"audit_{len(list(tmp_path.iterdir()))}.py"
        copy.write_text(text)
        monkeypatch.setattr(crmse.audit, "__file__", str(copy))
        monkeypatch.setattr(crmse.audit, "_SINGLE_POINT_CODE", None)
        return frame_key(Z, R, BASE)

    line = "    mf.grids.level = settings.grid_level\n"
    assert source.count(line) == 1
    assert key_with(source.replace(line, "    # a new comment\n" + line)) == key
    assert key_with(source.replace(line, "    mf.grids.level = settings.grid_level + 1\n")) != key
    assert key_with(source.replace('unit="Angstrom"', 'unit="Bohr"')) != key


def test_a_monkeypatched_single_point_does_not_change_the_key(monkeypatch, fresh_code_digest):
    key = frame_key(Z, R, BASE)
    monkeypatch.setattr(crmse.audit, "dft_single_point", lambda z, R, s: None)
    monkeypatch.setattr(crmse.audit, "_SINGLE_POINT_CODE", None)
    assert frame_key(Z, R, BASE) == key
