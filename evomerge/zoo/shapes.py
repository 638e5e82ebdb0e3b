"""Real model shapes without real weights: header-only checkpoints and random-initialised families.

The memory plan reads only configs and safetensors headers, so a checkpoint whose header is real and whose data
is a hole in a sparse file (`write_header_only`) plans exactly like the real model and costs no disk: what the
tests and README use for Mistral-7B, Llama-3-8B and Llama-3-70B. `write_random_family` writes a base and its
"fine-tunes" (the base plus small noise) with real data, for benchmarks that must touch every byte at sizes up
to about 1B parameters.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any, Iterator

import torch

# config.json fields of public models (their published configs), enough for transformers to build them.
SHAPES: dict[str, dict[str, Any]] = {
    "mistral-7b": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
                   "rope_theta": 10000.0, "rms_norm_eps": 1e-5, "sliding_window": 4096, "tie_word_embeddings": False,
                   "hidden_act": "silu", "torch_dtype": "bfloat16"},
    "llama-3-8b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
                   "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
                   "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
                   "torch_dtype": "bfloat16"},
    "llama-3-70b": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
                    "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
                    "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
                    "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "hidden_act": "silu",
                    "torch_dtype": "bfloat16"},
}
_ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}


def llama_config(hidden: int, layers: int, intermediate: int | None = None, heads: int | None = None,
                 kv_heads: int | None = None, vocab: int = 32000, dtype: str = "bfloat16") -> dict[str, Any]:
    """A Llama-family config of the given size (heads of 128 dimensions, 4 query heads per key/value head)."""
    heads = heads or max(1, hidden // 128)
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
            "intermediate_size": intermediate or int(hidden * 3.5) // 256 * 256, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": kv_heads or max(1, heads // 4),
            "vocab_size": vocab, "max_position_embeddings": 4096, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False, "hidden_act": "silu", "torch_dtype": dtype}


def llama_tensors(config: dict[str, Any]) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every tensor of a Llama-family checkpoint, in checkpoint order."""
    h, i, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim
    yield "model.embed_tokens.weight", (v, h)
    for n in range(config["num_hidden_layers"]):
        p = f"model.layers.{n}."
        yield p + "self_attn.q_proj.weight", (config["num_attention_heads"] * head_dim, h)
        yield p + "self_attn.k_proj.weight", (kv, h)
        yield p + "self_attn.v_proj.weight", (kv, h)
        yield p + "self_attn.o_proj.weight", (h, config["num_attention_heads"] * head_dim)
        yield p + "mlp.gate_proj.weight", (i, h)
        yield p + "mlp.up_proj.weight", (i, h)
        yield p + "mlp.down_proj.weight", (h, i)
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
    yield "model.norm.weight", (h,)
    if not config.get("tie_word_embeddings"):
        yield "lm_head.weight", (v, h)


def _shards(config: dict[str, Any], item: int, shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in llama_tensors(config):
        nbytes = math.prod(shape) * item
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _write_index(folder: Path, names: list[list[str]], total: int) -> None:
    if len(names) == 1:
        return
    files = [f"model-{k + 1:05d}-of-{len(names):05d}.safetensors" for k in range(len(names))]
    weight_map = {n: f for f, shard in zip(files, names) for n in shard}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))


def _shard_name(k: int, count: int) -> str:
    return "model.safetensors" if count == 1 else f"model-{k + 1:05d}-of-{count:05d}.safetensors"


def write_header_only(folder: str | Path, config: dict[str, Any], dtype: torch.dtype = torch.bfloat16,
                      shard_bytes: int = 5 * 10**9) -> Path:
    """A checkpoint folder with a real config and real safetensors headers whose data regions are holes (a sparse
    file: no disk used). Plans and header readers see the real model; reading a tensor gives zeros."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    item = torch.empty((), dtype=dtype).element_size()
    shards = _shards(config, item, shard_bytes)
    total = 0
    for k, shard in enumerate(shards):
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in shard:
            nbytes = math.prod(shape) * item
            header[name] = {"dtype": _ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / _shard_name(k, len(shards)), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # the data: a hole
        total += offset
    _write_index(folder, [[n for n, _ in s] for s in shards], total)
    return folder


def write_random_family(root: str | Path, config: dict[str, Any], experts: int = 3, dtype: torch.dtype = torch.bfloat16,
                        seed: int = 0, noise: float = 0.1, shard_bytes: int = 10**9,
                        device: str | torch.device = "cpu") -> dict[str, Path]:
    """A random-initialised base (normal, std 0.02; norms 1) and `experts` "fine-tunes" (the base plus normal noise
    of `noise` x its scale) in `root`/base, `root`/e1..: real data, generated on `device` (a GPU makes a 7B family
    in seconds) and written tensor by tensor (`write_shards`: one shard in memory at a time). Returns name ->
    folder. Models already there (a config.json present) are kept."""
    from evomerge.checkpoints.io import write_shards

    root = Path(root)
    names = ["base"] + [f"e{i + 1}" for i in range(experts)]
    out = {n: root / n for n in names}

    def tensors(k: int):  # model k: 0 the base, i the i-th expert; every tensor drawn from its own seed
        for j, (name, shape) in enumerate(llama_tensors(config)):
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + j)
            t = torch.ones(shape, device=device) if len(shape) == 1 else torch.randn(shape, generator=gen, device=device) * 0.02
            if k:
                gen.manual_seed((seed * 1_000_003 + j) * 31 + k)
                t += torch.randn(shape, generator=gen, device=device) * (noise * 0.02)
            yield name, t.to(dtype)

    for k, (model, folder) in enumerate(out.items()):
        if (folder / "config.json").is_file():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        write_shards(folder, tensors(k), shard_bytes)
        (folder / "config.json").write_text(json.dumps(config, indent=1))  # last: a folder with it is complete
    return out
