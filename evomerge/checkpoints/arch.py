"""Map every tensor of a decoder-only checkpoint to its role: embeddings, layer i (and which module),
final norm, or head.

Naming families covered: Llama, Mistral, Qwen2/3, Gemma 1-3 (text), Phi-3 (fused qkv and gate_up) and
GPT-2 (with or without the `transformer.` prefix). The rules are name patterns plus the config, not a
table per model class, so close relatives (Yi, InternLM2-style renames aside) work unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Literal

Kind = Literal["embed", "layer", "final_norm", "head", "other"]
Module = Literal["attention", "mlp", "norm", "other"]

# `...layers.3.self_attn.q_proj.weight` (Llama family), `transformer.h.3.attn.c_attn.weight` (GPT-2).
_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks))\.(?P<index>\d+)\.(?P<rest>.+)$")
_EMBED = ("embed_tokens", "wte", "wpe", "word_embeddings", "embed_in", "position_embeddings")
_HEAD = ("lm_head", "embed_out")
_FINAL_NORM = ("norm", "ln_f", "final_layernorm", "final_norm")
# Projections that write into the residual stream (what DFS scale folding rescales).
_BLOCK_OUTPUTS = ("o_proj", "down_proj", "attn.c_proj", "mlp.c_proj", "dense_4h_to_h", "out_proj", "fc2")

KNOWN_FAMILIES = {
    "llama": "llama", "mistral": "llama", "qwen2": "llama", "qwen3": "llama", "yi": "llama",
    "gemma": "gemma", "gemma2": "gemma", "gemma3_text": "gemma",
    "phi3": "phi3",
    "gpt2": "gpt2",
}


@dataclass(frozen=True)
class TensorRole:
    kind: Kind
    layer: int | None = None
    module: Module | None = None
    block_output: bool = False  # writes into the residual stream (attention out / MLP down projection)

    @property
    def group(self) -> str:
        """The module filter group used by search spaces: attention, mlp or rest."""
        return self.module if self.module in ("attention", "mlp") else "rest"


def classify_tensor(name: str) -> TensorRole:
    m = _LAYER.match(name)
    if m:
        rest = m["rest"]
        if "norm" in rest or rest.startswith("ln_"):
            module: Module = "norm"
        elif "attn" in rest or "attention" in rest:
            module = "attention"
        elif "mlp" in rest or "feed_forward" in rest or "ffn" in rest:
            module = "mlp"
        else:
            module = "other"
        is_out = any(rest.startswith(p) or f".{p}." in f".{rest}" for p in _BLOCK_OUTPUTS)
        return TensorRole("layer", int(m["index"]), module, is_out)
    parts = name.split(".")
    if any(p in _EMBED for p in parts):
        return TensorRole("embed")
    if parts[0] in _HEAD:
        return TensorRole("head")
    if any(p in _FINAL_NORM for p in parts[:-1]):
        return TensorRole("final_norm")
    return TensorRole("other")


def rename_layer(name: str, new_index: int) -> str:
    """The same tensor name at another layer index (for slices and data-flow paths)."""
    m = _LAYER.match(name)
    if not m:
        raise ValueError(f"tensor '{name}' is not a layer tensor")
    return f"{m['prefix']}.{new_index}.{m['rest']}"


# The keys a config.json states its layer count under (Llama-style, GPT-2, others); multimodal configs nest them in
# `text_config`. `Architecture.from_config` is the one reader and `set_layer_count` the one writer.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def set_layer_count(config: dict[str, Any], n: int) -> None:
    """Write a merged model's layer count into its config (in place), under every key the config already uses:
    the top-level ones, else those of `text_config` (where `from_config` reads it)."""
    present = [k for k in LAYER_COUNT_KEYS if k in config]
    for key in present:
        config[key] = n
    if not present and isinstance(config.get("text_config"), dict):
        set_layer_count(config["text_config"], n)


def _first(config: dict[str, Any], *keys: str) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    text = config.get("text_config")
    if isinstance(text, dict):
        return _first(text, *keys)
    return None


@dataclass(frozen=True)
class Architecture:
    model_type: str
    family: str  # "llama", "gemma", "phi3", "gpt2" or "generic"
    num_layers: int
    hidden_size: int | None
    vocab_size: int | None
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: dict[str, Any], tensor_names: Iterable[str] = ()) -> "Architecture":
        model_type = str(config.get("model_type", "unknown"))
        num_layers = _first(config, *LAYER_COUNT_KEYS)
        if num_layers is None:
            raise ValueError("config.json has no layer count (num_hidden_layers / n_layer / num_layers)")
        names = list(tensor_names)
        has_head = any(classify_tensor(n).kind == "head" for n in names)
        tied = bool(config.get("tie_word_embeddings", False)) or (bool(names) and not has_head)
        return cls(
            model_type=model_type,
            family=KNOWN_FAMILIES.get(model_type, "generic"),
            num_layers=int(num_layers),
            hidden_size=_first(config, "hidden_size", "n_embd", "d_model"),
            vocab_size=_first(config, "vocab_size"),
            tied_embeddings=tied,
        )


def layer_tensors(names: Iterable[str], layer: int) -> list[str]:
    return [n for n in names if classify_tensor(n).layer == layer]
