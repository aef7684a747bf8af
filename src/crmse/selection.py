"""Which weights of a CRMSE run are validated and which are kept: weight averaging and checkpoint selection.

Weight averaging (``ema_decay`` > 0): L_C's sampling noise jitters relative energies from step to step;
a Polyak average of the weights is what is validated, selected and written, while the chains follow the
live weights. Checkpoint selection picks one validated checkpoint by a rule that never looks at test data.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from crmse.data import Frames
from crmse.params import SELECTION_RULES
from crmse.train import evaluate_errors, refit_energy_offset

Rule = Literal["fewest_chain_failures", "best_val_forces", "last"]

_RULE_NOTES = {
    "fewest_chain_failures": "fewest chain failures in the preceding window, then best validation force MAE",
    "best_val_forces": "best validation force MAE",
}


def clone_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A detached copy of a state dict (the live weights keep changing)."""
    return {k: v.detach().clone() for k, v in state.items()}


class LiveWeights:
    """No averaging (``ema_decay`` 0): the live weights are validated and kept."""

    note = ""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def update(self) -> None:
        """Called after every optimiser step."""

    @contextlib.contextmanager
    def applied(self, train: Frames) -> Iterator[None]:
        """The weights to validate are loaded in ``model`` inside the block."""
        yield

    def state(self) -> dict[str, Tensor]:
        """A copy of the weights to keep."""
        return clone_state(self.model.state_dict())


class MovingAverage(LiveWeights):
    """Exponential moving average of the weights, decay ``decay`` per iteration (1/(1 − decay) iterations)."""

    def __init__(self, model: torch.nn.Module, decay: float) -> None:
        super().__init__(model)
        self.decay = decay
        self.average = clone_state(model.state_dict())
        self.note = f"; weights: moving average, decay {decay}"

    def update(self) -> None:
        with torch.no_grad():
            for k, v in self.model.state_dict().items():
                if v.dtype.is_floating_point:
                    self.average[k].lerp_(v, 1.0 - self.decay)
                else:
                    self.average[k].copy_(v)

    @contextlib.contextmanager
    def applied(self, train: Frames) -> Iterator[None]:
        live = clone_state(self.model.state_dict())
        self.model.load_state_dict(self.average)
        try:
            yield
        finally:
            # Refit the live weights' offset too, as a run without averaging does: the chains then see
            # exactly the surface they would see with ema_decay 0.
            self.model.load_state_dict(live)
            refit_energy_offset(self.model, train)

    def state(self) -> dict[str, Tensor]:
        return clone_state(self.average)


def weight_averaging(model: torch.nn.Module, decay: float) -> LiveWeights:
    """:class:`MovingAverage` for ``decay`` > 0, else :class:`LiveWeights`."""
    return MovingAverage(model, decay) if decay > 0 else LiveWeights(model)


@dataclass(frozen=True)
class SelectionConfig:
    """Checkpoint selection: validate ``every`` iterations; select by ``rule`` among the evaluations after
    ``after``·iterations whose mean |contrastive gap| over the preceding window is at most ``max_gap`` kcal/mol
    and whose validation energy MAE is at most ``max_energy_rise`` kcal/mol above the starting model's."""

    rule: Rule = "fewest_chain_failures"
    every: int = 50
    after: float = 0.5
    max_gap: float = 3.0
    max_energy_rise: float = math.inf

    def __post_init__(self) -> None:
        if self.rule not in SELECTION_RULES:
            raise ValueError(f"unknown selection rule {self.rule!r}; allowed: {', '.join(map(repr, SELECTION_RULES))}")

    @classmethod
    def from_params(cls, section: dict[str, Any]) -> SelectionConfig:
        """From the ``crmse.selection`` params section."""
        return cls(section["rule"], int(section["every"]), float(section["after"]), float(section["max_gap"]),
                   float(section["max_energy_rise"]))


class CheckpointSelection:
    """Keeps the best validated checkpoint of a run by its rule (see :class:`SelectionConfig`).

    ``fewest_chain_failures``: fewest chain failures in the preceding window (chain-iterations spent in a
    spurious state + blow-ups: the model's own sampler still finding holes), ties broken by validation force
    MAE; ``best_val_forces``: lowest validation force MAE; ``last``: the final weights. With no eligible
    evaluation, the final weights.
    """

    def __init__(self, cfg: SelectionConfig, iterations: int, energy_limit: float = math.inf) -> None:
        """``energy_limit``: the highest eligible validation energy MAE, kcal/mol."""
        self.cfg, self.iterations, self.energy_limit = cfg, iterations, energy_limit
        self.best: tuple[tuple[float, float], int, dict[str, Tensor]] | None = None

    @classmethod
    def start(cls, cfg: SelectionConfig, iterations: int, model: Any, train: Frames, val: Frames
              ) -> CheckpointSelection:
        """Selection for a run starting from ``model``; a finite ``max_energy_rise`` evaluates the starting model."""
        limit = math.inf
        if math.isfinite(cfg.max_energy_rise):
            # The holes the hinge holds up can bend the surface inside the data's range (a non-constant error
            # the offset refit cannot remove). A copy is refitted so that the run starts from the model as given.
            start_model = copy.deepcopy(model)
            refit_energy_offset(start_model, train)
            limit = evaluate_errors(start_model, val, batch_size=64)["energy_mae"] + cfg.max_energy_rise
            del start_model
        return cls(cfg, iterations, limit)

    def due(self, iteration: int) -> bool:
        """Whether ``iteration`` (from 1) ends a validation window."""
        return iteration % self.cfg.every == 0 or iteration == self.iterations

    def consider(self, entry: dict[str, float], state: Callable[[], dict[str, Tensor]]) -> None:
        """Offer a validation-log entry (iteration, gap, val_energy_mae, val_force_mae, chain_failures);
        ``state()`` returns a copy of its weights, called only when it becomes the best."""
        cfg = self.cfg
        if cfg.rule == "last":
            return
        eligible = (entry["iteration"] >= cfg.after * self.iterations and abs(entry["gap"]) <= cfg.max_gap
                    and entry["val_energy_mae"] <= self.energy_limit)
        score = (entry["chain_failures"] if cfg.rule == "fewest_chain_failures" else 0.0, entry["val_force_mae"])
        if eligible and (self.best is None or score < self.best[0]):
            self.best = (score, int(entry["iteration"]), state())

    def choose(self, final_state: Callable[[], dict[str, Tensor]]) -> tuple[dict[str, Tensor], int, str]:
        """(weights, iteration, note) of the selected checkpoint; ``final_state()`` copies the final weights."""
        cfg = self.cfg
        guard = "" if not math.isfinite(self.energy_limit) else (
            f" and validation energy MAE <= {self.energy_limit:.3f} kcal/mol")
        if self.best is not None:
            note = f"{_RULE_NOTES[cfg.rule]} after {cfg.after:.0%} of the iterations with |gap| <= {cfg.max_gap}{guard}"
            return self.best[2], self.best[1], note
        note = "last iteration" if cfg.rule == "last" else (
            f"last iteration: no evaluation after {cfg.after:.0%} had |gap| <= {cfg.max_gap} kcal/mol{guard}")
        return final_state(), self.iterations, note
