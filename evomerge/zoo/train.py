"""Train, save and score one tiny zoo model (single-threaded and deterministic).

Why single-threaded: on a 2-core machine two one-thread trainings run ~10x faster in total than
multi-threaded ones fighting each other, and one thread plus `use_deterministic_algorithms`
makes a rebuild bitwise reproducible.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from evomerge.zoo import tokenizer as ztok


@dataclass(frozen=True)
class ModelSpec:
    family: str = "llama"  # "llama" or "qwen2"
    hidden_size: int = 128
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    intermediate_size: int = 256
    max_position_embeddings: int = 64
    tie_word_embeddings: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TrainSpec:
    steps: int = 800
    lr: float = 6e-4
    batch_size: int = 64
    warmup: int = 50
    weight_decay: float = 0.0
    seed: int = 0
    task_weights: dict = field(default_factory=dict)  # task -> sampling weight
    bos_prob: float = 0.5  # train with and without BOS so any evaluator convention works

    def to_dict(self) -> dict:
        return asdict(self)


def set_deterministic(threads: int = 1) -> None:
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)


def make_config(spec: ModelSpec):
    """A transformers config of the wanted family with the zoo's vocabulary and special token ids."""
    common = dict(
        vocab_size=ztok.VOCAB_SIZE,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=ztok.BOS_ID,
        eos_token_id=ztok.EOS_ID,
        pad_token_id=ztok.PAD_ID,
    )
    if spec.family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if spec.family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)  # Qwen2 has q/k/v biases by construction
    raise ValueError(f"unknown family {spec.family!r}")


def make_model(spec: ModelSpec, seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(make_config(spec), attn_implementation="eager")
    return model.float()


def _example(item: dict, with_bos: bool) -> tuple[list[int], list[int]]:
    prompt = ([ztok.BOS_ID] if with_bos else []) + ztok.encode(item["prompt"])
    target = ztok.encode(item["answer"]) + [ztok.EOS_ID]
    return prompt + target, [-100] * len(prompt) + target  # loss on the answer only


def train_model(model, data: dict[str, list[dict]], spec: TrainSpec, log=None) -> dict:
    """Train `model` in place on items drawn from `data[task]` with `spec.task_weights`. Returns stats."""
    rng = random.Random(spec.seed)
    tasks = [t for t, w in spec.task_weights.items() if w > 0]
    weights = [spec.task_weights[t] for t in tasks]
    pools = {t: data[t] for t in tasks}
    torch.manual_seed(spec.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=spec.weight_decay, betas=(0.9, 0.98))

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < spec.warmup:
            return (step + 1) / spec.warmup
        p = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    t0, losses = time.time(), []
    for step in range(spec.steps):
        batch = []
        for task in rng.choices(tasks, weights, k=spec.batch_size):
            batch.append(_example(rng.choice(pools[task]), rng.random() < spec.bos_prob))
        width = max(len(ids) for ids, _ in batch)
        ids = torch.tensor([x + [ztok.PAD_ID] * (width - len(x)) for x, _ in batch])
        labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
        # right padding under a causal mask never changes the real tokens: no attention mask needed
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log and (step + 1) % 200 == 0:
            log(f"step {step + 1}/{spec.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f}")
    model.eval()
    return {"seconds": round(time.time() - t0, 1), "final_loss": round(sum(losses[-50:]) / max(1, len(losses[-50:])), 5)}


@torch.no_grad()
def generate_answers(model, prompts: list[str], max_new_tokens: int = 12, bos: bool = True, batch_size: int = 500) -> list[str]:
    """Greedy decoding until EOS. Prompts are grouped by length, so no padding is involved."""
    model.eval()
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list[str] = [""] * len(prompts)
    for idxs_all in by_len.values():
        for s in range(0, len(idxs_all), batch_size):
            idxs = idxs_all[s : s + batch_size]
            ids = torch.tensor([([ztok.BOS_ID] if bos else []) + ztok.encode(prompts[i]) for i in idxs])
            start, done = ids.shape[1], torch.zeros(len(idxs), dtype=torch.bool)
            out_model = model(input_ids=ids, use_cache=True)
            for _ in range(max_new_tokens):
                nxt = out_model.logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, ztok.PAD_ID), nxt)
                done |= nxt == ztok.EOS_ID
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                if bool(done.all()):
                    break
                out_model = model(input_ids=nxt[:, None], past_key_values=out_model.past_key_values, use_cache=True)
            for row, i in zip(ids[:, start:].tolist(), idxs):
                toks = row[: row.index(ztok.EOS_ID)] if ztok.EOS_ID in row else row
                out[i] = ztok.decode(toks)
    return out


def score(model, items: list[dict], bos: bool = True) -> float:
    """Greedy exact-match accuracy on `items`."""
    preds = generate_answers(model, [it["prompt"] for it in items], bos=bos)
    return sum(p == it["answer"] for p, it in zip(preds, items)) / max(1, len(items))


def save_model(model, folder: Path, meta: dict | None = None) -> None:
    """A Hugging Face folder that loads offline via AutoModelForCausalLM / AutoTokenizer."""
    from transformers import GenerationConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.use_cache = True
    model.save_pretrained(folder, safe_serialization=True)
    GenerationConfig(
        bos_token_id=ztok.BOS_ID, eos_token_id=ztok.EOS_ID, pad_token_id=ztok.PAD_ID, do_sample=False, max_new_tokens=16
    ).save_pretrained(folder)
    ztok.save_tokenizer(folder, model.config.max_position_embeddings)
    if meta is not None:
        (folder / "zoo_model.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
