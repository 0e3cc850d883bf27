"""Optimizers of the training loop: AdamW, or Muon for the blocks' matrices with AdamW for the rest.

`build_optimizer(model, cfg, device)` is the one place an optimizer is built. Both kinds expose
`param_groups` (the loop sets each group's lr from the schedule), `step`, `zero_grad`,
`state_dict` and `load_state_dict`, so checkpoints and resume treat them alike.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from microtransformer.config import OPTIMIZERS


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on the blocks' 2-D matmul weights only; none on biases, norms,
    embeddings and the head (tied or not). Every parameter is in exactly one group."""
    matrices, others = split_matrices(model)
    return [{"params": matrices, "weight_decay": weight_decay},
            {"params": others, "weight_decay": 0.0}]


def split_matrices(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(2-D weights of nn.Linear layers that are neither embeddings nor the prediction head,
    every other trainable parameter). Each trainable parameter is in exactly one list (a tied
    weight once); an untied head goes with the embeddings, as the speed-run recipes keep it
    on Adam."""
    # token tables and the prediction head (tied or not): AdamW, never Muon
    table_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    table_ids |= {id(m.lm_head.weight) for m in model.modules()
                  if isinstance(getattr(m, "lm_head", None), nn.Linear)}
    linear_weight_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    matrices, others = [], []
    for _, p in model.named_parameters():  # unique parameters (tied weight once)
        if not p.requires_grad:
            continue
        if id(p) in linear_weight_ids and id(p) not in table_ids and p.dim() == 2:
            matrices.append(p)
        else:
            others.append(p)
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [id(p) for p in matrices + others]
    if not len(grouped) == len(set(grouped)) == len(trainable):
        raise RuntimeError("optimizer grouping bug: a parameter is in two groups or in none")
    return matrices, others


class MuonAdamW:
    """Muon on the blocks' 2-D weight matrices, AdamW on embeddings and the head, biases
    and norms: two torch optimizers stepped together.

    Muon uses `adjust_lr_fn="match_rms_adamw"` (its update is scaled to AdamW's RMS), so one
    learning rate and one schedule serve both. Weight decay applies to the matrices only.
    """

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float,
                 betas: tuple[float, float], fused: bool = False) -> None:
        matrices, others = split_matrices(model)
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay,
                                     adjust_lr_fn="match_rms_adamw")
        adamw_kwargs: dict[str, Any] = {"lr": lr, "betas": betas, "weight_decay": 0.0}
        if fused:
            adamw_kwargs["fused"] = True
        self.adamw = torch.optim.AdamW(others, **adamw_kwargs)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Both optimizers' groups, for the schedule to set: read afresh each time, because
        `load_state_dict` replaces the inner optimizers' group dicts."""
        return self.muon.param_groups + self.adamw.param_groups

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        """One update of both optimizers."""
        if closure is not None:
            raise ValueError("MuonAdamW.step does not take a closure")
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of every parameter."""
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """{"muon": ..., "adamw": ...}: both inner optimizers' state."""
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""
        if set(state_dict) != {"muon", "adamw"}:
            raise ValueError("not a MuonAdamW state (expected keys 'muon' and 'adamw'); was "
                             "the checkpoint written with train.optimizer='adamw'?")
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])


def build_optimizer(model: nn.Module, cfg: Any, device: torch.device
                    ) -> torch.optim.Optimizer | MuonAdamW:
    """The optimizer `cfg.optimizer` names ("adamw" or "muon") over `model`'s parameters, with
    the lr, betas and weight decay of `cfg` (a TrainConfig); fused AdamW kernels on CUDA."""
    fused = device.type == "cuda"
    kind = getattr(cfg, "optimizer", "adamw")
    if kind == "muon":
        return MuonAdamW(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=cfg.betas,
                         fused=fused)
    if kind != "adamw":
        raise ValueError(f"unknown optimizer {kind!r}; use one of {', '.join(OPTIMIZERS)}")
    kwargs: dict[str, Any] = {"lr": cfg.lr, "betas": cfg.betas}
    if fused:
        kwargs["fused"] = True
    return torch.optim.AdamW(param_groups(model, cfg.weight_decay), **kwargs)
