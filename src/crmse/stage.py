"""What every per-run stage script shares: its command line, its params and torch's threads and determinism."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator
from typing import Any

from crmse.artifacts import ArtifactError, RunPaths
from crmse.data import DataError
from crmse.params import ParamsError, load_params


def run_parser(
    description: str | None, temperature: bool = False, arms: tuple[str, ...] = ()
) -> argparse.ArgumentParser:
    """Parser of a per-run stage: positional ``molecule``, ``size`` (training frames) and ``seed``.

    ``temperature`` adds a positional temperature setting (``auto`` or K, as written in md.temperatures);
    ``arms`` adds a positional ``arm`` restricted to those arms.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("molecule")
    parser.add_argument("size", type=int)
    parser.add_argument("seed", type=int)
    if temperature:
        parser.add_argument("temperature", help="temperature setting as written in md.temperatures: auto or K")
    if arms:
        parser.add_argument("arm", choices=arms, help="arm (" + ", ".join(arms) + ")")
    return parser


def stage_params(args: argparse.Namespace) -> dict[str, Any]:
    """The validated params of the run's molecule; exits with the schema's message (no traceback) if invalid."""
    try:
        params = load_params(molecule=args.molecule)
    except ParamsError as exc:
        sys.exit(f"error: {exc}")
    return params


@contextlib.contextmanager
def input_errors(stage: str) -> Iterator[None]:
    """Exit with the message, not a traceback, when an input is missing, corrupt or of other atoms."""
    try:
        yield
    except (ArtifactError, DataError) as exc:
        sys.exit(f"{stage}: error: {exc}")


def run_paths(args: argparse.Namespace) -> RunPaths:
    """Every path of the run named on the command line."""
    return RunPaths(args.molecule, args.size, args.seed)


def configure_torch(params: dict[str, Any]) -> None:
    """Apply params ``torch_threads`` (0 keeps torch's default) and, on a CPU, torch's deterministic kernels.

    With more than one thread torch's CPU backward of an indexed read (``x[idx]`` in schnetpack's SchNet)
    accumulates with atomic adds, so forces and gradients changed in their last bits from run to run and
    CRMSE runs of one seed drifted apart after a few hundred iterations. The deterministic kernel adds in
    index order: the one-thread bits on any number of threads, no slower (benchmarks/README.md). On CUDA
    the scatter-adds stay atomic: there the same seed does not give the same bits.
    """
    import torch

    from crmse.model import resolve_device

    if params["torch_threads"] > 0:
        torch.set_num_threads(params["torch_threads"])
    if resolve_device(params["device"]).type == "cpu":
        torch.use_deterministic_algorithms(True)

