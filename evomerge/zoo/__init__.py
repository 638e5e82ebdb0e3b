"""Tiny model zoo: char-level Llama and Qwen2 bases plus skill experts, built deterministically on CPU.

`build_zoo(out_dir)` trains (or reuses) the zoo; `tasks` defines the skills and their splits.
"""

from evomerge.zoo.build import build_zoo, is_built, load_manifest

__all__ = ["build_zoo", "is_built", "load_manifest"]
