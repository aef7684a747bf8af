"""What every per-run stage script shares: its command line and the torch thread setting."""

from __future__ import annotations

import argparse
from typing import Any


def run_parser(description: str | None, ablation: bool = False) -> argparse.ArgumentParser:
    """Parser of a per-run stage: positional ``molecule``, ``size`` (training frames) and ``seed``.

    ``ablation`` adds ``--temperature K``: sample/evaluate/report at an ablation temperature
    (``md.ablation_temperatures``), in the run's ``T<K>`` sub-folder.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("molecule")
    parser.add_argument("size", type=int)
    parser.add_argument("seed", type=int)
    if ablation:
        parser.add_argument("--temperature", default=None,
                            help="ablation sampling temperature in K, as written in md.ablation_temperatures "
                            "(default: md.temperature, main folders)")
    return parser


def set_torch_threads(params: dict[str, Any]) -> None:
    """Apply params ``torch_threads`` (0 keeps torch's default)."""
    if params["torch_threads"] > 0:
        import torch

        torch.set_num_threads(params["torch_threads"])
