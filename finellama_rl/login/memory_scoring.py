"""Memory of the frozen scoring models (reward model, judge): a separate, additive part of
a run's GPU memory, next to the policy's peak from memory.py.

Why additive: a scoring model's weights stay resident for the whole run, and it scores
between the policy's generation and its update; we count its weights plus its own
transient (a no-grad forward, or the judge's generation with its KV cache) on top of the
policy's peak on the GPU it shares, rather than betting that the allocator reuses the
policy's freed blocks. On a GPU of its own it pays its own CUDA context instead.

- weights: decoder linears at the scoring precision (nf4: NF4 + double-quant constants and
  one dequantized matrix; int8: one byte per weight + fp32 row scales and one dequantized
  matrix; bf16: 2; fp32: 4), embeddings (bitsandbytes leaves them unquantized: compute
  dtype), a causal LM's untied lm_head, and a classifier's head (negligible).
- reward model transient: one layer's no-grad working set for the batch (residual, normed
  input, gate/up/activation: 2h + 3I per token) plus, for a PRM, two-class logits per token.
- judge transient: memory.py's generation model (prefill working set or KV cache at the
  last step, whichever is larger) for judge.batch_size prompts of the judge's input length
  plus the verdict tokens.
Pure module: no torch import. Not calibrated on a GPU (no device was lent).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

from finellama_rl.login.memory import NF4_BYTES_DOUBLE_QUANT, ModelShape, _embedding_params, _linear_dims, _linear_params

PRECISION_BYTES = {"bf16": 2, "fp32": 4}
CONTEXT_BYTES = 768 * 1024 ** 2  # CUDA context of a GPU the scorer has to itself (as memory.py)
FRAGMENTATION = 0.10


@dataclass(frozen=True)
class ScoringInputs:
    shape: ModelShape
    role: str  # "reward_model" (one no-grad forward) | "judge" (greedy generation)
    precision: str  # nf4 | int8 | bf16 | fp32
    compute_bytes: int  # activations: 2 (bf16) or 4
    batch: int  # sequences per scoring call
    input_tokens: int  # tokens each sequence reads
    new_tokens: int = 0  # judge: verdict tokens generated
    prm: bool = False  # reward model with per-token two-class logits

    def __post_init__(self) -> None:
        if self.role not in ("reward_model", "judge"):
            raise ValueError(f"role must be reward_model or judge, got {self.role!r}")
        if self.precision not in ("nf4", "int8", "bf16", "fp32"):
            raise ValueError(f"precision must be nf4|int8|bf16|fp32, got {self.precision!r}")
        if self.batch < 1 or self.input_tokens < 1:
            raise ValueError("batch and input_tokens must be >= 1")


def scoring_weight_bytes(inp: ScoringInputs) -> int:
    """Resident bytes of the scoring model's weights at its precision."""
    s = inp.shape
    linear = _linear_params(s)
    embed = s.vocab_size * s.hidden_size
    leftover = max(0, s.params - linear - _embedding_params(s))
    largest = max(i * o for i, o in _linear_dims(s).values())
    if inp.precision in PRECISION_BYTES:
        b = PRECISION_BYTES[inp.precision]
        linear_bytes, rest_bytes, dequant = linear * b, b, 0
    elif inp.precision == "nf4":
        linear_bytes, rest_bytes, dequant = int(linear * NF4_BYTES_DOUBLE_QUANT), inp.compute_bytes, largest * inp.compute_bytes
    else:  # int8: one byte per weight + an fp32 scale per output row
        rows = s.num_layers * sum(o for _, o in _linear_dims(s).values())
        linear_bytes, rest_bytes, dequant = linear + 4 * rows, inp.compute_bytes, largest * inp.compute_bytes
    head = embed if (inp.role == "judge" and not s.tie_embeddings) else 0  # classifiers replace lm_head by a small head
    return linear_bytes + (embed + head + leftover) * rest_bytes + dequant


def scoring_transient_bytes(inp: ScoringInputs) -> int:
    """Bytes of one scoring call beyond the weights (see module docstring)."""
    s, b, n = inp.shape, inp.compute_bytes, inp.batch
    layer = b * (2 * s.hidden_size + 3 * s.intermediate_size)
    if inp.role == "reward_model":
        prm_logits = n * inp.input_tokens * 2 * 4 if inp.prm else 0
        return n * inp.input_tokens * (layer + b * s.hidden_size) + prm_logits
    kv_per_token = s.num_layers * 2 * s.kv_dim * b
    prefill = n * inp.input_tokens * (kv_per_token + layer)
    decode = n * (inp.input_tokens + inp.new_tokens) * kv_per_token + n * s.vocab_size * 4 * 3
    return max(prefill, decode)


def scoring_bytes(inp: ScoringInputs, own_gpu: bool) -> Dict[str, int]:
    """Breakdown {weights, transient, overhead}; overhead = allocator slack, plus a CUDA
    context when the model has a GPU of its own."""
    weights, transient = scoring_weight_bytes(inp), scoring_transient_bytes(inp)
    overhead = int(FRAGMENTATION * (weights + transient)) + (CONTEXT_BYTES if own_gpu else 0)
    return {"weights": weights, "transient": transient, "overhead": overhead}
