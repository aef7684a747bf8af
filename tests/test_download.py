"""Download stage: loopback HTTP server only, never the network."""

from __future__ import annotations

import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from synthetic import synthetic_arrays, write_synthetic_npz

import crmse.download
from crmse.data import DataError, load_frames
from crmse.download import (
    MIRROR_ENV,
    PINNED_SHA256,
    UNPINNED_ENV,
    DownloadError,
    IntegrityError,
    download,
    file_name,
    sources,
)
from crmse.molecules import ATOMIC_NUMBERS


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict[str, tuple[int, bytes, dict]] = {}
    hits: list[str] = []

    def do_GET(self):  # noqa: N802 - http.server API
        self.hits.append(self.path)
        status, body, headers = self.routes.get(self.path, (404, b"not found", {}))
        self.send_response(status)
        for k, v in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    _Handler.routes, _Handler.hits = {}, []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler
    httpd.shutdown()
    httpd.server_close()


def _npz_bytes(tmp_path: Path, **override) -> bytes:
    return write_synthetic_npz(tmp_path / "src" / "f.npz", **override).read_bytes()


def _run(tmp_path: Path, base: str, env: dict | None = None, pinned: bool = False, **kw):
    """Download into tmp_path; synthetic files are not pinned, so accept them unless ``pinned`` (the pin tests)."""
    out = tmp_path / "data" / "raw"
    env = {**({} if pinned else {UNPINNED_ENV: "1"}), **(env or {})}
    return download("ethanol", out / "ethanol.npz", out / "ethanol.json", url=base, env=env, backoff=0.01, **kw)


def _outputs(tmp_path: Path) -> list[Path]:
    raw = tmp_path / "data" / "raw"
    return sorted(raw.iterdir()) if raw.exists() else []


def test_successful_download_writes_validated_file_and_metadata(tmp_path, server):
    base, handler = server
    body = _npz_bytes(tmp_path)
    handler.routes["/md17_ethanol.npz"] = (200, body, {})
    meta = _run(tmp_path, base)
    assert meta["frames"] == 120 and meta["n_atoms"] == 9
    assert meta["source"] == f"{base}/md17_ethanol.npz"
    assert (tmp_path / "data/raw/ethanol.npz").read_bytes() == body
    frames = load_frames(tmp_path / "data/raw/ethanol.npz", "ethanol")
    assert frames.E.shape == (120,)
    assert [p.name for p in _outputs(tmp_path)] == ["ethanol.json", "ethanol.npz"]


def test_mirror_folder_is_tried_before_upstream(tmp_path, server):
    base, handler = server
    mirror = tmp_path / "mirror"
    write_synthetic_npz(mirror / "md17_ethanol.npz")
    meta = _run(tmp_path, base, env={MIRROR_ENV: str(mirror)})
    assert meta["source"] == f"${MIRROR_ENV}/md17_ethanol.npz"
    assert handler.hits == []  # upstream never asked


def test_the_metadata_does_not_depend_on_how_the_mirror_path_is_spelt(tmp_path, server, monkeypatch):
    # A path in data/raw/<molecule>.json made the published download stage look modified on every machine
    # whose mirror path was spelt differently.
    base, _ = server
    write_synthetic_npz(tmp_path / "mirror" / "md17_ethanol.npz")
    monkeypatch.chdir(tmp_path)
    written = []
    for spelling in (str(tmp_path / "mirror"), "mirror", "./mirror/"):
        _run(tmp_path, base, env={MIRROR_ENV: spelling})
        written.append((tmp_path / "data/raw/ethanol.json").read_bytes())
    assert written[0] == written[1] == written[2]


def test_missing_mirror_file_falls_back_to_upstream(tmp_path, server):
    base, handler = server
    handler.routes["/md17_ethanol.npz"] = (200, _npz_bytes(tmp_path), {})
    meta = _run(tmp_path, base, env={MIRROR_ENV: str(tmp_path / "empty_mirror")})
    assert meta["source"].startswith(base)


def test_sources_order():
    assert sources("http://up", {MIRROR_ENV: "/m"}) == ["/m", "http://up"]
    assert sources("http://up", {}) == ["http://up"]


def test_truncated_body_is_rejected_and_leaves_nothing(tmp_path, server):
    base, handler = server
    body = _npz_bytes(tmp_path)
    # Claim the full length but send half: the client sees a short read.
    handler.routes["/md17_ethanol.npz"] = (200, body[: len(body) // 2], {})
    with pytest.raises(DataError, match="truncated|corrupt"):
        _run(tmp_path, base)
    assert _outputs(tmp_path) == []


def test_content_length_mismatch_is_truncation(tmp_path, server):
    base, handler = server
    body = _npz_bytes(tmp_path)
    handler.routes["/md17_ethanol.npz"] = (200, body[:1000], {"Content-Length": str(len(body))})
    with pytest.raises((DataError, DownloadError)):
        _run(tmp_path, base, retries=0)
    assert _outputs(tmp_path) == []


def test_html_error_page_is_rejected(tmp_path, server):
    base, handler = server
    handler.routes["/md17_ethanol.npz"] = (200, b"<!DOCTYPE html><html><body>Service unavailable</body></html>", {})
    with pytest.raises(DataError, match="HTML"):
        _run(tmp_path, base)
    assert _outputs(tmp_path) == []


def test_http_404_everywhere_names_every_source(tmp_path, server):
    base, _ = server
    with pytest.raises(DownloadError, match="404"):
        _run(tmp_path, base)
    assert _outputs(tmp_path) == []


def test_connection_refused_is_retried_then_reported(tmp_path):
    with pytest.raises(DownloadError, match=r"attempt 3"):
        _run(tmp_path, "http://127.0.0.1:9", retries=2, timeout=2)
    assert _outputs(tmp_path) == []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"R": np.zeros((120, 8, 3))}, "R must have shape"),
        ({"F": np.zeros((120, 9, 2))}, "F must have the shape"),
        ({"E": np.zeros((119, 1))}, "E must have shape"),
        ({"z": np.array([6, 6, 8, 1, 1, 1, 1, 1, 7], dtype=np.uint8)}, "wrong molecule"),
    ],
)
def test_wrong_shapes_and_atoms_are_rejected(tmp_path, server, override, message):
    base, handler = server
    handler.routes["/md17_ethanol.npz"] = (200, _npz_bytes(tmp_path, **override), {})
    with pytest.raises(DataError, match=message):
        _run(tmp_path, base)
    assert _outputs(tmp_path) == []


def test_nan_energies_are_rejected(tmp_path, server):
    base, handler = server
    arrays = synthetic_arrays()
    E = arrays["E"].copy()
    E[17] = np.nan
    handler.routes["/md17_ethanol.npz"] = (200, _npz_bytes(tmp_path, E=E), {})
    with pytest.raises(DataError, match="E has non-finite values .* frame 17"):
        _run(tmp_path, base)
    assert _outputs(tmp_path) == []


@pytest.mark.parametrize(("scale", "what"), [(1 / 23.06, "energ"), (1 / 627.5, "energ")])
def test_wrong_energy_units_are_rejected(tmp_path, server, scale, what):
    base, handler = server
    arrays = synthetic_arrays()
    handler.routes["/md17_ethanol.npz"] = (200, _npz_bytes(tmp_path, E=arrays["E"] * scale), {})
    with pytest.raises(DataError, match=what):
        _run(tmp_path, base)


def test_existing_output_survives_a_failed_download(tmp_path, server):
    base, handler = server
    good = tmp_path / "data/raw/ethanol.npz"
    write_synthetic_npz(good)
    before = good.read_bytes()
    handler.routes["/md17_ethanol.npz"] = (200, b"garbage" * 100, {})
    with pytest.raises(DataError):
        _run(tmp_path, base)
    assert good.read_bytes() == before


def test_rmd17_layout_is_accepted(tmp_path):
    a = synthetic_arrays()
    path = tmp_path / "rmd17_ethanol.npz"
    np.savez(
        path,
        nuclear_charges=a["z"],
        coords=a["R"],
        energies=a["E"][:, 0] + 120.0,
        forces=a["F"],
        old_indices=a["md17_index"][::-1].copy(),
        old_energies=a["E"][:, 0],
        old_forces=a["F"],
    )
    rmd = load_frames(path, "ethanol", "rmd17")
    md = load_frames(path, "ethanol", "md17")
    np.testing.assert_allclose(rmd.E - md.E, 120.0)
    assert np.all(np.diff(rmd.md17_index) > 0)  # sorted into MD order


def test_unknown_molecule(tmp_path):
    shutil.copy(write_synthetic_npz(tmp_path / "x.npz"), tmp_path / "y.npz")
    with pytest.raises(ValueError, match="unknown molecule 'benzol'.*aspirin, ethanol"):
        load_frames(tmp_path / "y.npz", "benzol")


# -- issue 31.7 / 31.8: integrity (pinned sha256, size cap, schemes) and messages that name the source ------------


@pytest.fixture
def pin(monkeypatch):
    """Inject a pinned-hash table (the real one pins the project's mirror files, which tests never read)."""

    def _pin(table: dict[str, dict[str, str]]) -> None:
        monkeypatch.setattr(crmse.download, "PINNED_SHA256", table)

    return _pin


def test_a_pinned_file_is_accepted_and_recorded(tmp_path, server, pin):
    base, handler = server
    body = _npz_bytes(tmp_path)
    handler.routes["/md17_ethanol.npz"] = (200, body, {})
    pin({"md17_ethanol.npz": {hashlib.sha256(body).hexdigest(): "test file"}})
    meta = _run(tmp_path, base, pinned=True)
    assert meta["sha256_pinned"] and meta["pinned_as"] == "test file"
    assert (tmp_path / "data/raw/ethanol.npz").read_bytes() == body


def test_a_file_that_is_not_the_pinned_one_is_refused_and_leaves_nothing(tmp_path, server, pin):
    base, handler = server
    good = tmp_path / "data/raw/ethanol.npz"
    write_synthetic_npz(good, seed=1)
    before = good.read_bytes()
    body = _npz_bytes(tmp_path)  # valid data, but not the pinned file
    handler.routes["/md17_ethanol.npz"] = (200, body, {})
    pin({"md17_ethanol.npz": {"0" * 64: "the real file"}})
    with pytest.raises(IntegrityError, match=rf"{base}/md17_ethanol.npz: sha256 {hashlib.sha256(body).hexdigest()} is "
                       rf"not the pinned sha256 of md17_ethanol.npz \(0{{64}}\).*refused.*{UNPINNED_ENV}=1"):
        _run(tmp_path, base, pinned=True)
    assert good.read_bytes() == before and sorted(p.name for p in _outputs(tmp_path)) == ["ethanol.npz"]
    # Your own file needs the explicit opt-in, and is recorded as unpinned.
    meta = _run(tmp_path, base, pinned=True, env={UNPINNED_ENV: "1"})
    assert not meta["sha256_pinned"] and meta["sha256"] == hashlib.sha256(body).hexdigest()


def test_an_unpinned_mirror_file_is_refused_too(tmp_path, server, pin):
    base, handler = server
    mirror = tmp_path / "mirror"
    write_synthetic_npz(mirror / "md17_ethanol.npz")
    pin({"md17_ethanol.npz": {"1" * 64: "the real file"}})
    with pytest.raises(IntegrityError, match=rf"{mirror}/md17_ethanol.npz: sha256"):
        _run(tmp_path, base, pinned=True, env={MIRROR_ENV: str(mirror)})
    assert _outputs(tmp_path) == [] and handler.hits == []


def test_every_project_file_has_a_pinned_sha256():
    for molecule in ATOMIC_NUMBERS:
        for variant in ("md17", "rmd17"):
            table = PINNED_SHA256[file_name(molecule, variant)]
            assert table and all(len(h) == 64 and int(h, 16) >= 0 for h in table)


@pytest.mark.parametrize("announce", [True, False])
def test_a_download_larger_than_the_cap_is_refused(tmp_path, server, announce):
    base, handler = server
    body = _npz_bytes(tmp_path)
    # With a Content-Length the refusal comes before reading; without, once the cap is passed.
    handler.routes["/md17_ethanol.npz"] = (200, body, {} if announce else {"Content-Length": ""})
    with pytest.raises(IntegrityError, match="cap"):
        _run(tmp_path, base, max_bytes=len(body) // 3)
    assert _outputs(tmp_path) == []


def test_a_mirror_file_larger_than_the_cap_is_refused(tmp_path, server):
    base, _ = server
    mirror = tmp_path / "mirror"
    path = write_synthetic_npz(mirror / "md17_ethanol.npz")
    with pytest.raises(IntegrityError, match="cap"):
        _run(tmp_path, base, env={MIRROR_ENV: str(mirror)}, max_bytes=path.stat().st_size - 1)


def test_only_http_https_file_and_folders_are_sources(tmp_path):
    for bad in ("ftp://example.org/npz", "s3://bucket/npz", "gopher://x"):
        with pytest.raises(ValueError, match="not accepted"):
            sources(bad, {})
        with pytest.raises(ValueError, match="not accepted"):
            sources("http://up", {MIRROR_ENV: bad})
    assert sources("https://up", {MIRROR_ENV: "/m"}) == ["/m", "https://up"]
    # file:// works (and is verified like any other source).
    folder = tmp_path / "files"
    write_synthetic_npz(folder / "md17_ethanol.npz")
    meta = _run(tmp_path, folder.as_uri())
    assert meta["source"] == f"{folder.as_uri()}/md17_ethanol.npz" and meta["frames"] == 120


def test_data_errors_name_the_source_not_the_temporary_file(tmp_path, server):
    base, handler = server
    handler.routes["/md17_ethanol.npz"] = (200, _npz_bytes(tmp_path, R=np.zeros((120, 8, 3))), {})
    with pytest.raises(DataError) as err:
        _run(tmp_path, base)
    assert str(err.value).startswith(f"{base}/md17_ethanol.npz: R must have shape") and ".part" not in str(err.value)
    handler.routes["/md17_ethanol.npz"] = (200, b"PK\x03\x04" + b"\x00" * 200, {})
    with pytest.raises(DataError) as err:
        _run(tmp_path, base)
    assert str(err.value).startswith(f"{base}/md17_ethanol.npz: ") and ".part" not in str(err.value)


def test_a_text_file_is_called_a_text_file(tmp_path, server):
    base, handler = server
    handler.routes["/md17_ethanol.npz"] = (200, b"z R E F\n1.0 2.0 3.0\n" * 10, {})
    with pytest.raises(DataError, match="a text file") as err:
        _run(tmp_path, base)
    assert "pickle" not in str(err.value)
    text = tmp_path / "notes.npz"
    text.write_text("frames: 120\natoms: 9\n")
    with pytest.raises(DataError, match=rf"{text}: not an npz file: a text file") as err:
        load_frames(text, "ethanol")
    assert "pickle" not in str(err.value)
