"""DVC stage `download`: fetch and validate md17_<molecule>.npz into data/raw/."""

import argparse

from crmse.download import download
from crmse.params import load_params

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("molecule")
    args = parser.parse_args()
    params = load_params(molecule=args.molecule)
    data = params["data"]
    meta = download(
        args.molecule,
        f"data/raw/{args.molecule}.npz",
        f"data/raw/{args.molecule}.json",
        url=data["url"],
        variant=data["variant"],
        retries=data["retries"],
        timeout=data["timeout_s"],
    )
    print(f"{args.molecule}: {meta['frames']} frames from {meta['source']} (sha256 {meta['sha256'][:12]}…)")
