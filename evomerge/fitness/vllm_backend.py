"""The vLLM backend: one engine per worker (lm-eval's `VLLM` model), candidates' weights pushed in place.

Weights go through vLLM's own in-place reload (`reload_weights` on the worker, vLLM V1), which feeds
checkpoint-named tensors to the model's `load_weights`: vLLM itself fuses q/k/v and gate/up and redoes
any kernel-specific repacking. Nothing is hard-coded per architecture here.

Two paths, chosen once:
- in-process (default here: the engine core runs in this process, `VLLM_ENABLE_V1_MULTIPROCESSING=0`):
  `reload_weights(weights_iterator=...)` with the tensors themselves; no copy leaves the process. Given an
  iterator (the scorer's merge, tensor by tensor), the engine consumes it as it is produced: no staging copy.
- multi-process engines (set VLLM_ENABLE_V1_MULTIPROCESSING=1, tensor parallel): the tensors cannot be
  sent as an iterator, so they are written as safetensors shards of at most `SHM_SHARD_BYTES` to a folder
  in /dev/shm (RAM) and reloaded with `reload_weights(weights_path=...)`.
After each push the prefix cache is reset: cached KV blocks belong to the previous candidate.

The script that builds this backend must guard its entry point with `if __name__ == "__main__":`.
One engine per process: vLLM's parallel state is process-global, so closing a second in-process engine
breaks the first. A worker (Ray actor) holds exactly one; compare against a fresh engine in another process.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch

from evomerge.compat import lm_eval as lm_eval_compat
from evomerge.compat.vllm import lm_eval_vllm_class
from evomerge.fitness.objectives import CandidateFailed


SHM_SHARD_BYTES = 1 << 30  # a multi-process hand-off holds one shard being built at a time, not the model


class VLLMBackend:
    name = "vllm"

    def __init__(self, model_dir: str | Path, dtype: str = "float32", max_model_len: int | None = None,
                 batch_size: str | int = 4096, weights_via: str = "auto", **engine_args: Any):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine: tensors pass directly
        if not torch.cuda.is_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            engine_args.setdefault("enforce_eager", True)
        VLLM = lm_eval_vllm_class()
        self.model_dir = Path(model_dir)
        kw = {"max_model_len": max_model_len} if max_model_len else {}
        # an int batch size (vLLM schedules within it) keeps lm-eval from asking vLLM for a progress bar
        start = time.perf_counter()
        self.lm = VLLM(pretrained=str(self.model_dir), dtype=dtype, batch_size=batch_size, **kw, **engine_args)
        self.start_seconds = time.perf_counter() - start
        self.llm = self.lm.model
        in_process = type(self.llm.llm_engine.engine_core).__name__ == "InprocClient"
        if weights_via == "auto":
            weights_via = "iterator" if in_process else "shm"
        if weights_via == "iterator" and not in_process:
            raise ValueError("weights_via='iterator' needs an in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0)")
        self.weights_via = weights_via
        self._shm: Path | None = None
        self.forward_seconds = 0.0
        self.reload_seconds = 0.0

        def add(seconds: float) -> None:
            self.forward_seconds += seconds

        lm_eval_compat.time_methods(self.lm, ("_model_generate",), add)
        from evomerge.checkpoints import open_checkpoint
        from evomerge.checkpoints.arch import Architecture

        ck = open_checkpoint(self.model_dir)
        self._params = int(ck.num_params)
        self._layers = Architecture.from_config(ck.config).num_layers

    @torch.no_grad()
    def load(self, weights: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push checkpoint-named tensors (a mapping, or (name, tensor) pairs produced one at a time) into the
        engine in place, then drop cached prefixes."""
        start = time.perf_counter()
        pairs = iter(list(weights.items())) if isinstance(weights, Mapping) else iter(weights)
        if self.weights_via == "iterator":
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": pairs})
        else:
            folder = self._shm_dir()
            self._write_shards(folder, pairs)
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
        self.llm.reset_prefix_cache()
        self.reload_seconds += time.perf_counter() - start

    @staticmethod
    def _write_shards(folder: Path, pairs: Iterator[tuple[str, torch.Tensor]]) -> None:
        """The pairs as safetensors shards of at most SHM_SHARD_BYTES (one shard in memory at a time, with the
        index vLLM's loader reads), replacing the previous candidate's."""
        from evomerge.checkpoints.io import write_shards

        for old in folder.glob("model*.safetensors*"):
            old.unlink()
        write_shards(folder, pairs, SHM_SHARD_BYTES)

    def _shm_dir(self) -> Path:
        if self._shm is None:
            root = "/dev/shm" if Path("/dev/shm").is_dir() else None
            self._shm = Path(tempfile.mkdtemp(prefix="evomerge-candidate-", dir=root))
            for f in self.model_dir.iterdir():  # config and tokenizer files, not the weights
                if f.is_file() and not f.name.endswith((".safetensors", ".bin")) and f.name != "model.safetensors.index.json":
                    shutil.copy(f, self._shm / f.name)
        return self._shm

    def probe(self) -> None:
        """One short greedy step with log-probabilities: NaN/inf means a failed candidate."""
        from vllm import SamplingParams

        out = self.llm.generate([{"prompt_token_ids": self.lm.tok_encode("0")}],
                                SamplingParams(temperature=0, max_tokens=1, logprobs=1), use_tqdm=False)
        comp = out[0].outputs[0]
        lps = [lp.logprob for step in (comp.logprobs or []) for lp in step.values()]
        if not lps or not all(torch.isfinite(torch.tensor(lps))):
            raise CandidateFailed("the forward pass yields NaN or inf log-probabilities")

    def param_count(self) -> int:
        return self._params

    def layer_count(self) -> int:
        return self._layers

    def close(self) -> None:
        if self._shm is not None:
            shutil.rmtree(self._shm, ignore_errors=True)
            self._shm = None
        llm = getattr(self, "llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # best effort: the process may be exiting
                pass
            self.llm = None
