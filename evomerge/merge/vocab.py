"""Merging models whose vocabularies differ: one output tokenizer, and every model's vocabulary-indexed tensors
(embeddings, LM head) permuted into its token order before the merge, with mergekit 0.1.5's semantics.

The output tokenizer (`tokenizer.source`): `base` (the base model's), a named model's, or `union` (the base's,
then every other model's tokens it lacks, then all models' added tokens, in model order). Each model's rows are
moved to the output ids of their tokens. A token a model lacks gets, in that model's tensor:
- what `tokenizer.tokens[TOKEN].source` says: a model (its row for that token), `{kind: zero}`, or
  `{kind: model_token, model, token | token_id}` (a row of the model's own vocabulary); `force: true` uses it even
  for models that have the token;
- else, when only one model has the token, that model's row; when none has it, zeros; when the base has it, the
  base's row; else the mean of the rows of the models that have it.
Rows past the vocabulary (`pad_to_multiple_of`) are the mean of the model's aligned rows. Tokens whose id is at or
past a model's configured vocab_size are not that model's (tokenizers may list more than the embedding holds).
The merge then runs as for models of one vocabulary: these aligned tensors are its inputs (`AlignedCheckpoint`).

The output tokenizer is written once to evomerge's cache (`checkpoints.refs.cache_root()/tokenizers/<hash>`), with
`chat_template` set when the recipe gives one (a Jinja template, or `auto`: the template most of the models use).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from evomerge.checkpoints import Checkpoint, classify_tensor
from evomerge.checkpoints.hf import load_tokenizer
from evomerge.checkpoints.io import TensorInfo
from evomerge.checkpoints.refs import cache_folder, cache_root
from evomerge.merge.export import CORE_TOKENIZER_FILES
from evomerge.merge.recipe import Recipe, RecipeError, TokenSource, TokenizerSpec


@dataclass
class Vocabulary:
    """One model's tokens (token -> id, only ids below its vocab_size)."""

    ids: dict[str, int]
    size: int


def _vocab_size(config: Mapping[str, Any]) -> int | None:
    size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
    return int(size) if isinstance(size, int) else None


def vocab_tensors(ck: Checkpoint) -> list[str]:
    """The tensors indexed by token along their first axis: the embeddings and the LM head."""
    size = _vocab_size(ck.config)
    return [n for n in ck.names() if classify_tensor(n).kind in ("embed", "head") and ck.info(n).shape
            and ck.info(n).shape[0] == size]


def _tokenizer_or_none(folder: Path) -> Any:
    """A model's tokenizer; None when its folder has no tokenizer files (mergekit then assumes the base's)."""
    if not any((Path(folder) / n).is_file() for n in CORE_TOKENIZER_FILES):
        return None
    return load_tokenizer(folder)


def _vocabulary(ck: Checkpoint, tokenizer: Any) -> Vocabulary:
    size = _vocab_size(ck.config) or len(tokenizer.get_vocab())
    return Vocabulary({t: i for t, i in tokenizer.get_vocab().items() if i < size}, size)


def _union(base_tok: Any, tokenizers: Mapping[str, Any], vocabs: Mapping[str, Vocabulary]) -> Any:
    """The base's tokenizer with every other model's plain tokens it lacks, then every model's added tokens."""
    out = base_tok  # a fresh instance per merge (loaded from its folder), so adding to it changes nothing else
    have = set(out.get_vocab())
    added = {}
    for label, tok in tokenizers.items():
        decoder = tok.added_tokens_decoder
        added_text = {info.content for info in decoder.values()}
        for text, i in sorted(vocabs[label].ids.items(), key=lambda kv: kv[1]):
            if text not in have and text not in added_text:
                out.add_tokens(text)
                have.add(text)
        for i, info in sorted(decoder.items()):
            if i < vocabs[label].size and info.content not in added:
                added[info.content] = info
    for text, info in added.items():
        if text not in have:
            out.add_tokens(info)
            have.add(text)
    return out


@dataclass
class Alignment:
    """The output tokenizer's folder and vocabulary size, and each model's checkpoint as the merge reads it."""

    tokenizer_dir: Path
    vocab_size: int
    checkpoints: dict[str, Checkpoint]


def _chat_template(template: str, tokenizers: Mapping[str, Any], where: str) -> str:
    if template != "auto":
        return template
    found = Counter(t.chat_template for t in tokenizers.values() if isinstance(getattr(t, "chat_template", None), str))
    if not found:
        raise RecipeError(f"{where}: chat_template: 'auto' picks the template most of the models use, and none has "
                          "one; give the template itself (Jinja text)")
    return found.most_common(1)[0][0]


def align(recipe: Recipe, cks: Mapping[str, Checkpoint], base_label: str) -> Alignment | None:
    """The vocabulary alignment a recipe's `tokenizer` (or `chat_template`) asks for; None when every model's
    rows already sit at the output tokenizer's ids, no row is dropped or added, and nothing else changes (the merge
    then reads the models as they are and copies the tokenizer's files). As mergekit 0.1.5: a tokenizer setting
    sizes the output to the output tokenizer (padding rows past it are dropped, unless `pad_to_multiple_of`); a
    chat template alone changes only the tokenizer written."""
    where = str(recipe.source_file or "<recipe>")
    labels = list(cks)
    tokenizers = {label: _tokenizer_or_none(cks[label].path) for label in labels}
    if tokenizers[base_label] is None:
        raise RecipeError(f"{where}: '{base_label}' has no tokenizer files; a tokenizer setting or chat_template "
                          "needs the base's tokenizer (tokenizer.json or the slow tokenizer's files)")
    if recipe.tokenizer is None:  # chat_template alone: the base's tokenizer with it, the tensors as they are
        out_tok = load_tokenizer(cks[base_label].path)
        template = _chat_template(str(recipe.chat_template), {k: t for k, t in tokenizers.items() if t is not None},
                                  where)
        out_tok.chat_template = template
        folder = _save_tokenizer(out_tok, [str(cks[k].path) for k in labels], TokenizerSpec("base"), template)
        return Alignment(folder, _vocab_size(cks[base_label].config) or len(out_tok.get_vocab()), dict(cks))
    spec = recipe.tokenizer
    tokenizers = {k: t if t is not None else tokenizers[base_label] for k, t in tokenizers.items()}  # as mergekit
    vocabs = {label: _vocabulary(cks[label], tokenizers[label]) for label in labels}
    source = base_label if spec.source == "base" else spec.source
    if spec.source == "union":
        out_tok = _union(load_tokenizer(cks[base_label].path), tokenizers, vocabs)
    else:
        if source not in cks:
            raise RecipeError(f"{where}: tokenizer.source: '{source}' is not one of the recipe's models")
        out_tok = load_tokenizer(cks[source].path)
    out_vocab = dict(sorted(out_tok.get_vocab().items(), key=lambda kv: kv[1]))
    size = len(out_vocab)
    if spec.pad_to_multiple_of and size % spec.pad_to_multiple_of:
        size = (size // spec.pad_to_multiple_of + 1) * spec.pad_to_multiple_of
    perms = {label: [vocabs[label].ids.get(t, -1) for t in out_vocab] for label in labels}
    for token, ts in spec.tokens.items():
        if token not in out_vocab:
            raise RecipeError(f"{where}: tokenizer.tokens.{token}: the output tokenizer has no token {token!r}")
        if ts.model is not None and ts.model not in cks:
            raise RecipeError(f"{where}: tokenizer.tokens.{token}.source: '{ts.model}' is not one of the recipe's models")
        if ts.kind == "model" and vocabs[ts.model].ids.get(token, -1) < 0:
            raise RecipeError(f"{where}: tokenizer.tokens.{token}.source: model '{ts.model}' has no token {token!r}; "
                              "name a model that has it, or use {kind: model_token, model, token} or {kind: zero}")
        if ts.kind == "model_token":
            src_id = ts.token_id if ts.token_id is not None else vocabs[ts.model].ids.get(ts.token or "", -1)
            if not 0 <= src_id < vocabs[ts.model].size:
                raise RecipeError(f"{where}: tokenizer.tokens.{token}.source: model '{ts.model}' has no token "
                                  f"{ts.token if ts.token is not None else ts.token_id!r}")
    identity = (all(p == list(range(len(out_vocab))) for p in perms.values())
                and all(vocabs[k].size == size for k in labels))  # nothing moves, nothing dropped or added
    template = _chat_template(recipe.chat_template, tokenizers, where) if recipe.chat_template else None
    if identity and not spec.tokens and template is None:
        return None

    if template is not None:
        out_tok.chat_template = template
    folder = _save_tokenizer(out_tok, [str(cks[k].path) for k in labels], spec, template)
    aligner = _Aligner(cks, base_label, list(out_vocab), perms, vocabs, spec, size)
    aligned = {label: aligner.checkpoint(label) for label in labels}
    return Alignment(folder, size, aligned)


def _save_tokenizer(tok: Any, models: list[str], spec: TokenizerSpec, template: str | None) -> Path:
    """The output tokenizer, written once per content: the key holds the vocabulary itself, so a model whose
    tokenizer was edited since gets a folder of its own, never a stale one."""
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    key = hashlib.sha256(json.dumps([models, repr(spec), template, vocab]).encode()).hexdigest()[:16]
    folder = cache_root() / "tokenizers" / key
    return folder if folder.is_dir() else cache_folder(folder, tok.save_pretrained)


class _Aligner:
    """Every model's vocabulary tensors in the output token order (the defaults shared across models, made once per
    tensor name)."""

    def __init__(self, cks: Mapping[str, Checkpoint], base: str, tokens: list[str], perms: dict[str, list[int]],
                 vocabs: Mapping[str, Vocabulary], spec: TokenizerSpec, size: int):
        self.cks, self.base, self.tokens, self.perms, self.vocabs, self.size = cks, base, tokens, perms, vocabs, size
        self.configs: dict[str, TokenSource] = dict(spec.tokens)
        self.average: set[int] = set()
        labels = list(cks)
        for tid, token in enumerate(tokens):  # sources for tokens some model lacks (mergekit's order of rules)
            if token in self.configs:
                continue
            have = [label for label in labels if perms[label][tid] >= 0]
            if len(have) == len(labels):
                continue
            if len(have) == 1:
                self.configs[token] = TokenSource("model", model=have[0])
            elif not have:
                self.configs[token] = TokenSource("zero")
            elif base in have:
                self.configs[token] = TokenSource("model", model=base)
            else:
                self.average.add(tid)
        self._defaults: dict[str, dict[int, torch.Tensor]] = {}

    def _rows(self, label: str, name: str) -> torch.Tensor:
        return self.cks[label].get(name)

    def _dtype(self, name: str) -> torch.dtype:
        dtype = self.cks[self.base].info(name).dtype
        for ck in self.cks.values():
            dtype = torch.promote_types(dtype, ck.info(name).dtype)
        return dtype

    def defaults(self, name: str) -> dict[int, torch.Tensor]:
        """Output id -> the row every model without its own (or forced) gets, for tensor `name`."""
        if name in self._defaults:
            return self._defaults[name]
        dtype, rows = self._dtype(name), {label: self._rows(label, name) for label in self.cks}
        shape = rows[self.base].shape[1:]
        out: dict[int, torch.Tensor] = {}
        for tid, token in enumerate(self.tokens):
            cfg = self.configs.get(token)
            everyone = all(self.perms[label][tid] >= 0 for label in self.cks)
            if everyone and not (cfg is not None and cfg.force):
                continue
            if tid in self.average:
                have = [rows[label][self.perms[label][tid]].to(dtype) for label in self.cks if self.perms[label][tid] >= 0]
                total = torch.zeros(shape, dtype=dtype)
                for r in have:
                    total = total + r
                out[tid] = total / len(have)
            elif cfg is None:
                continue
            elif cfg.kind == "zero":
                out[tid] = torch.zeros(shape, dtype=dtype)
            elif cfg.kind == "model_token":
                assert cfg.model is not None
                src = cfg.token_id if cfg.token_id is not None else self.vocabs[cfg.model].ids[cfg.token or ""]
                out[tid] = rows[cfg.model][src].to(dtype)
            else:
                assert cfg.model is not None
                out[tid] = rows[cfg.model][self.perms[cfg.model][tid]].to(dtype)
        self._defaults[name] = out
        return out

    def aligned(self, label: str, name: str) -> torch.Tensor:
        own, p, defaults = self._rows(label, name), self.perms[label], self.defaults(name)
        new = torch.zeros((self.size, *own.shape[1:]), dtype=self._dtype(name))
        for tid, token in enumerate(self.tokens):
            cfg = self.configs.get(token)
            if p[tid] >= 0 and not (cfg is not None and cfg.force):
                new[tid] = own[p[tid]]
            elif tid in defaults:
                new[tid] = defaults[tid]
        if self.size > len(self.tokens):  # padding rows: the mean of the real ones
            new[len(self.tokens):] = new[: len(self.tokens)].mean(dim=0)
        return new

    def checkpoint(self, label: str) -> "AlignedCheckpoint":
        ck = self.cks[label]
        names = set(vocab_tensors(ck))
        tensors = {n: (TensorInfo(n, (self.size, *info.shape[1:]), self._dtype(n), info.shard) if n in names else info)
                   for n, info in ck.tensors.items()}
        config = dict(ck.config)
        config["vocab_size"] = self.size
        return AlignedCheckpoint(path=ck.path, config=config, tensors=tensors, inner=ck, aligner=self, label=label,
                                 vocab_names=names)


@dataclass
class AlignedCheckpoint(Checkpoint):
    """A model as a merge into another vocabulary reads it: its vocabulary tensors permuted (`_Aligner`)."""

    inner: Checkpoint | None = None
    aligner: _Aligner | None = None
    label: str = ""
    vocab_names: set[str] = field(default_factory=set)

    def get(self, name: str, device: str | torch.device | None = None) -> torch.Tensor:
        assert self.inner is not None and self.aligner is not None
        tensor = self.aligner.aligned(self.label, name) if name in self.vocab_names else self.inner.get(name)
        return tensor if device is None else tensor.to(device)
