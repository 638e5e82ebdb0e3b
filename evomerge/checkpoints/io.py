"""Lazy, memory-mapped reading of Hugging Face safetensors folders.

One `safe_open` handle per shard stays open for the life of a `Checkpoint`; tensors are read by name,
one at a time, so merging many models keeps memory flat. Pickle formats are refused: loading them
runs arbitrary code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from evomerge.checkpoints.arch import Architecture
from evomerge.errors import UserError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# safetensors dtype strings -> torch dtypes (only what models ship in).
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(UserError, ValueError):
    """A checkpoint folder is missing, malformed or in a refused format."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    shard: str

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass
class Checkpoint:
    """A Hugging Face model folder read lazily. Open with `open_checkpoint(path)`."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named '{name}'") from None

    def get(self, name: str, device: str | torch.device | None = None) -> torch.Tensor:
        """Read one tensor (memory-mapped on CPU; copied to `device` if given)."""
        shard = self.info(name).shard
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(self.path / shard), framework="pt", device="cpu")
            self._handles[shard] = handle
        tensor = handle.get_tensor(name)
        return tensor if device is None else tensor.to(device)

    @cached_property
    def num_bytes(self) -> int:
        return sum(t.numel * t.dtype.itemsize for t in self.tensors.values())

    @cached_property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @cached_property
    def float_dtype(self) -> str:
        """The floating dtype most of the checkpoint's bytes are in ('bfloat16', 'float32', ...)."""
        by: dict[torch.dtype, int] = {}
        for t in self.tensors.values():
            if t.dtype.is_floating_point:
                by[t.dtype] = by.get(t.dtype, 0) + t.numel * t.dtype.itemsize
        return str(max(by, key=by.get)).removeprefix("torch.") if by else "float32"

    def close(self) -> None:
        self._handles.clear()


def read_json(path: Path, fix: str = "") -> Any:
    """A model folder's JSON file; one that is not JSON is a CheckpointError naming it (and `fix`, what to do)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})" + (f"; {fix}" if fix else "")) from None


def _shard_files(folder: Path) -> list[str]:
    index = folder / INDEX_FILE
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: field 'weight_map' is missing or empty")
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).exists()]
        if missing:
            raise CheckpointError(
                f"{index}: lists shards that are not in the folder: {', '.join(missing)}. "
                "Copy the missing files or re-save the model."
            )
        return shards
    if (folder / SINGLE_FILE).exists():
        return [SINGLE_FILE]
    found = sorted(p.name for p in folder.glob("*.safetensors"))
    if found:
        return found
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder}: holds only pickle weights ({', '.join(pickles[:3])}). evomerge loads safetensors "
            "only, because unpickling can run arbitrary code. Convert once in a trusted environment, e.g. "
            "`AutoModelForCausalLM.from_pretrained(path).save_pretrained(out, safe_serialization=True)`."
        )
    raise CheckpointError(f"{folder}: no *.safetensors files found (expected {SINGLE_FILE} or {INDEX_FILE})")


def open_folder(path: str | Path) -> Checkpoint:
    """Open a model folder of safetensors: read config.json and the headers, no tensor data. Callers use
    `checkpoints.open_checkpoint`, which also reads adapted folders (MODEL+ADAPTER)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such model folder")
    if not folder.is_dir():
        if folder.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{folder}: pickle checkpoints are refused; give a safetensors model folder")
        raise CheckpointError(f"{folder}: expected a model folder (config.json + *.safetensors), got a file")
    config_path = folder / "config.json"
    if not config_path.exists():
        raise CheckpointError(f"{folder}: config.json is missing; a Hugging Face model folder needs one")
    config = read_json(config_path)
    try:
        Architecture.from_config(config)
    except ValueError as e:
        raise CheckpointError(f"{config_path}: {e}; a decoder's config.json states how many layers it has") from None

    tensors: dict[str, TensorInfo] = {}
    for shard in _shard_files(folder):
        try:
            with safe_open(str(folder / shard), framework="pt", device="cpu") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    dtype = _DTYPES.get(sl.get_dtype())
                    if dtype is None:
                        raise CheckpointError(f"{folder / shard}: tensor '{name}' has unsupported dtype {sl.get_dtype()}")
                    if name in tensors:
                        raise CheckpointError(f"{folder}: tensor '{name}' appears in two shards")
                    tensors[name] = TensorInfo(name, tuple(sl.get_shape()), dtype, shard)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{folder / shard}: cannot read safetensors header ({e})") from None
    return Checkpoint(path=folder, config=config, tensors=tensors)


def write_shards(folder: Path, tensors: Iterable[tuple[str, torch.Tensor]], max_bytes: int) -> dict[str, Any]:
    """Write (name, tensor) pairs into `folder` as safetensors shards of at most `max_bytes` each (one shard in
    memory at a time), named as transformers and vLLM expect: `model.safetensors` alone, else
    `model-0000i-of-0000n.safetensors` with `model.safetensors.index.json`. Returns the index ({} for one shard).
    Shards are written under temporary names first, so a failed write leaves no file that looks finished."""
    shard_names: list[list[str]] = []
    current: dict[str, torch.Tensor] = {}
    size = total = 0
    files: list[Path] = []

    def flush() -> None:
        nonlocal current, size
        if current:
            path = folder / f".shard-{len(files):05d}.safetensors"
            save_file(current, str(path), metadata={"format": "pt"})
            files.append(path)
            shard_names.append(list(current))
            current, size = {}, 0

    for name, tensor in tensors:
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_bytes:
            flush()
        current[name] = tensor.detach().cpu().contiguous()
        size += nbytes
        total += nbytes
    flush()
    if len(files) == 1:
        files[0].rename(folder / SINGLE_FILE)
        return {}
    weight_map = {}
    for i, (path, names) in enumerate(zip(files, shard_names)):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        path.rename(folder / final)
        weight_map.update({n: final for n in names})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2))
    return index
