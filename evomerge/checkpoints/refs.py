"""Model references as mergekit writes them, resolved to a model folder before anything heavy runs.

    path/to/folder              a local model folder (relative: the naming file's folder first, then the working dir)
    org/name, org/name@rev      a Hugging Face Hub repo (branch, tag or commit), through the Hub cache
    MODEL+ADAPTER               a peft LoRA adapter (a folder or a Hub repo, with its own @rev) applied to MODEL

A Hub reference resolves with huggingface_hub's `snapshot_download` (HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE
respected; its progress bar shows when it downloads; only safetensors, JSON and tokenizer files are fetched) to the
cache's snapshot folder, whose path names the commit: a job records that folder, so a resumed search reads the
same bytes. `MODEL+ADAPTER` resolves to an *adapted folder*: a folder in evomerge's cache (EVOMERGE_CACHE, else
XDG_CACHE_HOME/evomerge, else ~/.cache/evomerge) holding the model's config and tokenizer files and a note naming
the two folders, and no weights; `open_checkpoint` reads it as the model with the adapter applied tensor by tensor
(`lora.AdaptedCheckpoint`). The adapter is checked against the model (names and shapes) when the folder is made.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Callable

from evomerge.checkpoints.io import CheckpointError, open_folder
from evomerge.checkpoints.lora import ADAPTED_NOTE, ADAPTER_CONFIG, check_adapter, is_adapter, open_adapter
from evomerge.config import path_candidates

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[\w./-]+)?$")
HUB_FILES = ["*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model", "*.tiktoken",
             "*.jinja", "*.txt"]
_COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
           "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
           "chat_template.jinja", "chat_template.json")


def cache_root() -> Path:
    if os.environ.get("EVOMERGE_CACHE"):
        return Path(os.environ["EVOMERGE_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "evomerge"


def split_ref(text: str, base_dir: Path | None = None) -> tuple[str, str | None]:
    """(model, adapter or None): a '+' joins them unless the whole text is an existing local path."""
    if "+" not in text or any(c.exists() for c in path_candidates(text, base_dir)):
        return text, None
    model, _, adapter = text.rpartition("+")
    if not model or not adapter:
        raise CheckpointError(f"'{text}': MODEL+ADAPTER needs both parts")
    return model, adapter


def resolve_model_ref(text: str, base_dir: Path | None = None) -> Path:
    """The model folder a reference names (see the module docstring); CheckpointError saying what to do."""
    if not isinstance(text, str) or not text.strip():
        raise CheckpointError("a model reference must be a folder path, a Hub id or MODEL+ADAPTER")
    model, adapter = split_ref(text.strip(), base_dir)
    folder = _resolve_one(model, base_dir, lambda c: (c / "config.json").is_file(), "model folder with a config.json")
    if adapter is None:
        return folder
    adapter_folder = _resolve_one(adapter, base_dir, is_adapter, f"LoRA adapter folder with an {ADAPTER_CONFIG}")
    return adapted_folder(folder, adapter_folder)


def _resolve_one(text: str, base_dir: Path | None, accept: Callable[[Path], bool], what: str) -> Path:
    candidates = path_candidates(text, base_dir)
    for c in candidates:
        if accept(c):
            return c.resolve()
    local = text.startswith((".", "/", "~")) or any(c.exists() for c in candidates)
    if not local and HUB_ID.match(text):
        folder = hub_snapshot(text)
        if not accept(folder):
            raise CheckpointError(f"'{text}' (Hub snapshot {folder}): not a {what}")
        return folder
    tried = ", ".join(str(c) for c in candidates)
    raise CheckpointError(f"no {what} at '{text}' (looked in {tried}); give a local folder or a Hub id (org/name)")


def hub_snapshot(ref: str) -> Path:
    """`org/name[@revision]` -> its snapshot folder in the Hub cache, downloading safetensors, JSON and tokenizer
    files when the cache lacks them and downloads are allowed."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE

    repo, _, revision = ref.partition("@")
    fetch = f"hf download {repo}" + (f" --revision {revision}" if revision else "") + \
        " --include '*.safetensors' '*.json' 'tokenizer*'"
    try:
        folder = Path(snapshot_download(repo, revision=revision or None, allow_patterns=HUB_FILES))
    except (LocalEntryNotFoundError, OfflineModeIsEnabled):
        why = "downloads are off (HF_HUB_OFFLINE=1)" if HF_HUB_OFFLINE else "the Hub cannot be reached"
        raise CheckpointError(f"'{ref}': not in the Hugging Face cache ({HF_HUB_CACHE}) and {why}; fetch it once "
                              f"where the Hub is reachable: {fetch}") from None
    except RevisionNotFoundError:
        raise CheckpointError(f"'{ref}': the Hub repo '{repo}' has no revision '{revision}'") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"'{ref}': no such repo on the Hugging Face Hub (or it is private: log in with "
                              "`hf auth login`)") from None
    if (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
        raise CheckpointError(f"'{ref}' ({folder}): the repo has no safetensors weights, and evomerge refuses pickle "
                              "weights (loading one runs code); pick a revision with safetensors, or convert it "
                              "once in a trusted environment and give the converted folder")
    return folder


def adapted_folder(model: Path, adapter: Path) -> Path:
    """The adapted folder standing for `model` with `adapter` applied (made once; the adapter checked against the
    model's tensors first, so a mismatch is an error before any work)."""
    model, adapter = Path(model).resolve(), Path(adapter).resolve()
    base = open_folder(model)
    try:
        check_adapter(open_adapter(adapter), base)
    finally:
        base.close()
    key = hashlib.sha256(f"{model}\0{adapter}".encode()).hexdigest()[:12]
    folder = cache_root() / "adapted" / f"{model.name}+{adapter.name}-{key}"
    note = {"model": str(model), "adapter": str(adapter)}
    if (folder / ADAPTED_NOTE).is_file():
        try:
            if json.loads((folder / ADAPTED_NOTE).read_text()) == note:
                return folder
        except ValueError:
            pass
    shutil.rmtree(folder, ignore_errors=True)  # a damaged or foreign one

    def fill(staging: Path) -> None:
        root = own_root(model)
        for name in _COPIED:  # what transformers and the tokenizer read (contents, never links); weights stay put
            source = model / name
            if source.is_file() and source.resolve().is_relative_to(root):
                shutil.copyfile(source, staging / name)
        (staging / ADAPTED_NOTE).write_text(json.dumps(note, indent=1) + "\n")

    return cache_folder(folder, fill)


def cache_folder(folder: Path, fill: Callable[[Path], None]) -> Path:
    """Make `folder` in evomerge's cache: `fill` a staging folder beside it, then rename it into place, so a reader
    never sees it half made. Folders are named by what they hold: when another process put one there first, it is
    the same, and kept."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        fill(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # made meanwhile (not empty): theirs
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def own_root(folder: Path) -> Path:
    """The folder a model's files may link into: itself, or for a Hub cache snapshot (whose files are links to the
    repo's `blobs/`) the repo's cache folder."""
    folder = Path(folder).resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent
    return folder


def adapted_parts(folder: Path) -> tuple[Path, Path] | None:
    """(model, adapter) of an adapted folder; None for any other folder."""
    note = Path(folder) / ADAPTED_NOTE
    if not note.is_file():
        return None
    data = json.loads(note.read_text())
    return Path(data["model"]), Path(data["adapter"])


def reference_of(folder: Path) -> str:
    """How mergekit names the model in `folder`: MODEL+ADAPTER for an adapted folder, else the folder itself."""
    parts = adapted_parts(folder)
    return f"{parts[0]}+{parts[1]}" if parts else str(folder)
