"""The transformers backend: lm-eval's HFLM around one persistent in-memory module per worker.

A candidate's weights are copied into the module's existing parameters (`load`), so a candidate never
touches the disk and no model is rebuilt. `forward_seconds` accumulates the time spent inside the model
(lm-eval's `_model_call` and `_model_generate`): the rest of an evaluation is fixed overhead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from evomerge.checkpoints.targets import checkpoint_targets
from evomerge.checkpoints.arch import Architecture
from evomerge.compat import lm_eval as lm_eval_compat
from evomerge.fitness.objectives import CandidateFailed


def _quiet_generation_config(module: nn.Module) -> None:
    """lm-eval bounds a generation by `max_length` (the context plus the task's max_gen_toks): a checkpoint's own
    `max_new_tokens` would take precedence over it in transformers, and an objective's `gen_kwargs: {max_gen_toks}`
    would be ignored; and both given at once, transformers warns on every batch."""
    gc = getattr(module, "generation_config", None)
    if gc is not None:
        gc.max_length = None
        gc.max_new_tokens = None


def memoise_tok_encode(lm, max_entries: int = 1_000_000) -> None:
    """The same prompts are tokenised for every candidate (sorting, batching): keep their ids."""
    cache: dict = {}

    def make(inner):
        def tok_encode(string, *args, **kw):
            key = (string, args, tuple(sorted(kw.items())))
            hit = cache.get(key)
            if hit is None:
                if len(cache) >= max_entries:
                    cache.clear()
                hit = cache[key] = inner(string, *args, **kw)
            return list(hit)

        return tok_encode

    lm_eval_compat.wrap_method(lm, "tok_encode", make)


class HFBackend:
    name = "hf"

    def __init__(self, module: nn.Module, tokenizer, batch_size: int = 64, max_length: int | None = None):
        from lm_eval.models.huggingface import HFLM

        module.eval()
        _quiet_generation_config(module)
        self.module = module
        self.tokenizer = tokenizer
        kw = {"max_length": max_length} if max_length else {}
        self.lm = HFLM(pretrained=module, tokenizer=tokenizer, batch_size=batch_size, **kw)
        self.forward_seconds = 0.0
        self._wrap_timers()
        memoise_tok_encode(self.lm)
        self._targets: dict[str, torch.Tensor] | None = None  # checkpoint name -> the module's tensor

    @classmethod
    def from_dir(cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", batch_size: int = 64) -> "HFBackend":
        from evomerge.checkpoints.hf import load_model, load_tokenizer

        return cls(load_model(path, dtype, device), load_tokenizer(path), batch_size=batch_size)

    def _wrap_timers(self) -> None:
        def add(seconds: float) -> None:
            self.forward_seconds += seconds

        lm_eval_compat.time_methods(self.lm, ("_model_call", "_model_generate"), add)

    # ---- candidate weights
    @torch.no_grad()
    def load(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint-named tensors (a mapping, or (name, tensor) pairs consumed one at a time) into the
        module in place."""
        if isinstance(weights, Mapping):
            for name in weights:  # every name resolved before the first copy: a mismatch writes nothing
                self._target(name)
            weights = weights.items()
        for name, tensor in weights:
            self._target(name).copy_(tensor)

    def _target(self, name: str) -> torch.Tensor:
        """The module's tensor a checkpoint name loads into: the module's own name, or the one name ending in it
        (GPT-2 hub checkpoints), resolved once and kept."""
        if self._targets is None:
            self._targets = dict(self.module.state_dict(keep_vars=True))
        target = self._targets.get(name)
        if target is None:  # resolved, or a clear error
            target = self._targets[name] = checkpoint_targets(self.module, [name])[name]
        return target

    @torch.no_grad()
    def probe(self) -> None:
        """One short forward pass: a candidate whose logits are NaN/inf fails here, before scoring."""
        ids = self.tokenizer("0", return_tensors="pt")["input_ids"].to(self.lm.device)
        logits = self.module(input_ids=ids).logits
        if not torch.isfinite(logits).all():
            raise CandidateFailed("the forward pass yields NaN or inf logits")

    # ---- facts for built-in objectives
    def param_count(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def layer_count(self) -> int:
        return Architecture.from_config(self.module.config.to_dict()).num_layers

    def close(self) -> None:
        pass
