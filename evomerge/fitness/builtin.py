"""Built-in objectives that need no lm-eval task: perplexity on a text file, parameter and layer count,
generation latency. Each goes through the backend's lm-eval model, so both backends share the code."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

from evomerge.fitness.objectives import Objective


def _instance(reqtype: str, args: tuple, idx: int = 0):
    from lm_eval.api.instance import Instance

    return Instance(request_type=reqtype, doc={}, arguments=args, idx=idx, metadata=("evomerge", idx, 1))


class TextDocs:
    """A text file cut into documents at blank lines; cached per worker."""

    def __init__(self, path: str, limit: int | None = None):
        text = Path(path).read_text()
        docs = [d.strip("\n") for d in text.split("\n\n") if d.strip()]
        self.docs = docs[:limit] if limit else docs


def perplexity(lm, docs: TextDocs) -> tuple[float, dict[str, float]]:
    """Token-level perplexity: exp(-sum log p / tokens). Per item: each document's own perplexity."""
    reqs = [_instance("loglikelihood_rolling", (d,), i) for i, d in enumerate(docs.docs)]
    lls = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    total_ll, total_tok, items = 0.0, 0, {}
    for i, (doc, ll) in enumerate(zip(docs.docs, lls)):
        n = max(1, len(lm.tok_encode(doc)))
        total_ll += float(ll)
        total_tok += n
        items[str(i)] = math.exp(-float(ll) / n) if math.isfinite(float(ll)) else math.nan
    return math.exp(-total_ll / max(1, total_tok)), items


def latency(lm, obj: Objective) -> float:
    """Median seconds to greedily generate up to `max_new_tokens` for one prompt (batch of one)."""
    req = _instance("generate_until", (obj.prompt, {"until": [], "max_gen_toks": obj.max_new_tokens, "do_sample": False}))
    lm.generate_until([req], disable_tqdm=True)  # warm-up
    times = []
    for _ in range(obj.repeats):
        start = time.perf_counter()
        lm.generate_until([req], disable_tqdm=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
