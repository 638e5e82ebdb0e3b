"""Character-level tokenizer for the tiny zoo.

Every zoo model shares one fixed vocabulary, so all zoo checkpoints are merge-compatible
(same embedding rows mean the same characters). Built with `tokenizers` and saved as
tokenizer.json, so it loads offline through `AutoTokenizer` / `PreTrainedTokenizerFast`.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]  # ids 0..3
# Digits, lowercase letters and a few symbols used as task markers. Fixed order: ids are part of the zoo.
CHARS = list(string.digits) + list(string.ascii_lowercase) + list("+-*=<>!@#?:. \n")
VOCAB: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + CHARS)}
PAD_ID, BOS_ID, EOS_ID, UNK_ID = (VOCAB[t] for t in SPECIAL_TOKENS)
VOCAB_SIZE = len(VOCAB)


def build_tokenizer():
    """A `tokenizers.Tokenizer`: one token per character, BOS prepended, fused decoding."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=dict(VOCAB), unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)]
    )
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def encode(text: str) -> list[int]:
    """Fast pure-Python encoding (no BOS/EOS) used by training and scoring; same ids as tokenizer.json."""
    return [VOCAB.get(c, UNK_ID) for c in text]


def decode(ids: list[int]) -> str:
    inv = _INV
    return "".join(inv[i] for i in ids if i not in (PAD_ID, BOS_ID, EOS_ID))


_INV = {i: t for t, i in VOCAB.items()}


def save_tokenizer(folder: Path, model_max_length: int = 64) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(folder / "tokenizer.json"))
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "padding_side": "left",  # left padding: what batched generation wants
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
