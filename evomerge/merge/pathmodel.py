"""The in-memory model of a data-flow path, for the search: built in milliseconds, no tensor copied.

The model is the very transformers class the export loads into (same config: `num_hidden_layers` = path
length), built on the meta device, then every parameter is pointed at the source module's Parameter: a
layer used twice shares its tensors but gets its own layer objects, so its attention has its own
`layer_idx` and the KV cache works. Scales stay unfolded: a forward pre-hook multiplies the stream entering
each hop whose scale is not 1, so this model is the definition the folded export is tested against.
"""

from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn

from evomerge.checkpoints import CheckpointError, classify_tensor
from evomerge.checkpoints.arch import rename_layer
from evomerge.merge.dataflow import DataflowRecipe
from evomerge.merge.recipe import RecipeError


def load_source_modules(recipe: DataflowRecipe, device: str | torch.device = "cpu") -> dict[str, nn.Module]:
    """One float32 module per source: a checkpoint loaded as it is, or a PS merge materialised in memory."""
    from evomerge.checkpoints.hf import load_model
    from evomerge.merge.materialise import Materialiser

    out: dict[str, nn.Module] = {}
    for name, source in recipe.sources.items():
        if (ps := source.merge_recipe) is not None:
            anchor = ps.base_model or ps.model_labels()[0]
            mat = Materialiser(ps.paths, anchor, device)
            module = mat.build_module()
            mat.apply(ps, module)
        else:
            module = load_model(source.path, torch.float32, device)
        out[name] = module.eval()
    return out


def _layer_list(model: nn.Module) -> nn.ModuleList:
    for name, _ in model.named_parameters():
        role = classify_tensor(name)
        if role.kind == "layer":
            prefix = name[: name.index(f".{role.layer}.")]
            return model.get_submodule(prefix)  # type: ignore[return-value]
    raise CheckpointError(f"the {type(model).__name__} model has no parameter named like a layer ('...layers.N.', "
                          "'...h.N.'): a data-flow path needs a decoder with a layer list")


def _scale_stream(scale: float):
    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (args[0] * scale, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"] * scale}
    return hook


def build_path_model(recipe: DataflowRecipe, modules: Mapping[str, nn.Module]) -> nn.Module:
    """A causal LM whose layers are the path, sharing the tensors of `modules` (source name -> module)."""
    from transformers import AutoModelForCausalLM

    embed = modules[recipe.embed]
    config = copy.deepcopy(embed.config)
    types = getattr(config, "layer_types", None)
    if isinstance(types, list):
        config.layer_types = [(getattr(modules[h.model].config, "layer_types", None) or types)[h.layer] for h in recipe.path]
    config.num_hidden_layers = len(recipe.path)
    config.tie_word_embeddings = recipe.embed == recipe.head and bool(getattr(embed.config, "tie_word_embeddings", False))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=next(embed.parameters()).dtype)

    own = {n: dict(m.named_parameters(remove_duplicate=False)) | dict(m.named_buffers(remove_duplicate=False))
           for n, m in modules.items()}
    targets = list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False))
    for name, _ in targets:
        role = classify_tensor(name)
        if role.kind == "layer":
            hop = recipe.path[role.layer]  # type: ignore[index]
            source, source_name = hop.model, rename_layer(name, hop.layer)
        elif role.kind in ("final_norm", "head"):
            source, source_name = recipe.head, name
        else:  # embeddings, rotary tables and other model-level tensors
            source, source_name = recipe.embed, name
        tensor = own[source].get(source_name)
        if tensor is None:
            raise RecipeError(f"sources.{source}: has no tensor '{source_name}' (needed for the path model's '{name}'); "
                              "data-flow sources must share the embed source's architecture")
        owner_name, _, attr = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr] = tensor  # the source's Parameter object itself: shared, not copied
        else:
            owner._buffers[attr] = tensor
    layers = _layer_list(model)
    for t, hop in enumerate(recipe.path):
        if hop.scale != 1.0:
            layers[t].register_forward_pre_hook(_scale_stream(hop.scale), with_kwargs=True)
    model.eval()
    return model
