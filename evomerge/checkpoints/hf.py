"""transformers loading with evomerge's security defaults, in one place: safetensors only, no custom code.

Every model or tokenizer evomerge builds from a folder goes through these functions, so no call site can forget
a flag: the folder must hold safetensors (`open_checkpoint` refuses pickle-only folders, with the conversion
command), a config that names custom code (`auto_map`) is refused before transformers could offer to run it, and
`trust_remote_code=False` and `use_safetensors=True` are always passed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from evomerge.checkpoints.io import CheckpointError, read_json
from evomerge.checkpoints.lora import AdaptedCheckpoint, open_checkpoint
from evomerge.checkpoints.targets import checkpoint_targets


def check_no_custom_code(folder: str | Path) -> None:
    """Refuse a model folder whose config or tokenizer config asks for Python code of its own (`auto_map`)."""
    for name in ("config.json", "tokenizer_config.json"):
        path = Path(folder) / name
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("auto_map"):
            raise CheckpointError(f"{path}: 'auto_map' names custom code ({', '.join(map(str, data['auto_map']))}); "
                                  "evomerge never runs a model folder's Python. Use a model of a transformers "
                                  "architecture, or convert it to one in a trusted environment")


def load_model(folder: str | Path, dtype: Any = None, device: str = "cpu") -> Any:
    """A causal LM from a model folder (safetensors, no custom code), on `device`."""
    from transformers import AutoModelForCausalLM

    ck = open_checkpoint(folder)  # safetensors only: a pickle-only folder is refused with the command to convert it
    check_no_custom_code(folder)
    kw = {"dtype": dtype} if dtype is not None else {}
    if not isinstance(ck, AdaptedCheckpoint):
        return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, use_safetensors=True, **kw).to(device)
    assert ck.base is not None and ck.adapter is not None  # MODEL+ADAPTER: the model, then the adapted tensors
    try:
        model = AutoModelForCausalLM.from_pretrained(ck.base.path, trust_remote_code=False, use_safetensors=True, **kw)
        targets = checkpoint_targets(model, sorted(ck.adapter.targets()))  # checkpoint name -> the module's tensor
        with torch.no_grad():
            for name, tensor in targets.items():
                tensor.copy_(ck.get(name))
    finally:
        ck.close()
    return model.to(device)


def load_tokenizer(folder: str | Path) -> Any:
    """The folder's tokenizer (no custom code)."""
    from transformers import AutoTokenizer

    check_no_custom_code(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):  # transformers' own error would be a JSON traceback
        path = Path(folder) / name
        if path.is_file():
            read_json(path, "restore the model's tokenizer files")
    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{folder}: its tokenizer cannot be loaded ({first}); a model folder needs its "
                              "tokenizer files (tokenizer.json or the slow tokenizer's) beside config.json") from None


def check_loadable(config: dict[str, Any], shapes: dict[str, tuple[int, ...]], where: str) -> None:
    """Refuse, before anything is written, tensors that transformers could not load under `config`: the model is
    built on the meta device (no memory) and every tensor must have a place of its shape, every weight a tensor.
    `where`: what is being written, for the message."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.checkpoints.targets import checkpoint_targets

    cfg_data = {k: v for k, v in config.items() if k not in ("architectures", "auto_map")}
    model_type = cfg_data.pop("model_type", None)
    try:
        cfg = AutoConfig.for_model(model_type, **cfg_data)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: transformers cannot build a model from its config.json ({e}); the inputs' "
                              "config.json must name a transformers architecture") from None
    try:
        targets = checkpoint_targets(model, shapes)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: would not load: {e}") from None
    for name, shape in shapes.items():
        want = tuple(targets[name].shape)
        if tuple(shape) != want:
            raise CheckpointError(f"{where}: would not load: tensor '{name}' has shape {list(shape)}, its config.json "
                                  f"makes it {list(want)}; the inputs' config.json does not describe their weights "
                                  "(hidden_size, num_attention_heads, intermediate_size, vocab_size)")
    have = {id(t) for t in targets.values()}
    missing = [n for n, p in model.named_parameters() if id(p) not in have]
    if missing:
        raise CheckpointError(f"{where}: would not load: no tensor for the model's '{missing[0]}' "
                              f"({len(missing)} missing); the inputs lack weights their config.json asks for")
