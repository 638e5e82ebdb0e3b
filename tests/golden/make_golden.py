"""Regenerate the mergekit parity goldens under tests/golden/ (run only when changing cases).

mergekit (LGPL) is a peer we compare with, never a dependency, so it lives in its own venv:

    python3 -m venv .venv-mergekit
    .venv-mergekit/bin/pip install torch==2.13.0
    .venv-mergekit/bin/pip install mergekit==0.1.5
    .venv-mergekit/bin/python tests/golden/make_golden.py

What it writes (about 0.6 MB, committed):

- models/{base,a,b,c}/: tiny random Llamas (hidden 16, 4 layers, vocab 32, fp32) saved as HF
  folders (config.json + model.safetensors). a, b, c are the base plus seeded noise on every
  tensor, norms included, so every tensor has a non-trivial task vector.
- <case>/recipe.yaml: a mergekit recipe whose model paths are relative to the recipe's folder.
- <case>/merged.safetensors: what `mergekit-yaml recipe.yaml OUT` (run from <case>/, CPU) produced: fp32,
  and for the <case>_fp16 / <case>_bf16 copies of some cases (HALF_CASES) in that dtype.

tests/test_mergekit_parity.py runs our engine on each recipe.yaml and compares every tensor.
Only deterministic methods have cases: the random ones (dare_*, della*) cannot match bit for
bit, and are tested against their formulas in tests/test_methods.py instead. (arcee_fusion samples only
tensors above 10^6 entries; these have at most 512.)

`make_golden.py NAME...` writes only the named cases (the models are rewritten either way, byte for byte
the same: they come from a fixed seed).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
MODELS = HERE / "models"
MERGEKIT_YAML = Path(sys.executable).parent / "mergekit-yaml"

LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 16,
    "intermediate_size": 32,
    "num_hidden_layers": 4,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "vocab_size": 32,
    "max_position_embeddings": 64,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "bos_token_id": 1,
    "eos_token_id": 2,
    "dtype": "float32",
}


def llama_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        shapes.update(
            {
                p + "self_attn.q_proj.weight": (h, h),
                p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h),
                p + "self_attn.o_proj.weight": (h, h),
                p + "mlp.gate_proj.weight": (i, h),
                p + "mlp.up_proj.weight": (i, h),
                p + "mlp.down_proj.weight": (h, i),
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
            }
        )
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def make_models() -> None:
    gen = torch.Generator().manual_seed(1234)
    shapes = llama_shapes(LLAMA_CONFIG)
    base = {
        name: (1.0 + 0.1 * torch.randn(shape, generator=gen))
        if len(shape) == 1
        else 0.2 * torch.randn(shape, generator=gen)
        for name, shape in shapes.items()
    }
    models = {"base": base}
    for name, scale in (("a", 0.05), ("b", 0.08), ("c", 0.03)):
        models[name] = {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in base.items()}
    for name, tensors in models.items():
        folder = MODELS / name
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(LLAMA_CONFIG, indent=2) + "\n")
        save_file({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors", metadata={"format": "pt"})


def m(name: str) -> str:
    return f"../models/{name}"


ATTN_MLP_WEIGHT = [
    {"filter": "self_attn", "value": 0.7},
    {"filter": "mlp", "value": [0.2, 0.9]},
    {"value": 0.5},
]

CASES: dict[str, dict] = {
    "linear": {
        "merge_method": "linear",
        "models": [
            {"model": m("a"), "parameters": {"weight": 0.5}},
            {"model": m("b"), "parameters": {"weight": [0.1, 0.6, 0.3]}},
            {"model": m("c"), "parameters": {"weight": ATTN_MLP_WEIGHT}},
        ],
        "dtype": "float32",
    },
    "linear_unnormalized": {
        "merge_method": "linear",
        "models": [
            {"model": m("a"), "parameters": {"weight": 0.6}},
            {"model": m("b"), "parameters": {"weight": 0.3}},
        ],
        "parameters": {"normalize": False},
        "dtype": "float32",
    },
    "task_arithmetic": {
        "merge_method": "task_arithmetic",
        "base_model": m("base"),
        "models": [
            {"model": m("a"), "parameters": {"weight": 0.8}},
            {"model": m("b"), "parameters": {"weight": [0.2, 1.0]}},
            {"model": m("c"), "parameters": {"weight": -0.3}},
        ],
        "parameters": {"lambda": 0.9},
        "dtype": "float32",
    },
    "ties": {
        "merge_method": "ties",
        "base_model": m("base"),
        "models": [
            {"model": m("a"), "parameters": {"weight": ATTN_MLP_WEIGHT, "density": [0.2, 0.5, 0.9]}},
            {"model": m("b"), "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": m("c"), "parameters": {"weight": [{"filter": "embed", "value": 1.0}, {"value": 0.3}]}},
        ],
        # top level: the density of models that set none (c)
        "parameters": {"density": [0.7, 0.3]},
        "dtype": "float32",
    },
    "ties_unnormalized": {
        "merge_method": "ties",
        "base_model": m("base"),
        "models": [
            {"model": m("a"), "parameters": {"weight": 0.7, "density": 0.4}},
            {"model": m("b"), "parameters": {"weight": 0.5, "density": 0.6}},
            {"model": m("c"), "parameters": {"weight": 0.4, "density": 0.5}},
        ],
        "parameters": {"normalize": False, "lambda": 1.2},
        "dtype": "float32",
    },
    "breadcrumbs": {
        "merge_method": "breadcrumbs",
        "base_model": m("base"),
        "models": [
            {"model": m("a"), "parameters": {"weight": 0.6, "density": 0.7, "gamma": 0.1}},
            {"model": m("b"), "parameters": {"weight": 0.4, "density": [0.5, 0.9], "gamma": 0.05}},
        ],
        "dtype": "float32",
    },
    "breadcrumbs_ties": {
        "merge_method": "breadcrumbs_ties",
        "base_model": m("base"),
        "models": [
            {"model": m("a"), "parameters": {"weight": 0.6, "density": 0.6}},
            {"model": m("b"), "parameters": {"weight": 0.4, "density": 0.8}},
            {"model": m("c"), "parameters": {"weight": 0.5, "density": 0.5}},
        ],
        "parameters": {"gamma": 0.1, "normalize": True},
        "dtype": "float32",
    },
    "slerp": {
        "merge_method": "slerp",
        "base_model": m("base"),
        "models": [{"model": m("base")}, {"model": m("b")}],
        "parameters": {
            "t": [
                {"filter": "self_attn", "value": [0.0, 0.5, 0.3, 0.7, 1.0]},
                {"filter": "mlp", "value": [1.0, 0.5, 0.7, 0.3, 0.0]},
                {"value": 0.4},
            ]
        },
        "dtype": "float32",
    },
    "nuslerp": {
        "merge_method": "nuslerp",
        "base_model": m("base"),
        "models": [
            {"model": m("a"), "parameters": {"weight": 0.3}},
            {"model": m("b"), "parameters": {"weight": [0.9, 0.4]}},
        ],
        "dtype": "float32",
    },
    "model_stock": {
        "merge_method": "model_stock",
        "base_model": m("base"),
        "models": [{"model": m("a")}, {"model": m("b")}, {"model": m("c")}],
        "dtype": "float32",
    },
    # The seven methods mergekit 0.1.5 added to the table (issue 15): one case each, multislerp also without base.
    "multislerp": {
        "merge_method": "multislerp",
        "base_model": m("base"),
        "models": [
            {"model": m("a"), "parameters": {"weight": 0.4}},
            {"model": m("b"), "parameters": {"weight": [0.2, 0.9]}},
            {"model": m("c"), "parameters": {"weight": ATTN_MLP_WEIGHT}},
        ],
        "dtype": "float32",
    },
    "multislerp_nobase": {
        "merge_method": "multislerp",
        "models": [
            {"model": m("a"), "parameters": {"weight": 0.3}},
            {"model": m("b"), "parameters": {"weight": 0.6}},
        ],
        "parameters": {"normalize_weights": False},
        "dtype": "float32",
    },
    # The base is not listed: mergekit adds it to the sources and karcher averages it in.
    "karcher": {
        "merge_method": "karcher",
        "base_model": m("base"),
        "models": [{"model": m("a")}, {"model": m("b")}],
        "parameters": {"max_iter": 20, "tol": 1e-6},
        "dtype": "float32",
    },
    "sce": {
        "merge_method": "sce",
        "base_model": m("base"),
        "models": [{"model": m("a")}, {"model": m("b")}, {"model": m("c")}],
        "parameters": {"select_topk": [0.3, 0.8]},
        "dtype": "float32",
    },
    "nearswap": {
        "merge_method": "nearswap",
        "base_model": m("base"),
        "models": [{"model": m("b")}],
        "parameters": {"t": [0.01, 0.1]},
        "dtype": "float32",
    },
    "arcee_fusion": {
        "merge_method": "arcee_fusion",
        "base_model": m("base"),
        "models": [{"model": m("a")}],
        "dtype": "float32",
    },
    # epsilon near the deltas' spread, so that entries changed by one model, by several and by none all occur.
    "ram": {
        "merge_method": "ram",
        "base_model": m("base"),
        "models": [{"model": m("a")}, {"model": m("b")}, {"model": m("c")}],
        "parameters": {"epsilon": 0.05},
        "dtype": "float32",
    },
    "ramplus_tl": {
        "merge_method": "ramplus_tl",
        "base_model": m("base"),
        "models": [{"model": m("a")}, {"model": m("b")}, {"model": m("c")}],
        "parameters": {"epsilon": 0.06, "r": 0.5, "alpha": 0.3},
        "dtype": "float32",
    },
    # Two output slices: each runs its own gradient (t restarts at 0 in every slice) and the
    # second reads source layers 1-2 of a, so filters see input names that differ from outputs.
    "slices_ties": {
        "merge_method": "ties",
        "base_model": m("base"),
        "slices": [
            {
                "sources": [
                    {"model": m("base"), "layer_range": [0, 2]},
                    {"model": m("a"), "layer_range": [0, 2], "parameters": {"weight": [0.3, 0.9]}},
                    {"model": m("b"), "layer_range": [0, 2], "parameters": {"weight": 0.5}},
                ],
                "parameters": {"density": [0.3, 0.8]},
            },
            {
                "sources": [
                    {"model": m("base"), "layer_range": [2, 4]},
                    {"model": m("a"), "layer_range": [1, 3], "parameters": {"weight": [{"filter": "layers.1.", "value": 1.0}, {"value": 0.2}]}},
                    {"model": m("b"), "layer_range": [2, 4], "parameters": {"weight": [0.6, 0.1]}},
                ],
                "parameters": {"density": 0.6},
            },
        ],
        "parameters": {"density": 0.9},
        "dtype": "float32",
    },
}

# Half precision (issue 15): the same recipes in float16 and bfloat16, which mergekit computes in that dtype.
# tests/test_mergekit_parity.py runs them with compute_dtype: recipe, and checks that the default float32
# compute is nearer the float32 golden than mergekit's half-precision numbers are.
HALF_PRECISION = {"float16": "fp16", "bfloat16": "bf16"}
HALF_CASES = ["linear", "task_arithmetic", "ties", "breadcrumbs_ties", "slerp", "nuslerp", "model_stock", "multislerp",
              "karcher", "sce", "nearswap", "arcee_fusion", "ram", "ramplus_tl"]
for _case in HALF_CASES:
    for _dtype, _suffix in HALF_PRECISION.items():
        CASES[f"{_case}_{_suffix}"] = {**CASES[_case], "dtype": _dtype}


def run_case(name: str, recipe: dict) -> None:
    folder = HERE / name
    folder.mkdir(exist_ok=True)
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False, default_flow_style=None))
    with tempfile.TemporaryDirectory() as out:
        subprocess.run(
            [str(MERGEKIT_YAML), "recipe.yaml", out, "--quiet", "--no-cuda", "--no-copy-tokenizer"],
            cwd=folder,
            check=True,
        )
        shards = sorted(Path(out).glob("*.safetensors"))
        merged: dict[str, torch.Tensor] = {}
        for shard in shards:
            merged.update(load_file(shard))
    save_file({k: v.contiguous() for k, v in sorted(merged.items())}, folder / "merged.safetensors")
    print(f"{name}: {len(merged)} tensors")


def main() -> None:
    if not MERGEKIT_YAML.exists():
        sys.exit(f"{MERGEKIT_YAML} not found: run this with the mergekit venv's python (see the docstring)")
    if MODELS.exists():
        shutil.rmtree(MODELS)
    make_models()
    only = set(sys.argv[1:])
    for name, recipe in CASES.items():
        if not only or name in only:
            run_case(name, recipe)


if __name__ == "__main__":
    main()
