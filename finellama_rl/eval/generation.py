"""Batched generation for evaluation and pass@k sampling: prompts in, completion
texts (cut at the protocol's stop strings) out, with explicit decoding settings,
prompts sorted by length, out-of-memory step-down and a problems/s progress bar.

    from finellama_rl.eval.generation import Decoding, generate_completions
    gen = generate_completions(model, tokenizer, prompts, Decoding(max_new_tokens=256), stops, batch_size=64)
    gen.completions[i].text, gen.completions[i].finish

Correctness traps handled here:
- transformers 5.x fills every generate() argument left unset from the model's
  generation_config (Qwen2.5-Instruct ships repetition_penalty 1.05, temperature
  0.7, top_p 0.8, top_k 20). We pass every setting ourselves AND swap the model's
  generation_config for a neutral one during the call, so a model's file can never
  change a protocol (tests/test_generation.py: repetition_penalty 1.05 changes nothing).
- Prompts are sorted by token length (longest first: an OOM shows at once, and
  batches carry little padding); results come back in the original order. Greedy
  results do not depend on the batch (left padding; checked in a test).
- A completion is cut at the first eos id (tokenizer's and model's), then at the
  earliest stop string; `finish` says which ended it ("eos", "stop:<s>", "length").
- Sampling (pass@k) is keyed (finellama_rl/job/sampling.py): sample s of problem j draws
  from (Decoding.seed, j, s) only, so the batch size, the length sorting and an
  out-of-memory step-down never change what is sampled (tests/test_generation.py), and
  evaluations of different checkpoints share the noise of each (problem, sample) (common
  random numbers: less variance in before/after comparisons). The global RNG is untouched.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Sequence

from finellama_rl.task.scoring import cut_at_stop
from finellama_rl.job.devices import free_memory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Decoding:
    """Every decoding setting of one evaluation (greedy by default)."""

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    num_return_sequences: int = 1
    seed: Optional[int] = None  # sampling: the key of every (problem, sample)'s draws (None: 0)

    def generate_kwargs(self) -> Dict[str, Any]:
        """Every output-relevant generate() setting, neutral where the protocol says nothing."""
        return {
            "max_new_tokens": self.max_new_tokens, "min_new_tokens": 0, "do_sample": self.do_sample,
            "temperature": self.temperature if self.do_sample else 1.0, "top_p": self.top_p if self.do_sample else 1.0,
            "top_k": self.top_k if self.do_sample else 50, "typical_p": 1.0, "epsilon_cutoff": 0.0,
            "eta_cutoff": 0.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
            "no_repeat_ngram_size": 0, "num_beams": 1, "num_beam_groups": 1, "length_penalty": 1.0,
            "diversity_penalty": 0.0, "renormalize_logits": False, "num_return_sequences": self.num_return_sequences,
            "use_cache": True,
        }

    def record(self) -> Dict[str, Any]:
        """What the eval JSON says about decoding (greedy: sampling knobs are inactive, shown as None)."""
        kw = self.generate_kwargs()
        if not self.do_sample:
            kw.update(temperature=None, top_p=None, top_k=None)
        elif not self.top_k:
            kw.update(top_k=None)
        out = {"decoding": "sampling" if self.do_sample else "greedy", **kw, "min_p": None, "seed": self.seed,
               "model_generation_config": "ignored (neutral GenerationConfig during generate)"}
        if self.do_sample:
            from finellama_rl.job.sampling import VERSION

            out["sampler"] = VERSION  # keyed by (seed, problem, sample): independent of the batch
        return out


@dataclass(frozen=True)
class Completion:
    text: str
    finish: str  # "eos" | "stop:<string>" | "length"
    new_tokens: int


@dataclass
class Generated:
    completions: List[Completion]
    prompts: int
    batch_size: int  # sequences per generate call at the end (after any OOM step-down)
    seconds: float
    calls: int
    oom_steps: List[int] = field(default_factory=list)  # batch sizes that ran out of memory

    @property
    def problems_per_s(self) -> float:
        return 0.0 if self.seconds <= 0 else self.prompts / self.seconds


def eos_token_ids(model, tokenizer) -> List[int]:
    """The tokenizer's eos id plus the model's generation_config eos ids (Qwen2.5-Instruct lists two)."""
    ids: List[int] = []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, configured):
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids


def model_generation_overrides(model) -> Dict[str, Any]:
    """The model's generation_config values that differ from transformers' defaults (recorded, then ignored)."""
    gc = getattr(model, "generation_config", None)
    if gc is None:
        return {}
    from transformers import GenerationConfig

    skip = {"transformers_version", "_from_model_config", "bos_token_id", "eos_token_id", "pad_token_id"}
    defaults = GenerationConfig._get_default_generation_params()
    return {k: v for k, v in gc.to_diff_dict().items()
            if k not in skip and not k.startswith("output_") and (k not in defaults or defaults[k] != v)}


@contextlib.contextmanager
def neutral_generation_config(model) -> Iterator[None]:
    """Swap every generation_config in the module tree (a PeftModel wraps the HF model) for a
    neutral GenerationConfig while generating, so that none of the model's values leak in."""
    from transformers import GenerationConfig

    # Only modules that own the attribute: a PeftModel forwards `generation_config` to the HF model
    # (and its generate() copies it there), so swapping the owner covers the wrapper too.
    holders = [m for m in model.modules() if isinstance(vars(m).get("generation_config"), GenerationConfig)]
    saved = [m.generation_config for m in holders]
    try:
        for m, old in zip(holders, saved):
            m.generation_config = GenerationConfig(bos_token_id=old.bos_token_id, eos_token_id=old.eos_token_id,
                                                   pad_token_id=old.pad_token_id)
        yield
    finally:
        for m, old in zip(holders, saved):
            m.generation_config = old


def _special_texts(tokenizer) -> List[str]:
    return sorted({t for t in getattr(tokenizer, "all_special_tokens", []) if t}, key=len, reverse=True)


def finish_text(tokenizer, ids: Sequence[int], stop_ids: Sequence[int], stops: Sequence[str],
                max_new_tokens: int) -> Completion:
    """Cut new token ids at the first eos/pad id, decode, cut at the earliest stop string,
    and drop any remaining special-token text."""
    ids = list(ids)
    cut = next((i for i, t in enumerate(ids) if t in stop_ids), None)
    kept = ids if cut is None else ids[:cut]
    text, stop = cut_at_stop(tokenizer.decode(kept, skip_special_tokens=False), stops)
    for special in _special_texts(tokenizer):
        text = text.replace(special, "")
    finish = f"stop:{stop}" if stop else ("eos" if cut is not None else ("length" if len(ids) >= max_new_tokens else "eos"))
    return Completion(text, finish, len(kept))


SAMPLING_STREAM = 1  # keyed sampling: evaluation's keys never share noise with training rollouts (stream 0)


def _generate_chunk(model, tokenizer, ids: List[List[int]], decoding: Decoding, stops: Sequence[str],
                    stop_ids: List[int], problems: Sequence[int]) -> List[Completion]:
    """Completions of the prompts `ids`, which are problems `problems` of the evaluation
    (their indices: the sampling keys)."""
    import torch

    from finellama_rl.job.sampling import generate_keyed, row_keys

    enc = tokenizer.pad({"input_ids": ids}, padding=True, return_tensors="pt").to(model.device)  # left padding
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    n = decoding.num_return_sequences
    keys = row_keys(decoding.seed or 0, 0, [j * n + s for j in problems for s in range(n)], stream=SAMPLING_STREAM)
    with torch.no_grad(), neutral_generation_config(model):
        out = generate_keyed(model, keys, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             eos_token_id=stop_ids, pad_token_id=pad_id, stop_strings=list(stops) or None,
                             tokenizer=tokenizer, **decoding.generate_kwargs())  # (B * n, prompt + new)
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    cut_ids = set(stop_ids) | {pad_id}
    return [finish_text(tokenizer, row, list(cut_ids), stops, decoding.max_new_tokens) for row in new]


def generate_completions(model, tokenizer, prompts: Sequence[str], decoding: Decoding, stops: Sequence[str],
                         batch_size: int, desc: str = "eval") -> Generated:
    """Completions for `prompts` (num_return_sequences of a prompt are adjacent), about
    `batch_size` sequences per generate call, halving on out-of-memory down to one prompt."""
    from tqdm import tqdm

    from finellama_rl.ladder.rungs import is_oom_error

    n = decoding.num_return_sequences
    stop_ids = eos_token_ids(model, tokenizer)
    token_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]  # one batched call
    order = sorted(range(len(prompts)), key=lambda i: -len(token_ids[i]))  # longest first (stable)
    per_call = max(1, batch_size // n)
    results: List[Optional[List[Completion]]] = [None] * len(prompts)
    oom_steps: List[int] = []
    was_training, started, calls = model.training, time.perf_counter(), 0
    model.eval()
    bar = tqdm(total=len(prompts), desc=desc, unit="problem", file=sys.stderr, mininterval=5, leave=False)
    try:
        i = 0
        while i < len(order):
            chunk = order[i : i + per_call]
            try:
                texts = _generate_chunk(model, tokenizer, [token_ids[j] for j in chunk], decoding, stops, stop_ids, chunk)
            except Exception as exc:  # noqa: BLE001 - only out-of-memory is handled here
                if not is_oom_error(exc) or per_call == 1:
                    raise
                oom_steps.append(per_call * n)
                per_call = max(1, per_call // 2)
                log.warning("%s: out of memory at %d sequences per call; retrying at %d", desc, oom_steps[-1], per_call * n)
                free_memory(reset_peak=False)
                continue
            for k, j in enumerate(chunk):
                results[j] = texts[k * n : (k + 1) * n]
            calls += 1
            i += len(chunk)
            bar.update(len(chunk))
    finally:
        bar.close()
        model.train(was_training)
    seconds = time.perf_counter() - started
    flat = [c for per_prompt in results for c in per_prompt]  # type: ignore[union-attr]
    log.info("%s: %d problems in %.1f s (%.2f problems/s, %d generate calls of up to %d sequences)",
             desc, len(prompts), seconds, len(prompts) / seconds if seconds else 0.0, calls, per_call * n)
    return Generated(flat, len(prompts), per_call * n, seconds, calls, oom_steps)
