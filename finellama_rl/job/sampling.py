"""Keyed sampling: what a sequence samples depends on (run seed, step, its index, the token
position) only, never on which other sequences shared its generate() call, how many calls a
step was cut into, how many ranks there are, or an out-of-memory step-down (issue 20).

    from finellama_rl.job.sampling import generate_keyed, row_keys
    out = generate_keyed(model, row_keys(seed, step, range(first, first + B)), input_ids=ids,
                         attention_mask=mask, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, ...)

Used by PPO's rollout (trainers/ppo_rollout.py), pass@k sampling in evaluation
(eval/generation.py) and GRPO inside TRL (trainers/grpo.py wraps the model's generate()
with `keyed_generate`). Greedy calls are passed through untouched.

How (Gumbel-max): `RowSampler`, a LogitsProcessor, applies the sampling warpers itself
(temperature, top-k, top-p, min-p: transformers' own classes in transformers' order),
adds Gumbel(0, 1) noise g = -log(-log u) and takes the argmax: argmax(z + g) is
distributed exactly as softmax(z) (the Gumbel-max theorem), i.e. as generate()'s own
sampling. u comes from a counter-based hash of (row key, position, vocabulary id), so no
torch generator is involved and the noise is the same on CPU and GPU. The processor
returns a one-hot row (0 at the choice, -inf elsewhere), and generate() runs in greedy
mode (do_sample=False, warpers off), so its argmax returns the chosen token and nothing
else is drawn: generate() leaves the global RNG alone.

Why Gumbel-max rather than one uniform per row through the CDF: on a GPU the logits of a
row move in their last bits with the batch shape (bf16 GEMM tiling); with Gumbel-max a
token changes only when two perturbed scores are that close (0 of 256 rows changed at a
logit noise of 1e-2 in the issue-20 measurements), while the CDF method changed 0.4% of
rows at 1e-6 and 15% at 1e-2 (docs/LOG.md, issue 20).

Hash: keys are SplitMix64 chains (numpy uint64: wrap-around is defined) of (seed, stream,
step, sequence index), then of (key, position); the (rows x vocabulary) noise, the cost, is
one Mueller 32-bit mix (int64 lanes, multiplier < 2**27: no overflow) of (position key XOR
a fixed per-token hash). A weaker key chain (Mueller mixes of sequential indices) left the
argmax counts of 200,000 rows over-dispersed (41 of 500 seeds past chi-square's 5% point,
25 expected); SplitMix64 keys give 24 of 500, like torch.rand (docs/LOG.md, issue 20).
u takes the top 23 bits: u = (k + 0.5) / 2**23 is exact in float32, so g lies in
[-2.8, 16.6]: a token whose Gumbel draw would exceed 16.6 (probability 6e-8) is cut
there, the same order as float32 multinomial's resolution. Cost: about 15 elementwise
passes over (rows x vocabulary) per token, which replace the softmax and multinomial of
generate()'s own sampling; for small vocabularies the noise of several positions is made
at once (`SPAN_ELEMENTS`), so the per-call overhead of torch ops is paid once per block.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import numpy as np
import torch

M32 = 0xFFFFFFFF
M64 = (1 << 64) - 1
_C = 0x45D9F3B  # Mueller's multiplier (< 2**27: x * _C < 2**59 for x < 2**32)
_GOLDEN64 = np.uint64(0x9E3779B97F4A7C15)
_VOCAB_SALT = 0x632BE5AB
SPAN_ELEMENTS = 1 << 16  # small vocabularies: noise of several positions at once, up to rows x positions x V of this
# rows are hashed in pieces of at most this many elements: bounded int64 temporaries (about 3 x 8 bytes each);
# small pieces stay in a CPU's cache, large ones spare a GPU kernel launches
CHUNK_ELEMENTS = {"cpu": 1 << 18, "cuda": 1 << 23}
NEUTRAL = {"typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "top_h": None}  # warpers we do not implement
VERSION = "keyed-gumbel-v1"  # recorded in eval files: a change to the hash changes what is sampled


# ------------------------------------------------------------------------ keys


def _splitmix64(x) -> np.ndarray:
    """SplitMix64's finaliser (Vigna) on uint64 arrays: a bijection that turns counters into
    well-mixed 64-bit values."""
    z = np.asarray(x, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = z + _GOLDEN64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_keys(seed: int, step: int, indices: Iterable[int], stream: int = 0) -> List[int]:
    """One 64-bit key per sequence from (seed, step, its index). `stream` separates uses
    (0: training rollouts, 1: pass@k evaluation): the same index never shares noise across them."""
    h = _splitmix64(seed & M64)
    for part in (stream, step):
        h = _splitmix64(h ^ np.uint64(part & M64))
    return [int(k) for k in _splitmix64(h ^ np.asarray([i & M64 for i in indices], dtype=np.uint64))]


def position_keys(keys: Sequence[int], positions: Sequence[int], device=None) -> torch.Tensor:
    """(B, P) int64 of 32-bit values: each row key combined with each token position."""
    k = np.asarray(keys, dtype=np.uint64)[:, None]
    with np.errstate(over="ignore"):
        z = _splitmix64(k ^ (np.asarray(positions, dtype=np.uint64)[None, :] * _GOLDEN64))
    return torch.from_numpy((z >> np.uint64(32)).astype(np.int64)).to(device)


def _mix_(x: torch.Tensor) -> torch.Tensor:
    """Mueller's bijective 32-bit mix on an int64 tensor of 32-bit values, in place."""
    x ^= x >> 16
    x *= _C
    x &= M32
    x ^= x >> 16
    x *= _C
    x &= M32
    x ^= x >> 16
    return x


@functools.lru_cache(maxsize=8)
def _vocab_hash(vocab: int, device) -> torch.Tensor:
    """(V,) int64 of 32-bit values: a fixed hash per vocabulary id."""
    z = _splitmix64(np.arange(vocab, dtype=np.uint64) ^ np.uint64(_VOCAB_SALT)) >> np.uint64(32)
    return torch.from_numpy(z.astype(np.int64)).to(device)


def gumbel_noise(position_key: torch.Tensor, vocab_hash: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) noise (B, P, V) float32 from position keys (B, P) and the vocabulary hash (V,)."""
    x = _mix_(position_key.unsqueeze(-1) ^ vocab_hash)                            # (B, P, V) int64, 32-bit values
    x >>= 8
    x |= 1                                                                          # 2k + 1, k = the top 23 bits
    u = x.to(torch.float32).mul_(2.0 ** -24)                                        # (k + 0.5) / 2**23, exact
    return u.log_().neg_().log_().neg_()                                            # -log(-log u)


# ------------------------------------------------------------------- processor


class RowSampler:
    """LogitsProcessor: sample row i from softmax(warped scores) with the noise of keys[i].

    keys: one per row of the generate() batch (with num_return_sequences = n, n adjacent
    rows per prompt). The token position counts from the first generated token (the width
    of input_ids at the first call), so one RowSampler serves one generate() call.
    `bias`: {token id: added logit} before the warpers (debug.eos_logit_bias, tests only).
    """

    def __init__(self, keys: Sequence[int], temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: Optional[float] = None, bias: Optional[Dict[int, float]] = None):
        from transformers.generation.logits_process import (
            MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
        )

        self.keys = np.asarray(list(keys), dtype=np.uint64)
        self.bias = {int(k): float(v) for k, v in (bias or {}).items() if v}
        self.warpers: List[Any] = []  # transformers' order (generation/utils.py _get_logits_processor)
        if temperature is not None and temperature != 1.0:
            self.warpers.append(TemperatureLogitsWarper(temperature))
        if top_k:
            self.warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p is not None and top_p < 1.0:
            self.warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
        if min_p is not None:
            self.warpers.append(MinPLogitsWarper(min_p=min_p, min_tokens_to_keep=1))
        self.start: Optional[int] = None
        self.calls = 0
        self._block: Optional[torch.Tensor] = None  # (B, P, V) noise of positions [_first, _first + P)
        self._first = 0

    def noise(self, position: int, vocab: int, device) -> torch.Tensor:
        """(B, V) noise at `position`, made a block of positions at a time."""
        device = torch.device(device)
        block = self._block
        if block is None or not self._first <= position < self._first + block.shape[1] or block.shape[2] != vocab \
                or block.device != device:
            rows = self.keys.shape[0]
            span = max(1, SPAN_ELEMENTS // max(1, rows * vocab))
            keys = position_keys(self.keys, range(position, position + span), device)  # (B, span)
            vocab_hash = _vocab_hash(vocab, device)
            chunk = max(1, CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"]) // (vocab * span))  # rows per piece
            self._block = torch.cat([gumbel_noise(keys[i:i + chunk], vocab_hash) for i in range(0, rows, chunk)])
            self._first = position
        return self._block[:, position - self._first]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.start is None:
            self.start = input_ids.shape[1]
        if self.keys.shape[0] != scores.shape[0]:
            raise ValueError(f"RowSampler has {self.keys.shape[0]} keys for a batch of {scores.shape[0]} rows")
        self.calls += 1
        scores = scores.float()
        for token, value in self.bias.items():
            scores[:, token] += value
        for warper in self.warpers:
            scores = warper(input_ids, scores)
        choice = (scores + self.noise(input_ids.shape[1] - self.start, scores.shape[-1], scores.device)).argmax(-1)
        return torch.full_like(scores, float("-inf")).scatter_(1, choice.unsqueeze(1), 0.0)  # (B, V) one-hot


# ------------------------------------------------------------------- generate


def _setting(kwargs: Dict[str, Any], name: str):
    config = kwargs.get("generation_config")
    return kwargs[name] if name in kwargs else getattr(config, name, None)


def keyed_kwargs(keys: Sequence[int], kwargs: Dict[str, Any], bias: Optional[Dict[int, float]] = None) -> Dict[str, Any]:
    """generate() kwargs that sample keyed: the sampling settings of `kwargs` (or of its
    generation_config) move into a RowSampler, and generate() runs greedy on its one-hot
    rows. With num_return_sequences = n the inputs are repeated here (greedy generate()
    refuses n > 1), so `keys` has one key per output row. Greedy kwargs come back as they are."""
    if not _setting(kwargs, "do_sample"):
        return kwargs
    for name, neutral in NEUTRAL.items():
        value = _setting(kwargs, name)
        if value is not None and value != neutral:
            raise ValueError(f"keyed sampling implements temperature, top_k, top_p and min_p; {name}={value} is not supported")
    if (_setting(kwargs, "num_beams") or 1) != 1:
        raise ValueError("keyed sampling samples one beam per row (num_beams=1)")
    sampler = RowSampler(keys, _setting(kwargs, "temperature"), _setting(kwargs, "top_k") or 0,
                         _setting(kwargs, "top_p"), _setting(kwargs, "min_p"), bias)
    out = dict(kwargs)
    n = out.pop("num_return_sequences", None) or getattr(out.get("generation_config"), "num_return_sequences", None) or 1
    if n > 1:
        for name in ("input_ids", "attention_mask"):
            if name in out:
                out[name] = out[name].repeat_interleave(n, dim=0)
    greedy = dict(do_sample=False, temperature=None, top_k=None, top_p=None, min_p=None, num_return_sequences=1)
    if out.get("generation_config") is not None:
        config = copy.deepcopy(out["generation_config"])
        config.update(**greedy)
        out["generation_config"] = config
    for name in greedy:
        if name in out or out.get("generation_config") is None:
            out[name] = greedy[name]
    out["logits_processor"] = [*(out.get("logits_processor") or []), sampler]
    return out


def generate_keyed(model, keys: Sequence[int], bias: Optional[Dict[int, float]] = None, **kwargs):
    """model.generate(**kwargs), sampling each output row under its key (see keyed_kwargs)."""
    return _generate(model.generate, keys, bias, kwargs)


def _generate(generate, keys: Sequence[int], bias: Optional[Dict[int, float]], kwargs: Dict[str, Any]):
    from transformers import LogitsProcessorList

    kw = keyed_kwargs(keys, kwargs, bias)
    if "logits_processor" in kw:
        kw["logits_processor"] = LogitsProcessorList(kw["logits_processor"])
    return generate(**kw)


class KeyedCalls:
    """What `keyed_generate` saw: how many generate() calls went through it."""

    calls = 0


@contextlib.contextmanager
def keyed_generate(model, keys: Sequence[int], bias: Optional[Dict[int, float]] = None) -> Iterator[KeyedCalls]:
    """Within the block, model.generate(...) samples keyed (generate_keyed), for callers
    whose generate() call we do not own (TRL's GRPOTrainer). An instance attribute shadows
    the method and is removed afterwards; the yielded record counts the calls, so a caller
    can check that the generate() it meant was the one that ran."""
    original, seen = model.generate, KeyedCalls()  # the bound method

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if args:
            raise TypeError("keyed generate() takes keyword arguments only")
        seen.calls += 1
        return _generate(original, keys, bias, kwargs)

    model.generate = generate
    try:
        yield seen
    finally:
        del model.generate
