"""DVC stage `download`: fetch, verify (pinned sha256) and validate md17_<molecule>.npz into data/raw/."""

import argparse
import os
import sys

from crmse.data import DataError
from crmse.download import DownloadError, download
from crmse.stage import stage_params

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("molecule")
    args = parser.parse_args()
    data = stage_params(args)["data"]
    try:
        meta = download(
            args.molecule,
            f"data/raw/{args.molecule}.npz",
            f"data/raw/{args.molecule}.json",
            url=data["url"],
            variant=data["variant"],
            retries=data["retries"],
            timeout=data["timeout_s"],
        )
    except (DataError, DownloadError, ValueError) as exc:
        # The message names the source and what is wrong with it; a traceback adds nothing.
        sys.exit(f"download: {exc}")
    pinned = "pinned" if meta["sha256_pinned"] else "NOT pinned"
    source = os.path.expandvars(meta["source"])
    print(f"{args.molecule}: {meta['frames']} frames from {source} (sha256 {meta['sha256'][:12]}…, {pinned})")
