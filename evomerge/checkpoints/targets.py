"""Where a checkpoint's tensors live in a built transformers module: the one name map that writing weights
into a model in place needs (the merge's Materialiser and the fitness backends both use it)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from evomerge.checkpoints.io import CheckpointError


def checkpoint_targets(module: nn.Module, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Checkpoint tensor name -> the module's parameter or buffer of that name (or the one name ending in it:
    GPT-2 hub checkpoints lack the module's 'transformer.' prefix)."""
    own = dict(module.state_dict(keep_vars=True))
    out = {}
    for name in names:
        if name in own:
            out[name] = own[name]
            continue
        matches = [k for k in own if k.endswith("." + name)]
        if len(matches) != 1:
            raise CheckpointError(f"checkpoint tensor '{name}' matches {len(matches)} parameters of the "
                                  f"{type(module).__name__} module (needs exactly one): the model folder's config.json "
                                  "does not describe these weights; check its model_type and architectures")
        out[name] = own[matches[0]]
    return out
