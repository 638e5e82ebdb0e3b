"""The plumbing every YAML reader shares (recipes, data-flow recipes, objectives, search spaces, job specs).

One rule each, so that every file type reports errors and resolves paths the same way:

- `read_yaml`: a missing file or a syntax error names the file.
- `Where`: messages read `FILE: field.path: what is wrong; what to do`, raised as the file type's own error class.
- `suggest`: the one "did you mean" format, ` Did you mean 'x'?` (else ` Known: a, b.`).
- `check_keys`: an unknown key is an error naming it, with a suggestion.
- `int_field`, `float_field`, `bounds_field`: numbers and `[low, high]` pairs, checked with the field named.
- `resolve_path`: a relative path resolves against the folder of the file that names it first, then against the
  working directory; when neither holds it, the file's folder is the answer (so errors name that place).
- `DTYPES`: the dtype names a recipe or a runtime may give, and their torch types.
- `EXAMPLES`: where the shipped presets and example tasks are, in a checkout and in an installed wheel alike.
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import yaml

from evomerge.errors import ConfigError

# Package data (pyproject.toml): `search_spaces/` (the presets, the example job) and `fitness/` (the example tasks).
# In a checkout these are links to the repository's top-level folders; a wheel holds copies.
EXAMPLES = Path(__file__).parent / "examples"
DTYPE_NAMES = ("float32", "float16", "bfloat16")  # recipe `dtype`/`out_dtype`, runtime `dtype`


def _torch_dtypes() -> dict[str, Any]:
    import torch

    return {name: getattr(torch, name) for name in DTYPE_NAMES}


DTYPES = _torch_dtypes()  # name -> torch.dtype


MAX_NODES = 100_000  # values one YAML file may expand to, aliases walked (a job spec has a few hundred)


def _expanded_size(node: Any, seen: dict[int, int]) -> int:
    """How many values `node` stands for once its aliases are walked (shared nodes counted once per use, the sum
    itself memoised: nested aliases give exponential totals in linear time)."""
    if id(node) in seen:
        return seen[id(node)]
    seen[id(node)] = 1  # a node that contains itself (a recursive alias) counts once more per level, never loops
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, seen) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, seen) + _expanded_size(v, seen) for k, v in node.value)
    else:
        size = 1
    seen[id(node)] = size
    return size


def read_yaml(path: str | Path, error: type[Exception], what: str) -> tuple[Any, Path]:
    """(parsed data, absolute path). A missing file, bytes that are not UTF-8 text, a syntax error or a document
    that expands to more than MAX_NODES values (a few lines of nested aliases stand for billions once walked)
    raise `error` naming the file, before anything is built from it."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise error(f"{p}: no such {what} file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{p}: not a text file (byte {e.start} is not UTF-8); a {what} file is YAML text") from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        size = _expanded_size(node, {}) if node is not None else 0
        if size > MAX_NODES:
            raise error(f"{p}: expands to {size:.3g} values through its YAML aliases; evomerge reads at most "
                        f"{MAX_NODES:,} (nested aliases grow without bound): write the values out")
        return yaml.safe_load(text), p.resolve()
    except yaml.YAMLError as e:
        raise error(f"{p}: not valid YAML ({e})") from None


def settings(x: Any, path: str = "") -> dict[str, Any]:
    """A nested mapping as its leaves by path (`models[1].parameters.weight`): how two recipes or two job specs are
    told apart setting by setting."""
    if isinstance(x, dict):
        out: dict[str, Any] = {}
        for k, v in x.items():
            out.update(settings(v, f"{path}.{k}" if path else str(k)))
        return out
    if isinstance(x, list):
        out = {}
        for i, v in enumerate(x):
            out.update(settings(v, f"{path}[{i}]"))
        return out
    return {path: x}


def changed_settings(a: Any, b: Any) -> list[str]:
    """The paths (`settings`) whose values differ between `a` and `b`, or that only one has; `a`'s order first."""
    fa, fb = settings(a), settings(b)
    return [k for k in list(fa) + [k for k in fb if k not in fa] if fa.get(k) != fb.get(k) or (k in fa) != (k in fb)]


class Where:
    """Builds the errors of one file: `FILE: field.path: message`, as the file type's error class."""

    def __init__(self, source: str | Path | None, error: type[Exception] = ConfigError, default: str = "<config>"):
        """`default` names a mapping that came from no file; "" gives messages with no file part (a caller that
        adds its own, as the space presets do)."""
        self.source = str(source) if source else default
        self.error_class = error

    def error(self, field_path: str, message: str) -> Exception:
        parts = [p for p in (self.source, field_path, message) if p]
        return self.error_class(": ".join(parts))


class EvomergeDeprecationWarning(FutureWarning):
    """A renamed config key or value that still works (shown by default: it is meant for users, not developers)."""


def renamed_keys(raw: Mapping[str, Any], renames: Mapping[str, str], where: Where, prefix: str = "") -> dict[str, Any]:
    """`raw` with each old key in `renames` (old -> new) under its new name, warning once per key; both at once
    is an error."""
    import warnings

    out = dict(raw)
    for old, new in renames.items():
        if old not in out:
            continue
        if new in out:
            raise where.error(f"{prefix}{old}", f"'{old}' is the old name of '{new}' and both are given; keep '{new}'")
        here = f"{where.source}: " if where.source else ""
        warnings.warn(f"{here}{prefix}{old}: renamed to '{new}'; the old name still works for now, rename it where "
                      "it is written", EvomergeDeprecationWarning, stacklevel=3)
        out[new] = out.pop(old)
    return out


def suggest(word: Any, options: Iterable[str], n: int = 1, cutoff: float = 0.6, list_known: bool = True) -> str:
    """` Did you mean 'x'?` (up to `n` close names), else ` Known: a, b.` (or "" with `list_known=False`, for
    long lists such as lm-eval's registry). Starts with a space: append it to a sentence."""
    options = list(options)
    close = difflib.get_close_matches(str(word), options, n=n, cutoff=cutoff)
    if close:
        names = [f"'{c}'" for c in close]
        return f" Did you mean {names[0] if len(names) == 1 else ', '.join(names[:-1]) + ' or ' + names[-1]}?"
    return f" Known: {', '.join(options)}." if list_known and options else ""


def check_keys(raw: Mapping[str, Any], allowed: Iterable[str], where: Where, prefix: str = "",
               what: str = "unknown field.") -> None:
    """The first key of `raw` not in `allowed` is an error at `prefix + key`, with a suggestion."""
    allowed = tuple(allowed)
    for key in raw:
        if key not in allowed:
            raise where.error(f"{prefix}{key}", what + suggest(key, allowed))


def _span(low: float | None, high: float | None) -> str:
    if low is not None and high is not None:
        return f" in [{low}, {high}]"
    return f" >= {low}" if low is not None else (f" <= {high}" if high is not None else "")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _within(value: float, low: float | None, high: float | None) -> bool:
    return (low is None or value >= low) and (high is None or value <= high)


def int_field(where: Where, field_path: str, value: Any, low: int | None = 1, high: int | None = None) -> int:
    """A whole number (booleans are not) within [low, high]."""
    if not (isinstance(value, int) and not isinstance(value, bool) and _within(value, low, high)):
        raise where.error(field_path, f"must be a whole number{_span(low, high)}, got {value!r}")
    return value


def float_field(where: Where, field_path: str, value: Any, low: float | None = None, high: float | None = None) -> float:
    """A finite number (booleans are not) within [low, high]."""
    if not (_number(value) and _within(value, low, high)):
        raise where.error(field_path, f"must be a finite number{_span(low, high)}, got {value!r}")
    return float(value)


def bounds_field(where: Where, field_path: str, value: Any, low: float | None = None,
                 high: float | None = None) -> tuple[float, float]:
    """A `[low, high]` pair of finite numbers, low <= high, both within [low, high] when those are given."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(_number(v) and _within(v, low, high) for v in value):
        if value[0] <= value[1]:
            return float(value[0]), float(value[1])
    within = f", both{_span(low, high)}" if low is not None or high is not None else ""
    raise where.error(field_path, f"must be [low, high]: two finite numbers with low <= high{within}, got {value!r}")


def path_candidates(value: str | Path, base_dir: Path | None) -> list[Path]:
    """Where a path named in a file may be: itself when absolute, else the file's folder, then the working directory."""
    p = Path(str(value)).expanduser()
    if p.is_absolute():
        return [p]
    return ([base_dir / p] if base_dir is not None else []) + [Path.cwd() / p]


def resolve_path(value: str | Path, base_dir: Path | None,
                 accept: Callable[[Path], bool] = Path.exists) -> Path:
    """The first of `path_candidates` that `accept` takes (default: that exists); when none does, the first (the
    file's folder), so that the caller's error names it. Not made absolute or resolved: callers decide."""
    candidates = path_candidates(value, base_dir)
    return next((c for c in candidates if accept(c)), candidates[0])
