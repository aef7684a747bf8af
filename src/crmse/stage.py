"""What every per-run stage script shares: its command line and the torch thread setting."""

from __future__ import annotations

import argparse
from typing import Any


def run_parser(description: str | None) -> argparse.ArgumentParser:
    """Parser of a per-run stage: positional ``molecule``, ``size`` (training frames) and ``seed``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("molecule")
    parser.add_argument("size", type=int)
    parser.add_argument("seed", type=int)
    return parser


def set_torch_threads(params: dict[str, Any]) -> None:
    """Apply params ``torch_threads`` (0 keeps torch's default)."""
    if params["torch_threads"] > 0:
        import torch

        torch.set_num_threads(params["torch_threads"])
