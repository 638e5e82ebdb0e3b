"""Synthetic character-level skills of the tiny zoo, and their deterministic train/fitness/test splits.

Why these skills: a merge demo needs experts that each master one skill and forget another, and a target
task that needs both (`mix`). `arith` is the "math" skill, `cipher` a second "language", `reverse` a
distractor, `composed` (math asked in the cipher) a Sakana-style exploratory objective.

Every split is produced from `TaskSpec.seed` only, so `fitness/data` in the repository equals what
`build_zoo` writes. Fitness, test and train never share an item.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

SKILLS = ("arith", "cipher", "reverse")
EVAL_TASKS = ("arith", "cipher", "reverse", "mix", "composed")  # tasks with an lm-eval YAML in fitness/
ALL_TASKS = EVAL_TASKS + ("copy",)  # copy is a base-only pretraining task


@dataclass(frozen=True)
class TaskSpec:
    seed: int = 1234
    n_eval: int = 500  # items per fitness and per test split
    n_train: int = 20000  # train items for tasks whose item space is large
    cipher_letters: str = "gdjfbaeihc"  # digit i is written cipher_letters[i] ...
    cipher_stride: int = 0  # ... shifted by stride*position (0: a plain substitution; 3 was tried, see README)
    cipher_len: tuple[int, int] = (3, 6)
    reverse_len: tuple[int, int] = (3, 8)
    copy_len: tuple[int, int] = (1, 8)

    def to_dict(self) -> dict:
        return asdict(self)


Item = dict  # {"id": str, "prompt": str, "answer": str, optional "skill": str}


def encipher(digits: str, spec: TaskSpec) -> str:
    n = len(spec.cipher_letters)
    return "".join(spec.cipher_letters[(int(d) + spec.cipher_stride * i) % n] for i, d in enumerate(digits))


def decipher(letters: str, spec: TaskSpec) -> str:
    n = len(spec.cipher_letters)
    return "".join(str((spec.cipher_letters.index(c) - spec.cipher_stride * i) % n) for i, c in enumerate(letters))


def _arith_item(a: int, b: int) -> tuple[str, str]:
    return f"{a}+{b}=", str(a + b)


def _composed_item(a: int, b: int, spec: TaskSpec) -> tuple[str, str]:
    return f"{encipher(str(a), spec)}+{encipher(str(b), spec)}=", str(a + b)


def _cipher_item(direction: str, digits: str, spec: TaskSpec) -> tuple[str, str]:
    letters = encipher(digits, spec)
    return (f">{digits}=", letters) if direction == ">" else (f"<{letters}=", digits)


def _rand_digits(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(lo, hi)))


def _rand_string(rng: random.Random, lo: int, hi: int, spec: TaskSpec) -> str:
    alphabet = "0123456789" if rng.random() < 0.5 else spec.cipher_letters
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _rows(task: str, split: str, pairs: list[tuple[str, str]]) -> list[Item]:
    tag = {"train": "tr", "fitness": "f", "test": "t"}[split]
    return [{"id": f"{task}-{tag}-{i:05d}", "prompt": p, "answer": a} for i, (p, a) in enumerate(pairs)]


def _unique(rng: random.Random, make, n: int, exclude: set) -> list:
    """Draw n distinct keys from `make(rng)` that are not in `exclude` (which is updated)."""
    out = []
    while len(out) < n:
        key = make(rng)
        if key not in exclude:
            exclude.add(key)
            out.append(key)
    return out


def generate_all(spec: TaskSpec = TaskSpec()) -> dict[str, dict[str, list[Item]]]:
    """All tasks, all splits: {task: {"train"|"fitness"|"test": [items]}}."""
    ne = spec.n_eval
    rng = random.Random(spec.seed)
    out: dict[str, dict[str, list[Item]]] = {}

    # arith and composed share one partition of the 100x100 operand pairs.
    pairs = [(a, b) for a in range(100) for b in range(100)]
    rng.shuffle(pairs)
    part = {"fitness": pairs[:ne], "test": pairs[ne : 2 * ne], "train": pairs[2 * ne :]}
    out["arith"] = {s: _rows("arith", s, [_arith_item(a, b) for a, b in ps]) for s, ps in part.items()}
    out["composed"] = {s: _rows("composed", s, [_composed_item(a, b, spec) for a, b in ps]) for s, ps in part.items()}

    # cipher: held-out digit strings are excluded from training in both directions.
    seen: set = set()
    draw = lambda r: (r.choice("<>"), _rand_digits(r, *spec.cipher_len))  # noqa: E731
    held = {s: _unique(rng, draw, ne, seen) for s in ("fitness", "test")}
    held_digits = {d for keys in held.values() for _, d in keys}
    seen |= {(x, d) for d in held_digits for x in "<>"}
    held["train"] = _unique(rng, draw, spec.n_train, seen)
    out["cipher"] = {s: _rows("cipher", s, [_cipher_item(x, d, spec) for x, d in keys]) for s, keys in held.items()}

    # reverse and copy over digit strings and cipher-letter strings.
    for task, prefix, lens, fn in (("reverse", "!", spec.reverse_len, lambda s: s[::-1]), ("copy", "@", spec.copy_len, lambda s: s)):
        seen = set()
        draw = lambda r, lens=lens: _rand_string(r, *lens, spec)  # noqa: E731
        keys = {s: _unique(rng, draw, ne, seen) for s in ("fitness", "test")}
        # short strings have few variants: cap train draws at what is left
        keys["train"] = [k for k in (draw(rng) for _ in range(spec.n_train)) if k not in seen]
        out[task] = {s: _rows(task, s, [(f"{prefix}{k}=", fn(k)) for k in ks]) for s, ks in keys.items()}

    # mix: the target task, half arith items and half cipher items of the same split (interleaved).
    out["mix"] = {}
    for split in ("train", "fitness", "test"):
        a, c = out["arith"][split], out["cipher"][split]
        n = min(len(a), len(c)) if split == "train" else ne // 2
        rows = []
        for i in range(n):
            for skill, row in (("arith", a[i]), ("cipher", c[i])):
                rows.append({"prompt": row["prompt"], "answer": row["answer"], "skill": skill})
        tag = {"train": "tr", "fitness": "f", "test": "t"}[split]
        out["mix"][split] = [{"id": f"mix-{tag}-{i:05d}", **r} for i, r in enumerate(rows)]
    return out


def write_jsonl(path: Path, rows: list[Item]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")


def read_jsonl(path: Path) -> list[Item]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def write_data(out_dir: Path, data: dict[str, dict[str, list[Item]]], splits=("train", "fitness", "test"), tasks=ALL_TASKS) -> None:
    """Write `out_dir/<task>/<split>.jsonl`."""
    for task in tasks:
        for split in splits:
            write_jsonl(Path(out_dir) / task / f"{split}.jsonl", data[task][split])


def write_fitness_data(out_dir: Path, spec: TaskSpec = TaskSpec()) -> None:
    """The committed lm-eval data: `fitness/data/<task>/{fitness,test}.jsonl` for the eval tasks."""
    write_data(Path(out_dir), generate_all(spec), splits=("fitness", "test"), tasks=EVAL_TASKS)


if __name__ == "__main__":  # python -m evomerge.zoo.tasks fitness/data
    import sys

    write_fitness_data(Path(sys.argv[1] if len(sys.argv) > 1 else "fitness/data"))
