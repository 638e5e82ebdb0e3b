"""Moved: the YAML readers' shared plumbing is `evomerge.config` (this name stays for existing imports)."""

from evomerge.config import read_yaml

__all__ = ["read_yaml"]
