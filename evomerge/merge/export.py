"""Write a merged model as a standard Hugging Face folder, atomically.

Tensors stream into safetensors shards (at most one shard is held in memory); config, tokenizer files and
a model card holding the recipe are added; the folder is built under a temporary name beside OUT and
renamed into place only when complete, so a crash never leaves a half-written model at OUT.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable

import torch
from evomerge.checkpoints.hf import check_no_custom_code
from evomerge.checkpoints.io import write_shards
from evomerge.checkpoints.refs import own_root
from evomerge.errors import UserError

TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "generation_config.json",
)
DEFAULT_SHARD_BYTES = 2 * 1024**3


class ExportError(UserError, ValueError):
    """The output folder cannot be written as asked."""


def disk_full(e: BaseException) -> bool:
    """Whether a write failed for want of space: ENOSPC, a quota, a file-size limit (safetensors reports these in
    its own error type, with the OS's words)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    text = str(e)
    return "No space left on device" in text or "File too large" in text or "Disk quota exceeded" in text


def parse_size(text: str) -> int:
    """'2GB', '500MB', '1048576' -> bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}
    try:
        return int(float(t[:-1]) * mult[t[-1]]) if t and t[-1] in mult else int(t)
    except ValueError:
        raise ExportError(f"cannot read size {text!r}; write it like 500MB or 2GB") from None


MARKER = ".evomerge-output"  # in every folder evomerge writes: `--force` replaces such a folder and no other
FILE_MARKER = "# evomerge export"  # the first line of every file `evomerge export` writes, for the same rule


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files to copy from `folder`. A symbolic link is followed only when it stays inside the folder:
    one that points elsewhere (a `merges.txt` linked to a secret) is refused, before any work."""
    found = []
    root = own_root(folder)  # a Hub snapshot's files link into its repo's blobs/
    for name in TOKENIZER_FILES:
        path = folder / name
        if path.is_symlink() and not path.exists():
            raise ExportError(f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; the output "
                              "would lack it: restore the file or remove the link")
        if not path.exists():
            continue
        if path.is_symlink() and not path.resolve().is_relative_to(root):
            raise ExportError(f"{path} is a symbolic link to {path.resolve()}, outside the model folder; evomerge copies "
                              "a model's own files only: replace the link with the file itself")
        found.append(path)
    return found


CORE_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")  # one of them makes a usable tokenizer


def missing_tokenizer_note(folder: Path | None) -> str | None:
    """A note when the tokenizer source holds no tokenizer a loader can build from: the output will lack one too."""
    if folder is None or any((Path(folder) / n).exists() for n in CORE_TOKENIZER_FILES):
        return None
    return (f"{folder} (the tokenizer source) has no tokenizer files ({', '.join(CORE_TOKENIZER_FILES)}): the "
            "merged model has none either, and transformers and vLLM need one to run it; copy them in, or set "
            "`tokenizer_source:` to a model that has them")


def check_output(out: Path, force: bool, inputs: Iterable[str | Path] = (), folder: bool = True) -> None:
    """The one set of rules for what evomerge writes (a model folder, or with `folder=False` one file): never through
    a link, never over an existing OUT unless forced, and forced only over what evomerge wrote (MARKER in a folder,
    FILE_MARKER as a file's first line), never as, around or inside one of the `inputs` (model folders, the recipe,
    the store). Call before any heavy work."""
    check_not_an_input(out, inputs)
    if out.is_symlink():
        raise ExportError(f"{out} is a symbolic link (to {os.readlink(out)}); evomerge never writes through a link: "
                          "give the real path")
    if not out.parent.is_dir():
        raise ExportError(f"{out.parent}: the folder to write into does not exist; create it first")
    if not out.exists():
        return
    if not force:
        raise ExportError(f"{out} already exists; choose another path or pass --force to replace it")
    if folder and not out.is_dir():
        raise ExportError(f"{out} is a file; a model is a folder: give a folder path")
    if not folder and out.is_dir():
        raise ExportError(f"{out} is a folder; this format is one file: give a file path")
    if folder and not (out / MARKER).is_file():
        raise ExportError(f"{out} was not written by evomerge (no {MARKER} in it): --force replaces only evomerge's "
                          "own output; remove it yourself or choose another folder")
    if not folder and not _first_line_is(out, FILE_MARKER):
        raise ExportError(f"{out} was not written by `evomerge export` (its first line is not '{FILE_MARKER} ...'): "
                          "--force replaces only evomerge's own output; remove it yourself or choose another path")


def _first_line_is(path: Path, prefix: str) -> bool:
    try:
        with path.open("rb") as f:
            return f.readline().startswith(prefix.encode())
    except OSError:
        return False


def check_not_an_input(out: Path, inputs: Iterable[str | Path], keep: Iterable[str | Path] = ()) -> None:
    """An output must never replace what it is made from: refuse OUT when it is an input, holds one, or lies
    inside an input folder. `keep`: folders OUT may lie in but not be or hold (a job's report folder)."""
    o = Path(out).expanduser().absolute().resolve()
    kept = {Path(k).expanduser().absolute().resolve() for k in keep}
    for given in [*inputs, *keep]:
        p = Path(given).expanduser().absolute().resolve()
        inside = p.is_dir() and o.is_relative_to(p) and p not in kept
        if o == p or p.is_relative_to(o) or inside:
            how = "is" if o == p else ("holds" if p.is_relative_to(o) else "lies inside")
            raise ExportError(f"{out} {how} the input {given}: an output never replaces or enters what it is made "
                              "from; choose a path outside the inputs")


def write_checkpoint(
    out: Path,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: dict[str, Any],
    tokenizer_dir: Path | None,
    model_card: str,
    force: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra_files: dict[str, str] | None = None,
    inputs: Iterable[str | Path] = (),
) -> Path:
    """Write the folder atomically; `extra_files` (name -> text) are added before the rename. The folder carries
    MARKER, so a later `--force` knows it may replace it."""
    out = Path(out).expanduser().absolute()
    inputs = list(inputs) + ([tokenizer_dir] if tokenizer_dir is not None else [])
    check_output(out, force, inputs)
    if tokenizer_dir is not None:  # an output evomerge itself would refuse to load is never written
        check_no_custom_code(tokenizer_dir)
    tokenizer = tokenizer_files(tokenizer_dir) if tokenizer_dir is not None else []
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write_shards(tmp, tensors, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for path in tokenizer:
            shutil.copyfile(path, tmp / path.name)  # the file's bytes (a link inside the folder: what it names)
        (tmp / "README.md").write_text(model_card)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        (tmp / MARKER).write_text(json.dumps({"written_by": "evomerge"}) + "\n")
        _move_into_place(tmp, out, force, inputs)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if disk_full(e):
            raise ExportError(f"{out}: the disk ran out of space while writing it ({e}); nothing was written (the "
                              "partial folder is removed): free space there or write the model elsewhere") from None
        raise
    return out


def write_file(out: Path, text: str, force: bool, inputs: Iterable[str | Path] = ()) -> Path:
    """Write one text file by the output rules (`check_output`, `folder=False`), atomically: a temporary file beside
    OUT, then a rename (a hard link without `force`, so a file that appeared meanwhile is never replaced; with it,
    OUT is checked again first: what is there must still be evomerge's own file)."""
    out = Path(out).expanduser().absolute()
    check_output(out, force, inputs, folder=False)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    exists = ExportError(f"{out} already exists; choose another path or pass --force to replace it")
    try:
        tmp.write_text(text)  # inside: a failed write (disk full) leaves no temporary behind
        if force:
            check_output(out, force, inputs, folder=False)
            os.replace(tmp, out)
        else:
            try:
                os.link(tmp, out)
            except FileExistsError:
                raise exists from None
            except OSError:  # a filesystem without hard links: create OUT exclusively, never replace it
                try:
                    with open(out, "x") as f:
                        f.write(text)
                except FileExistsError:
                    raise exists from None
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _move_into_place(tmp: Path, out: Path, force: bool, inputs: list) -> None:
    """Rename the finished folder to OUT, checking OUT again first: the merge took a while, and someone (another
    merge, the user) may have made OUT meanwhile. Without `force` the rename never replaces anything but an empty
    folder (the kernel refuses a non-empty one); with it, only a folder that still carries MARKER is moved aside,
    and deleted only after its MARKER is seen once more."""
    try:
        check_output(out, force, inputs)
    except ExportError as e:
        raise ExportError(f"{e} (it appeared while the model was being written; nothing was replaced)") from None
    if not out.exists():
        try:
            os.rename(tmp, out)
        except OSError:  # made meanwhile, not empty (ENOTEMPTY) or a file: never replaced without --force
            raise ExportError(f"{out} appeared while the model was being written; nothing was replaced: choose "
                              "another path, or remove it and merge again") from None
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out, old)
    if not (old / MARKER).is_file():  # replaced between the check and the rename: put it back, refuse
        os.rename(old, out)
        raise ExportError(f"{out} changed while the model was being written and is not evomerge's output now; "
                          "nothing was replaced")
    os.rename(tmp, out)
    shutil.rmtree(old)


def model_card(recipe_yaml: str, base_model: str | None, title: str = "Merged model") -> str:
    """A README with YAML front matter that model hubs read, and the recipe that reproduces the model."""
    front = ["---", "library_name: transformers", "tags:", "- merge", "- evomerge"]
    if base_model:
        front += ["base_model:", f"- {json.dumps(base_model)}"]
    front.append("---")
    body = [
        f"# {title}",
        "",
        "Made with evomerge. Reproduce it with `evomerge merge recipe.yaml -o OUT` using this recipe",
        "(model paths as they were on the machine that made it):",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ]
    return "\n".join(front + [""] + body)
