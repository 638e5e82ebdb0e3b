"""LoRA adapters (peft's safetensors format) applied to a base checkpoint, tensor by tensor.

An adapter of rank r on a d_out x d_in matrix is two factors, B (d_out x r) and A (r x d_in): the adapted weight
is W + s * B @ A with s = alpha / r (alpha / sqrt(r) with rsLoRA). `AdaptedCheckpoint` keeps the base's tensors on
disk and the factors in memory, and expands one tensor's product only when that tensor is read, so an adapter
costs 2rd per matrix, never d^2 (a dense delta per tensor exists only while it is being added).

What peft writes, and what is read here (keys carry peft's `base_model.model.` prefix):
- `X.lora_A.weight`, `X.lora_B.weight`: the factors of linear layer X (target tensor `X.weight`);
- `X.lora_embedding_A`, `X.lora_embedding_B`: an embedding's factors (its delta is (B @ A) transposed);
- `X.base_layer.weight` or `X.weight` (modules_to_save, saved embedding layers): a full replacement of `X.weight`.
Refused, each with what to do: DoRA, LoRA biases, other peft types, layer replication, trainable token indices.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from evomerge.checkpoints.io import PICKLE_SUFFIXES, Checkpoint, CheckpointError, open_folder, read_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTED_NOTE = "evomerge_adapted.json"  # in an adapted folder (refs.adapted_folder): {"model": dir, "adapter": dir}
_PREFIX = "base_model.model."
_FACTOR_SUFFIXES = {".lora_A.weight": ("A", False), ".lora_B.weight": ("B", False),
                    ".lora_embedding_A": ("A", True), ".lora_embedding_B": ("B", True)}


def is_adapter(folder: Path) -> bool:
    return (Path(folder) / ADAPTER_CONFIG).is_file()


@dataclass
class Factors:
    """One target tensor's low-rank update: delta = scale * B @ A (transposed for embeddings and fan_in_fan_out)."""

    a: str  # keys in the adapter file
    b: str
    scale: float
    transpose: bool


@dataclass
class LoraAdapter:
    """A peft LoRA adapter folder, read lazily: factor and replacement keys by target tensor name."""

    path: Path
    config: dict[str, Any]
    factors: dict[str, Factors]
    replaced: dict[str, str]  # target tensor -> key of its full replacement
    shapes: dict[str, tuple[int, ...]]
    _handle: Any = field(default=None, repr=False)

    def tensor(self, key: str) -> torch.Tensor:
        if self._handle is None:
            self._handle = safe_open(str(self.path / ADAPTER_WEIGHTS), framework="pt", device="cpu")
        return self._handle.get_tensor(key)

    def targets(self) -> set[str]:
        return set(self.factors) | set(self.replaced)

    @property
    def num_bytes(self) -> int:
        return (self.path / ADAPTER_WEIGHTS).stat().st_size


def apply_lora(tensor: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float, transpose: bool) -> torch.Tensor:
    """`tensor` + scale * B @ A (transposed for embeddings and fan_in_fan_out), added in float32 and returned in
    `tensor`'s dtype: the one place an adapter's update is made, so reading an adapted folder and a search
    worker's resident factors give the same numbers."""
    delta = (b.float() @ a.float()) * scale
    return (tensor.float() + (delta.T if transpose else delta)).to(tensor.dtype)


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern: a key matches a module whose dotted name ends with it (as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


_REFUSED = {"use_dora": "DoRA adapters (use_dora: true) are not supported; merge it with peft's merge_and_unload "
                        "and give the merged model's folder",
            "layer_replication": "adapters with layer_replication are not supported",
            "trainable_token_indices": "adapters with trainable_token_indices are not supported; merge it with "
                                       "peft's merge_and_unload and give the merged model's folder"}


def open_adapter(folder: str | Path) -> LoraAdapter:
    """Read an adapter folder's config and its weights' header (no tensor data). Errors name the file and key."""
    folder = Path(folder)
    config_path = folder / ADAPTER_CONFIG
    config = read_json(config_path, "restore the adapter's adapter_config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path}: not a peft adapter config (a JSON object)")
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickles = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{folder}: the adapter holds only pickle weights ({', '.join(pickles)}), which evomerge refuses "
                "(loading a pickle runs code). Convert it once, in a trusted environment: python -c \"import torch; "
                "from safetensors.torch import save_file; save_file(torch.load('"
                f"{folder / pickles[0]}', weights_only=True), '{weights}')\"")
        raise CheckpointError(f"{folder}: no {ADAPTER_WEIGHTS} beside {ADAPTER_CONFIG}")
    kind = config.get("peft_type", "LORA")
    if kind != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {kind!r}: only LoRA adapters are supported")
    for key, why in _REFUSED.items():
        if config.get(key):
            raise CheckpointError(f"{config_path}: {key}: {why}")
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        raise CheckpointError(f"{config_path}: bias: adapters that train biases are not supported (bias must be 'none')")

    with safe_open(str(weights), framework="pt", device="cpu") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
    parts: dict[str, dict[str, Any]] = {}
    replaced: dict[str, str] = {}
    for key in keys:
        name = key.removeprefix(_PREFIX)
        if "lora_magnitude_vector" in name:
            raise CheckpointError(f"{weights}: {key}: a DoRA magnitude; {_REFUSED['use_dora']}")
        for suffix, (which, embedding) in _FACTOR_SUFFIXES.items():
            if name.endswith(suffix):
                module = name[: -len(suffix)]
                parts.setdefault(module, {"embedding": embedding})[which] = key
                break
        else:
            if ".lora_" in name:
                raise CheckpointError(f"{weights}: {key}: a LoRA tensor of a kind evomerge does not know")
            replaced[name.replace(".base_layer.", ".")] = key
    r_default, alpha_default = config.get("r", 8), config.get("lora_alpha", 8)
    factors: dict[str, Factors] = {}
    for module, p in parts.items():
        if "A" not in p or "B" not in p:
            raise CheckpointError(f"{weights}: module '{module}' has only one of its two LoRA factors")
        r = shapes[p["A"]][0]
        if _pattern_value(config.get("rank_pattern", {}), module, r_default) != r:
            raise CheckpointError(f"{weights}: module '{module}' has rank {r}, its config says otherwise")
        alpha = float(_pattern_value(config.get("alpha_pattern", {}), module, alpha_default))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        transpose = bool(p["embedding"]) or bool(config.get("fan_in_fan_out", False))  # as peft's delta
        factors[f"{module}.weight"] = Factors(p["A"], p["B"], scale, transpose)
    if not factors and not replaced:
        raise CheckpointError(f"{weights}: the adapter holds no LoRA factors")
    return LoraAdapter(folder, config, factors, replaced, shapes)


def check_adapter(adapter: LoraAdapter, base: Checkpoint) -> None:
    """Every target the adapter changes exists in the base with the adapter's shapes; one error lists them all."""
    problems = []
    for target, f in adapter.factors.items():
        if target not in base:
            problems.append(f"'{target}' is not in the base")
            continue
        a, b = adapter.shapes[f.a], adapter.shapes[f.b]
        out_in = (a[1], b[0]) if f.transpose else (b[0], a[1])
        if base.info(target).shape != out_in:
            problems.append(f"'{target}': the base has {list(base.info(target).shape)}, the adapter's factors make "
                            f"{list(out_in)}")
    for target, key in adapter.replaced.items():
        if target not in base:
            problems.append(f"'{target}' (saved whole) is not in the base")
        elif base.info(target).shape != adapter.shapes[key]:
            problems.append(f"'{target}' (saved whole): the base has {list(base.info(target).shape)}, the adapter "
                            f"{list(adapter.shapes[key])} (a resized vocabulary is not supported)")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
        trained_on = adapter.config.get("base_model_name_or_path")
        raise CheckpointError(f"{adapter.path}: this adapter does not fit the model {base.path} "
                              f"({len(problems)} mismatch(es): {shown})"
                              + (f"; it was trained on '{trained_on}'" if trained_on else ""))


@dataclass
class AdaptedCheckpoint(Checkpoint):
    """A base checkpoint with a LoRA adapter applied as its tensors are read. `path` is the folder that stands for
    the pair (`refs.adapted_folder`: config and tokenizer files, no weights); tensors come from `base`."""

    base: Checkpoint | None = None
    adapter: LoraAdapter | None = None

    def get(self, name: str, device: str | torch.device | None = None) -> torch.Tensor:
        assert self.base is not None and self.adapter is not None
        if name in self.adapter.replaced:
            tensor = self.adapter.tensor(self.adapter.replaced[name]).to(self.info(name).dtype)
        else:
            tensor = self.base.get(name)
        f = self.adapter.factors.get(name)
        if f is not None:
            tensor = apply_lora(tensor, self.adapter.tensor(f.a), self.adapter.tensor(f.b), f.scale, f.transpose)
        return tensor if device is None else tensor.to(device)

    def close(self) -> None:
        if self.base is not None:
            self.base.close()
        if self.adapter is not None:
            self.adapter._handle = None


def open_adapted(folder: Path) -> AdaptedCheckpoint:
    """An adapted folder (`refs.adapted_folder`) as a checkpoint: the model's tensors with the adapter applied."""
    note = read_json(Path(folder) / ADAPTED_NOTE, "remove the folder; evomerge makes it again")
    try:
        model, adapter = Path(note["model"]), Path(note["adapter"])
    except (TypeError, KeyError):
        raise CheckpointError(f"{folder}: not an adapted folder evomerge wrote; remove it") from None
    base, lora = open_folder(model), open_adapter(adapter)
    check_adapter(lora, base)
    return AdaptedCheckpoint(path=Path(folder), config=base.config, tensors=dict(base.tensors), base=base, adapter=lora)


def open_checkpoint(path: str | Path) -> Checkpoint:
    """Open a model folder (config.json and safetensors headers, no tensor data), or an adapted folder as the
    model with its adapter applied."""
    if (Path(path).expanduser() / ADAPTED_NOTE).is_file():
        return open_adapted(Path(path).expanduser())
    return open_folder(path)
