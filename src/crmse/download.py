"""Fetch an MD17 npz from an ordered list of sources, verify and validate it, then rename into place.

A source is a local folder or a base URL (http, https or file only) holding the
upstream file names. Network errors are retried with backoff and then the next
source is tried; a file that arrives but fails verification or validation is a
hard error (never silently replaced by another source) and leaves nothing behind.

Integrity: the sha256 of every accepted file is pinned in :data:`PINNED_SHA256`
(a plain-http source cannot be trusted for it); a file of another hash is refused
unless ``CRMSE_DATA_ALLOW_UNPINNED=1`` (then it is recorded as unpinned). A download
is capped at :data:`MAX_BYTES`.
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from crmse.data import DataError, load_frames
from crmse.io import sha256, write_json

MIRROR_ENV = "CRMSE_DATA_MIRROR"
#: Set to 1 to accept a file whose sha256 is not pinned (your own data; recorded in the metadata).
UNPINNED_ENV = "CRMSE_DATA_ALLOW_UNPINNED"

#: Largest accepted download (bytes): the largest MD17 file of this project is ~0.25 GB upstream.
MAX_BYTES = 500 * 1024**2

#: Known sha256 of each accepted file, by upstream file name: {sha256: what it is}. The project's
#: mirror (/work/shared/data/md17, SOURCES.md) holds 9,633-frame merges of the rMD17 splits of
#: andersx/rmd17-npz@4f6bb0a under the upstream names; a file with the same name from
#: quantum-machine.org (555,092 frames for ethanol) is a different file: add its hash here once verified.
PINNED_SHA256: dict[str, dict[str, str]] = {
    "md17_ethanol.npz": {
        "c6bebc33dc13a8bd72b310cbd86a31359bc79a4f6a3ad20684ff7dd53d867466": "mirror: MD17 labels, 9,633 frames",
    },
    "md17_aspirin.npz": {
        "89f160d42acd3a82fc28ef664854d1fe49ed4f4e15f45567fd7b75135d4cef04": "mirror: MD17 labels, 9,633 frames",
    },
    "rmd17_ethanol.npz": {
        "742879d198f4c1f2348091140723228d791e6ddb814f3045ccf8f6f592f2ff17": "mirror: rMD17 + MD17 labels, 9,633 frames",
    },
    "rmd17_aspirin.npz": {
        "fc1be57deeff8a48ce3510b53e6c506b14b2453aec7c29663d354c9cfa0cae89": "mirror: rMD17 + MD17 labels, 9,633 frames",
    },
}

_SCHEMES = ("http", "https", "file")


class DownloadError(RuntimeError):
    """No source delivered the file."""


class IntegrityError(DataError):
    """A file arrived but is not the one pinned (sha256), or is larger than the cap."""


def file_name(molecule: str, variant: str) -> str:
    """Upstream file name: ``md17_<mol>.npz`` or ``rmd17_<mol>.npz``."""
    return f"{'rmd17' if variant == 'rmd17' else 'md17'}_{molecule}.npz"


def check_source(source: str) -> str:
    """``source`` if it is a local folder path or an http(s)/file URL; otherwise a clear ValueError."""
    if "://" not in source:
        return source
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme not in _SCHEMES:
        raise ValueError(
            f"data source {source!r}: scheme {scheme!r} is not accepted; use http(s)://, file:// or a local folder"
        )
    return source


def sources(url: str, env: dict[str, str] | None = None) -> list[str]:
    """Ordered sources: ``$CRMSE_DATA_MIRROR`` (if set) first, then the upstream base URL (each checked)."""
    env = os.environ if env is None else env
    mirror = env.get(MIRROR_ENV, "").strip()
    return [check_source(s) for s in ([mirror] if mirror else []) + [url]]


def _copy_capped(src: Any, out: Any, location: str, total: int | None, max_bytes: int) -> int:
    """Copy a stream in 1 MiB blocks with a progress bar; stop past ``max_bytes``. Returns the bytes copied."""
    received = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=Path(location).name, leave=False) as bar:
        while block := src.read(1 << 20):
            received += len(block)
            if received > max_bytes:
                raise IntegrityError(f"{location}: larger than the {max_bytes / 1e6:.0f} MB cap; refused")
            out.write(block)
            bar.update(len(block))
    return received


def _fetch(location: str, dest: Path, timeout: float, max_bytes: int = MAX_BYTES) -> None:
    """Copy one file from a local path or URL to ``dest``, with a progress bar, at most ``max_bytes``."""
    if "://" not in location:
        if not Path(location).is_file():
            raise FileNotFoundError(location)
        size = Path(location).stat().st_size
        if size > max_bytes:
            raise IntegrityError(f"{location}: {size / 1e6:.0f} MB, larger than the {max_bytes / 1e6:.0f} MB cap")
        with open(location, "rb") as src, open(dest, "wb") as out:
            _copy_capped(src, out, location, size, max_bytes)
        return
    request = urllib.request.Request(location, headers={"User-Agent": "crmse"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        # A redirect may lead anywhere: the final URL must be an accepted scheme too.
        check_source(resp.geturl())
        total = resp.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        if total is not None and total > max_bytes:
            raise IntegrityError(
                f"{location}: announces {total / 1e6:.0f} MB, larger than the {max_bytes / 1e6:.0f} MB cap; refused"
            )
        with open(dest, "wb") as out:
            received = _copy_capped(resp, out, location, total, max_bytes)
        if total is not None and received != total:
            raise DataError(f"{location}: truncated download ({received} of {total} bytes)")


def verify_sha256(name: str, digest: str, location: str, allow_unpinned: bool = False) -> str | None:
    """What the pinned table says of a file's sha256 (its description), or :class:`IntegrityError`.

    None when the file is not pinned but ``allow_unpinned`` accepts it.
    """
    pinned = PINNED_SHA256.get(name, {})
    if digest in pinned:
        return pinned[digest]
    if allow_unpinned:
        return None
    expected = ", ".join(pinned) if pinned else "none pinned for this file name"
    raise IntegrityError(
        f"{location}: sha256 {digest} is not the pinned sha256 of {name} ({expected}): a corrupt, tampered or "
        f"different file; refused, nothing was written. To use your own file anyway set {UNPINNED_ENV}=1"
    )


def download(
    molecule: str,
    out_npz: str | Path,
    out_json: str | Path,
    url: str,
    variant: str = "md17",
    retries: int = 3,
    timeout: float = 60.0,
    env: dict[str, str] | None = None,
    backoff: float = 1.0,
    max_bytes: int = MAX_BYTES,
) -> dict[str, Any]:
    """Download, verify (sha256), validate and place ``md17_<molecule>.npz``; return the metadata (``out_json``)."""
    env = os.environ if env is None else env
    allow_unpinned = env.get(UNPINNED_ENV, "").strip() == "1"
    name = file_name(molecule, variant)
    out_npz = Path(out_npz)
    out_npz.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_npz.with_name(f".{out_npz.name}.part")
    errors: list[str] = []
    try:
        for base in sources(url, env):
            location = f"{base.rstrip('/')}/{name}"
            for attempt in range(retries + 1):
                try:
                    _fetch(location, tmp, timeout, max_bytes)
                except (urllib.error.HTTPError, FileNotFoundError) as exc:
                    errors.append(f"{location}: {exc}")
                    break  # not there: no point retrying this source
                except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as exc:
                    errors.append(f"{location} (attempt {attempt + 1}): {exc}")
                    if attempt < retries:
                        time.sleep(backoff * 2**attempt)
                    continue
                digest = sha256(tmp)
                pinned = verify_sha256(name, digest, location, allow_unpinned)  # IntegrityError propagates
                if pinned is None:
                    print(f"download: warning: {location} has sha256 {digest}, not a pinned one ({UNPINNED_ENV}=1)")
                # Errors name the source, not the temporary file; DataError propagates, tmp is removed below.
                frames = load_frames(tmp, molecule, variant, name=location)
                meta = {
                    "molecule": molecule,
                    "variant": variant,
                    # the mirror's path differs between machines; the sha256 says which file it was
                    "source": location if base == url else f"${MIRROR_ENV}/{name}",
                    "sha256": digest,
                    "sha256_pinned": pinned is not None,
                    "pinned_as": pinned,
                    "bytes": tmp.stat().st_size,
                    "frames": len(frames),
                    "n_atoms": frames.n_atoms,
                }
                write_json(out_json, meta)
                os.replace(tmp, out_npz)
                return meta
    finally:
        tmp.unlink(missing_ok=True)
    raise DownloadError(f"could not download {name} from any source:\n  " + "\n  ".join(errors))
