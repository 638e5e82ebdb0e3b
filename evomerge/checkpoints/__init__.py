"""Checkpoints: lazy safetensors I/O, architecture introspection, compatibility checks."""

from evomerge.checkpoints.arch import Architecture, TensorRole, classify_tensor
from evomerge.checkpoints.compat import IncompatibleModelsError, check_compatible
from evomerge.checkpoints.io import Checkpoint, CheckpointError
from evomerge.checkpoints.lora import open_checkpoint

__all__ = [
    "Architecture",
    "Checkpoint",
    "CheckpointError",
    "IncompatibleModelsError",
    "TensorRole",
    "check_compatible",
    "classify_tensor",
    "open_checkpoint",
]
