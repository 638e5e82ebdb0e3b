"""The zoo's `depth` family: deeper models whose layers can run after another model's layers.

Why a family of its own: data-flow search (layer paths, Sakana-style) only beats parameter-space merges when
a path of layers taken from two models works better than any weighted average of their weights. The llama and
qwen2 families do not offer that (their 4 layers each expect their own model's residual format), so this
family is trained so that they do:

- `depth/base` is trained from scratch with stochastic depth (`StochasticDepth`): on half the steps it runs
  a random path (first layer, each middle layer dropped or repeated, last layer). Every layer then learns to
  read and write one shared residual format (as with LayerDrop; "Transformer Layers as Painters" finds the
  middle layers of trained transformers interchangeable in the same way), so layers can be reordered and
  sources can be mixed along a path.
- `depth/arith` is a full fine-tune of the base on arithmetic, with stochastic depth on and the token
  embeddings frozen: its layer 0 still reads the base's embeddings, so anything that writes those embeddings
  into the stream can feed it.
- `depth/reader` trains only layers 0..k-1 of the base (the reader objective, `train_reader`): the hidden
  state after layer k-1 must equal the frozen token embeddings of the deciphered text (and, at half weight,
  the state after each earlier layer: a shorter prefix reads part of the cipher). Alone it scores 0 (its
  later layers are the base's and get embeddings, not layer-k output), but the path [reader 0..k-1] +
  [arith 0..7] reads a composed prompt (cipher in, arithmetic out) that no parent and no weight merge solves.

The settings live here (`DepthTrain`), not in train.py: train.py's bytes key every llama/qwen2 model, and this
file's bytes key only the depth family's models (build.job_key), so adding the family rebuilds nothing else.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from evomerge.zoo import tokenizer as ztok
from evomerge.zoo.tasks import TaskSpec

OBJECTIVES = ("lm", "reader")


@dataclass(frozen=True)
class StochasticDepthSpec:
    """With probability `p` per training step, run a random path instead of all layers in order."""

    p: float = 0.5
    drop: float = 0.15  # a middle layer is left out with this probability ...
    repeat: float = 0.15  # ... or run twice in a row with this one (first and last layer always run once)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DepthTrain:
    """How a depth-family model is trained beyond its TrainSpec (steps, lr, batch, seed, task weights)."""

    objective: str = "lm"  # "lm": train.train_model's next-token loss; "reader": train_reader's embedding match
    stochastic_depth: StochasticDepthSpec | None = None  # lm only; its random path is seeded with TrainSpec.seed
    freeze_embeddings: bool = False  # lm only: the token embeddings stay the parent's
    reader_layers: int = 2  # reader only: layers 0..reader_layers-1 are trained, all others stay the parent's
    # reader only: the same loss after each earlier reader layer, at this weight (deep supervision). Why: then a
    # path with only the first reader layers already reads part of the cipher, so a search has a slope to climb
    # towards the full reader prefix instead of a needle (measured on the path into depth/arith, composed,
    # 200 fitness items: reader 0 alone 0.0 -> 0.185 with 0.5; reader 0,1: 0.33 -> 0.32).
    reader_early_weight: float = 0.0
    reader_tasks: tuple[str, ...] = ("copy", "reverse", "cipher", "arith")  # reader only: texts prompt+answer

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"DepthTrain.objective must be one of {OBJECTIVES}, not {self.objective!r}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["reader_tasks"] = list(self.reader_tasks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DepthTrain":
        sd = d.get("stochastic_depth")
        return cls(**{**d, "stochastic_depth": StochasticDepthSpec(**sd) if sd else None,
                      "reader_tasks": tuple(d.get("reader_tasks", cls.reader_tasks))})


def code_hash_bytes() -> bytes:
    """This file's bytes: they enter the depth family's job keys (and no other family's)."""
    return Path(__file__).read_bytes()


class StochasticDepth:
    """Stochastic depth while `model` trains: a forward pre-hook on the decoder swaps its layer list per call.

    Each call in training mode draws, with probability `spec.p`, a path: layer 0, then each middle layer dropped
    w.p. `spec.drop` or repeated w.p. `spec.repeat`, then the last layer; otherwise all layers in order. In eval
    mode nothing changes. A context manager: on exit the hook is removed and the original layers are back.
    """

    def __init__(self, model: nn.Module, spec: StochasticDepthSpec, seed: int):
        self.model, self.spec = model, spec
        self.rng = random.Random(seed)
        self.decoder = model.model
        self.layers = self.decoder.layers
        self.n = len(self.layers)
        self.handle = None

    def path(self) -> list[int]:
        """The layer order of one training step (all layers with probability 1 - p)."""
        full = list(range(self.n))
        if self.rng.random() >= self.spec.p:
            return full
        path = [0]
        for i in range(1, self.n - 1):
            r = self.rng.random()
            if r < self.spec.drop:
                continue
            path.append(i)
            if r > 1 - self.spec.repeat:
                path.append(i)
        return path + [self.n - 1]

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict):
        path = self.path() if self.model.training else list(range(self.n))
        module.layers = self.layers if path == list(range(self.n)) else nn.ModuleList([self.layers[i] for i in path])
        module.config.num_hidden_layers = len(path)
        return args, kwargs

    def __enter__(self) -> "StochasticDepth":
        self.handle = self.decoder.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        self.decoder.layers = self.layers
        self.decoder.config.num_hidden_layers = self.n


def freeze_embeddings(model: nn.Module) -> None:
    """No gradient for the token embeddings (AdamW skips them; weight decay never touches them)."""
    model.model.embed_tokens.weight.requires_grad_(False)


def train_lm(model: nn.Module, train: dict, tspec, dspec: DepthTrain) -> dict:
    """train.train_model, with stochastic depth and frozen embeddings as `dspec` says."""
    from evomerge.zoo.train import train_model

    if dspec.freeze_embeddings:
        freeze_embeddings(model)
    try:
        if dspec.stochastic_depth is None:
            return train_model(model, train, tspec)
        with StochasticDepth(model, dspec.stochastic_depth, tspec.seed):
            return train_model(model, train, tspec)
    finally:
        for p in model.parameters():
            p.requires_grad_(True)


def decipher_text(text: str, spec: TaskSpec) -> str:
    """Every cipher letter replaced by the digit it stands for (position-free), other characters as they are."""
    return "".join(str(spec.cipher_letters.index(c)) if c in spec.cipher_letters else c for c in text)


def train_reader(model: nn.Module, train: dict, tspec, dspec: DepthTrain, task_spec: TaskSpec) -> dict:
    """Train layers 0..k-1 so the stream after layer k-1 equals the (frozen) embeddings of the deciphered text.

    Loss: relative squared error over non-pad positions, sum |h - E[decipher(x)]|^2 / sum |E[decipher(x)]|^2,
    plus `reader_early_weight` times the same for the stream after each earlier reader layer.
    Texts are prompt+answer of `dspec.reader_tasks` train items (a BOS first with probability tspec.bos_prob;
    its target is the BOS embedding). Digit text must map to its own embeddings, so the reader is a no-op on
    what the arithmetic expert already reads. AdamW (no weight decay), lr cosine from tspec.lr to 10%.
    """
    k = dspec.reader_layers
    for name, p in model.named_parameters():
        p.requires_grad_(any(f".layers.{i}." in name for i in range(k)))
    emb = model.model.embed_tokens
    rng = random.Random(tspec.seed)
    texts = [it["prompt"] + it["answer"] for t in dspec.reader_tasks for it in train[t]]
    params = [p for p in model.parameters() if p.requires_grad]
    lr = tspec.lr
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    got: dict = {}

    def keep(j: int):
        def hook(module, args, out):
            got[j] = out[0] if isinstance(out, tuple) else out
        return hook

    handles = [model.model.layers[j].register_forward_hook(keep(j)) for j in range(k)]
    own, n = model.model.layers, model.config.num_hidden_layers
    model.model.layers = nn.ModuleList(list(own[:k]))  # the later layers are not needed for this loss
    model.model.config.num_hidden_layers = k
    model.train()
    t0, losses = time.time(), []
    try:
        for step in range(tspec.steps):
            batch = [rng.choice(texts) for _ in range(tspec.batch_size)]
            enc = [[ztok.BOS_ID] * (rng.random() < tspec.bos_prob) + ztok.encode(s) for s in batch]
            tgt = [[ztok.BOS_ID] * (len(e) - len(s)) + ztok.encode(decipher_text(s, task_spec)) for e, s in zip(enc, batch)]
            width = max(map(len, enc))
            ids = torch.tensor([e + [ztok.PAD_ID] * (width - len(e)) for e in enc])
            tid = torch.tensor([t + [ztok.PAD_ID] * (width - len(t)) for t in tgt])
            mask = torch.tensor([[1.0] * len(e) + [0.0] * (width - len(e)) for e in enc])[..., None]
            model.model(input_ids=ids, use_cache=False)
            with torch.no_grad():
                target = emb(tid)
            norm = ((target**2) * mask).sum()
            loss = (((got[k - 1] - target) ** 2) * mask).sum() / norm
            if dspec.reader_early_weight:
                loss = loss + dspec.reader_early_weight * sum((((got[j] - target) ** 2) * mask).sum() / norm
                                                              for j in range(k - 1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            for g in opt.param_groups:  # the rate for the next step: cosine from lr to 10%
                g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / tspec.steps)))
            losses.append(loss.item())
    finally:
        for handle in handles:
            handle.remove()
        model.model.layers = own
        model.model.config.num_hidden_layers = n
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)
    tail = losses[-50:]
    return {"seconds": round(time.time() - t0, 1), "final_loss": round(sum(tail) / max(1, len(tail)), 5),
            "first_loss": round(losses[0], 3) if losses else None}


def train_depth(model: nn.Module, train: dict, tspec, dspec: DepthTrain, task_spec: TaskSpec) -> dict:
    """Train one depth-family model in place by its objective. Returns stats (seconds, final_loss)."""
    if dspec.objective == "reader":
        return train_reader(model, train, tspec, dspec, task_spec)
    return train_lm(model, train, tspec, dspec)


def depth_family_settings() -> tuple[dict, dict]:
    """The depth family's TrainSpecs (role -> TrainSpec) and DepthTrains (role -> DepthTrain), base first."""
    from evomerge.zoo.train import TrainSpec

    sd = StochasticDepthSpec(p=0.5, drop=0.15, repeat=0.15)
    # Mostly generic string tasks, a little of each skill; the base masters the cipher, not arithmetic.
    mix = {"copy": 0.5, "reverse_short": 0.3, "arith": 0.08, "cipher": 0.12}
    train = {
        "base": TrainSpec(steps=1500, lr=1.5e-3, batch_size=32, warmup=50, weight_decay=0.01, seed=1, task_weights=mix),
        "arith": TrainSpec(steps=1500, lr=1e-3, batch_size=64, warmup=30, weight_decay=0.0, seed=10, task_weights={"arith": 1.0}),
        # reader: warmup and task_weights are unused (its own loop and texts); steps, lr, batch, seed, bos_prob are
        "reader": TrainSpec(steps=3000, lr=1e-3, batch_size=64, warmup=0, weight_decay=0.0, seed=21, task_weights={}),
    }
    depth = {
        "base": DepthTrain(stochastic_depth=sd),
        "arith": DepthTrain(stochastic_depth=sd, freeze_embeddings=True),
        "reader": DepthTrain(objective="reader", reader_layers=2, reader_early_weight=0.5),
    }
    return train, depth


__all__ = ["DepthTrain", "StochasticDepthSpec", "StochasticDepth", "train_depth", "train_lm", "train_reader",
           "decipher_text", "depth_family_settings", "code_hash_bytes"]
