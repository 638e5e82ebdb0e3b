"""Resolve a recipe parameter to one value for one tensor, the way mergekit recipes mean it.

A parameter value in a recipe is one of:

- a scalar: `0.5` (or a bool for switches such as `normalize`);
- a gradient, a list of scalars: `[0.1, 0.5, 0.9]`, interpolated piecewise-linearly over the
  position `t` of the tensor in [0, 1] (anchors evenly spaced; bools pick the nearest anchor
  below instead of interpolating);
- a filtered list: `[{filter: self_attn, value: 0.3}, {filter: mlp, value: [0.2, 0.8]}, {value: 0.5}]`.
  The first entry whose `filter` is a substring of the tensor name wins; an entry without
  filter (or with filter `"*"`) matches every tensor. Its `value` is itself a scalar or a
  gradient. When no entry matches, the result is None: the caller falls through to the next,
  less specific place the parameter can be set (see `resolve_setting`).

Where `t` comes from (checked against mergekit 0.1.5, `mergekit/plan.py`, `MergePlanner.plan_slice`
and `plan_module`):

- A recipe with `models:` is one slice covering every layer, `layer_range: [0, num_layers]`.
- Layer tensors: `t = i / (n - 1)` where `i` is the layer's index *within its output slice*
  (0-based, counted from the start of `layer_range`) and `n` is the slice's number of layers.
  A slice of a single layer gets `t = 1`. So with several `slices`, every slice runs its own
  gradient from start to end; `t` does not depend on the layer's absolute index.
- Tensors outside the layers (embeddings, final norm, lm_head): `t = 0`, i.e. they take the
  first anchor of any gradient. Embeddings read their parameters from the first slice, the
  final norm and lm_head from the last slice.

Which name filters see (mergekit's `parameter_resolver.resolve_parameters`): parameters that
belong to one input model (weight, density, ...) are matched against that model's *input*
tensor name (with slices, the source layer's name, e.g. `model.layers.5.mlp.up_proj.weight`
for `layer_range: [4, 8]`); method-wide parameters (t, normalize, lambda, ...) against the
*output* tensor name. Precedence, most specific first: the source model's own `parameters`,
the slice's `parameters`, the module's, the recipe's top-level `parameters`, the method default.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Union

Scalar = Union[float, int, bool]
Setting = Union[Scalar, Sequence[Scalar], Sequence[Mapping[str, object]], Mapping[str, object]]


def layer_position(index_in_slice: int, slice_layers: int) -> float:
    """Gradient position `t` of a layer: index within its output slice over (slice layers - 1).

    A one-layer slice gets 1.0, as in mergekit.
    """
    if slice_layers <= 0 or not 0 <= index_in_slice < slice_layers:
        raise ValueError(
            f"layer index {index_in_slice} is outside a slice of {slice_layers} layers"
        )
    if slice_layers == 1:
        return 1.0
    return index_in_slice / (slice_layers - 1)


# Gradient position of tensors outside the layer stack (embeddings, final norm, lm_head).
NON_LAYER_POSITION = 0.0


def _is_scalar(value: object) -> bool:
    return isinstance(value, (bool, int, float))


def _numeric(value: object) -> object:
    """YAML 1.1 reads `1e-3` (no dot) as a string: accept numeric strings as floats."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"expected a number, got the string {value!r}") from None
    return value


def _interpolate(anchors: Sequence[Scalar], t: float) -> Scalar:
    """Piecewise-linear value of evenly spaced anchors at t in [0, 1]; bools pick an anchor."""
    if not anchors:
        raise ValueError("a gradient needs at least one value")
    last = len(anchors) - 1
    if any(isinstance(a, bool) for a in anchors):
        return anchors[int(t * last)]
    # Same arithmetic as mergekit, so gradient values agree to the last bit.
    scaled = t * last
    i0 = int(scaled)
    i1 = min(last, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * anchors[i0] + frac * anchors[i1]


def _matches(filter_: object, tensor_name: str) -> bool:
    return filter_ is None or filter_ == "*" or bool(tensor_name and str(filter_) in tensor_name)


def resolve_setting(value: Setting, tensor_name: str, t: float) -> float | bool | None:
    """Value of one recipe setting for tensor `tensor_name` at gradient position `t`.

    Returns None when `value` is a filtered list and no entry matches `tensor_name`; the caller
    then looks at the next, less specific level (model -> slice -> module -> top level ->
    method default), exactly as mergekit does. Raises ValueError for malformed values.
    """
    value = _numeric(value)  # type: ignore[assignment]
    if _is_scalar(value):
        return value  # type: ignore[return-value]
    if isinstance(value, Mapping):
        value = [value]
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(
            f"expected a number, a list of numbers or a list of {{filter, value}} entries, "
            f"got {value!r}"
        )
    if not value:
        return None
    if all(_is_scalar(v) or isinstance(v, str) for v in value):
        value = [_numeric(v) for v in value]
        return _interpolate(value, t)  # type: ignore[arg-type]
    for entry in value:
        if not isinstance(entry, Mapping) or "value" not in entry:
            raise ValueError(
                f"a filtered list needs entries like {{filter: <substring>, value: <number>}}, "
                f"got {entry!r}"
            )
        unknown = set(entry) - {"filter", "value"}
        if unknown:
            raise ValueError(
                f"unknown key(s) {sorted(unknown)} in filtered entry {entry!r}; "
                f"allowed: filter, value"
            )
        if _matches(entry.get("filter"), tensor_name):
            inner = entry["value"]
            if isinstance(inner, Mapping) or (
                isinstance(inner, (list, tuple)) and any(isinstance(v, (Mapping, list, tuple)) for v in inner)
            ):
                raise ValueError(f"a filtered entry's value must be a number or a list of numbers, got {inner!r}")
            return resolve_setting(inner, tensor_name, t)  # type: ignore[arg-type]
    return None
