"""Fetch an MD17 npz from an ordered list of sources, validate it, then rename into place.

A source is a local folder or a base URL (http, https or file) holding the
upstream file names. Network errors are retried with backoff and then the next
source is tried; a file that arrives but fails validation is a hard error
(never silently replaced by another source) and leaves nothing behind.
"""

from __future__ import annotations

import http.client
import os
import shutil
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from crmse.data import DataError, load_frames
from crmse.io import sha256, write_json

MIRROR_ENV = "CRMSE_DATA_MIRROR"


class DownloadError(RuntimeError):
    """No source delivered the file."""


def file_name(molecule: str, variant: str) -> str:
    """Upstream file name: ``md17_<mol>.npz`` or ``rmd17_<mol>.npz``."""
    return f"{'rmd17' if variant == 'rmd17' else 'md17'}_{molecule}.npz"


def sources(url: str, env: dict[str, str] | None = None) -> list[str]:
    """Ordered sources: ``$CRMSE_DATA_MIRROR`` (if set) first, then the upstream base URL."""
    env = os.environ if env is None else env
    mirror = env.get(MIRROR_ENV, "").strip()
    return ([mirror] if mirror else []) + [url]


def _fetch(location: str, dest: Path, timeout: float) -> None:
    """Copy one file from a local path or URL to ``dest``, with a progress bar."""
    if "://" not in location:
        if not Path(location).is_file():
            raise FileNotFoundError(location)
        shutil.copyfile(location, dest)
        return
    request = urllib.request.Request(location, headers={"User-Agent": "crmse"})
    with urllib.request.urlopen(request, timeout=timeout) as resp, open(dest, "wb") as out:
        total = resp.headers.get("Content-Length")
        total = int(total) if total and total.isdigit() else None
        received = 0
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(location).name, leave=False) as bar:
            while block := resp.read(1 << 20):
                out.write(block)
                received += len(block)
                bar.update(len(block))
        if total is not None and received != total:
            raise DataError(f"{location}: truncated download ({received} of {total} bytes)")


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
) -> dict[str, Any]:
    """Download, validate and place ``md17_<molecule>.npz``; return the metadata written to ``out_json``."""
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
                    _fetch(location, tmp, timeout)
                except (urllib.error.HTTPError, FileNotFoundError) as exc:
                    errors.append(f"{location}: {exc}")
                    break  # not there: no point retrying this source
                except (urllib.error.URLError, http.client.HTTPException, TimeoutError, OSError) as exc:
                    errors.append(f"{location} (attempt {attempt + 1}): {exc}")
                    if attempt < retries:
                        time.sleep(backoff * 2**attempt)
                    continue
                frames = load_frames(tmp, molecule, variant)  # DataError propagates; tmp is removed below
                meta = {
                    "molecule": molecule,
                    "variant": variant,
                    "source": location,
                    "sha256": sha256(tmp),
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
