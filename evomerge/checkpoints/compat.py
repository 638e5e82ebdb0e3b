"""Check that models can be merged tensor by tensor, and report every mismatch at once."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

from evomerge.checkpoints.arch import Architecture
from evomerge.checkpoints.io import Checkpoint, read_json
from evomerge.errors import UserError


class IncompatibleModelsError(UserError, ValueError):
    """Models differ in ways a parameter-space merge cannot bridge. The message lists every difference."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        body = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"the models cannot be merged ({len(problems)} mismatch{'es' if len(problems) > 1 else ''}):\n{body}\n"
            "Merge only fine-tunes of one base model (same architecture, sizes and tokenizer)."
        )


def tokenizer_vocab(folder: Path) -> dict[str, int] | None:
    """The token -> id map from tokenizer.json, or None if the folder has no fast tokenizer."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    data = read_json(path, "restore the model's tokenizer.json (or delete it to use its other tokenizer files)")
    model = data.get("model", {}) if isinstance(data, dict) else {}
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, list):  # unigram tokenizers store [token, score] pairs
        return {tok: i for i, (tok, _) in enumerate(vocab)}
    return vocab if isinstance(vocab, dict) else None


def check_compatible(models: Mapping[str, Checkpoint], same_layer_count: bool = True) -> None:
    """Raise IncompatibleModelsError listing every difference in tensor names, shapes, kinds of dtype,
    hidden size, vocabulary and (when `same_layer_count`) layer count. The first model is the reference."""
    labels = list(models)
    if len(labels) < 2:
        return
    ref_label, ref = labels[0], models[labels[0]]
    ref_arch = Architecture.from_config(ref.config, ref.names())
    ref_vocab = tokenizer_vocab(ref.path)
    problems: list[str] = []
    for label in labels[1:]:
        ck = models[label]
        arch = Architecture.from_config(ck.config, ck.names())
        who = f"{label} vs {ref_label}"
        if arch.hidden_size != ref_arch.hidden_size:
            problems.append(f"{who}: hidden size {arch.hidden_size} != {ref_arch.hidden_size} (config.json)")
        if arch.vocab_size != ref_arch.vocab_size:
            problems.append(f"{who}: vocab_size {arch.vocab_size} != {ref_arch.vocab_size} (config.json; a recipe merges "
                            "different vocabularies with `tokenizer_source: union` or a `tokenizer:` block)")
        if same_layer_count and arch.num_layers != ref_arch.num_layers:
            problems.append(
                f"{who}: {arch.num_layers} layers != {ref_arch.num_layers} "
                "(use `slices` with equal layer_range lengths to merge parts of models)"
            )
        vocab = tokenizer_vocab(ck.path)
        if ref_vocab is not None and vocab is not None and vocab != ref_vocab:
            diff = len(set(vocab.items()) ^ set(ref_vocab.items()))
            problems.append(f"{who}: tokenizers differ ({diff} token/id pairs not shared; tokenizer.json)")
        if not same_layer_count:
            continue  # tensor sets legitimately differ with layer counts; slices are checked per tensor
        missing = sorted(set(ref.tensors) - set(ck.tensors))
        extra = sorted(set(ck.tensors) - set(ref.tensors))
        if missing:
            problems.append(f"{label}: lacks {len(missing)} tensor(s) of {ref_label}: {_short(missing)}")
        if extra:
            problems.append(f"{label}: has {len(extra)} tensor(s) {ref_label} lacks: {_short(extra)}")
        for name in sorted(set(ref.tensors) & set(ck.tensors)):
            a, b = ck.tensors[name], ref.tensors[name]
            if a.shape != b.shape:
                problems.append(f"{who}: tensor '{name}' has shape {list(a.shape)} != {list(b.shape)}")
            elif a.dtype.is_floating_point != b.dtype.is_floating_point:
                problems.append(f"{who}: tensor '{name}' has dtype {a.dtype} != {b.dtype}")
    if problems:
        raise IncompatibleModelsError(problems)


def _short(names: list[str], n: int = 4) -> str:
    head = ", ".join(names[:n])
    return head + (f", ... (+{len(names) - n} more)" if len(names) > n else "")
