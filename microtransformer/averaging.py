"""Weight averaging over the cool-down: the final model is the mean of the weights after every
step of the learning-rate decay, not the last step's alone (`train.average_cooldown`).

A running mean, updated in place after each averaged step: mean += (weights - mean) / n, in
float32 for every floating-point parameter (a tied weight once). Its `state_dict` goes into the
training state (state.pt), so a run resumed in the middle of its cool-down ends with the same
mean as one that was never stopped. docs/RESULTS.md, section 10, measures what it buys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class WeightAverage:
    """The running mean of a model's floating-point parameters over the steps added so far."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: dict[str, torch.Tensor] = {}

    def add(self, model: nn.Module) -> None:
        """Fold the model's current parameters into the mean (one more step)."""
        self.count += 1
        with torch.no_grad():
            for name, p in _params(model):
                if self.count == 1:
                    self.mean[name] = p.detach().float().clone()
                else:
                    m = self.mean[name]
                    m.add_(p.detach().float() - m, alpha=1.0 / self.count)

    def copy_into(self, model: nn.Module) -> None:
        """Replace the model's parameters with the mean (nothing when no step was added)."""
        if not self.count:
            return
        with torch.no_grad():
            for name, p in _params(model):
                p.copy_(self.mean[name].to(p.dtype))

    def state_dict(self) -> dict[str, Any]:
        """What the training state stores: the step count and the mean (CPU tensors)."""
        return {"count": self.count, "mean": {k: v.cpu() for k, v in self.mean.items()}}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore a `state_dict` (the mean moved to `device`)."""
        self.count = int(state["count"])
        self.mean = {k: v.to(device) for k, v in state["mean"].items()}


def _params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    # named_parameters lists a tied weight once
    return [(n, p) for n, p in model.named_parameters() if p.is_floating_point()]
