"""Shared fixtures: tiny random models of several architecture families, built with transformers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent

TINY = dict(vocab_size=48, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def tiny_config(family: str):
    import transformers as tf

    if family == "llama":
        return tf.LlamaConfig(**TINY)
    if family == "mistral":
        return tf.MistralConfig(**TINY)
    if family == "qwen2":
        return tf.Qwen2Config(**TINY, tie_word_embeddings=True)
    if family == "gemma":
        return tf.GemmaConfig(**TINY, head_dim=4)
    if family == "phi3":
        return tf.Phi3Config(**{**TINY, "num_key_value_heads": 4}, pad_token_id=0)
    if family == "gpt2":
        return tf.GPT2Config(vocab_size=48, n_embd=16, n_layer=3, n_head=4, n_positions=64)
    raise ValueError(family)


def save_tiny(folder: Path, family: str = "llama", seed: int = 0, perturb_from: Path | None = None, scale: float = 0.05) -> Path:
    """A tiny random model saved as safetensors; with `perturb_from`, a 'fine-tune' of that model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if perturb_from is not None:
        model = AutoModelForCausalLM.from_pretrained(perturb_from, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(scale * torch.randn_like(p))
    else:
        model = AutoModelForCausalLM.from_config(tiny_config(family), dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_llamas(tmp_path_factory) -> dict[str, Path]:
    """A base and three 'fine-tunes' (random perturbations) of a tiny Llama."""
    root = tmp_path_factory.mktemp("tiny_llamas")
    base = save_tiny(root / "base", "llama", seed=0)
    out = {"base": base}
    for i, name in enumerate(["a", "b", "c"]):
        out[name] = save_tiny(root / name, perturb_from=base, seed=i + 1)
    return out


@pytest.fixture(scope="session")
def zoo_dir() -> Path:
    """The built tiny model zoo (`make test` builds it first; built here if missing)."""
    path = Path(os.environ.get("EVOMERGE_ZOO", REPO / ".cache" / "zoo")).resolve()  # `make test` gives it relative
    if not (path / "manifest.json").exists():
        from evomerge.zoo.build import build_zoo

        build_zoo(path, progress=False)
    return path


# ---------------------------------------------------------------- stores as older evomerge wrote them, and planted pickles


class _Planted:
    """Unpickling this runs a shell command: what a hostile store could hold."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def planted_pickle(marker: Path) -> bytes:
    """A pickle that creates `marker` when unpickled (a test asserts that it never is)."""
    import pickle

    return pickle.dumps(_Planted(f"touch {marker}"))


def as_schema_2(path: Path, blob: bytes) -> None:
    """Turn a store into the layout of store schema 2: jobs without objective table or YAML spec, and the last
    three checkpoints of each job as pickles (here `blob`, as a schema-2 evomerge pruned and pickled them)."""
    import sqlite3

    db = sqlite3.connect(path, isolation_level=None)
    db.execute("ALTER TABLE jobs DROP COLUMN objectives")
    db.execute("ALTER TABLE jobs DROP COLUMN spec_yaml")
    rows = db.execute("SELECT job, generation, created FROM checkpoints ORDER BY job, generation").fetchall()
    db.execute("DROP TABLE checkpoints")
    db.execute("CREATE TABLE checkpoints (job TEXT NOT NULL, generation INTEGER NOT NULL, created REAL NOT NULL, "
               "state BLOB NOT NULL, PRIMARY KEY (job, generation))")
    last = {}
    for job, g, created in rows:
        last.setdefault(job, []).append((job, g, created, blob))
    db.executemany("INSERT INTO checkpoints VALUES (?, ?, ?, ?)", [r for rs in last.values() for r in rs[-3:]])
    db.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    db.close()
