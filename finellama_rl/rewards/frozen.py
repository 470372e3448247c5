"""What the frozen scoring models (reward_model.py, judge.py) share: how they are loaded
(4-bit NF4, 8-bit LLM.int8, bf16 or fp32, on a named device), their memory figures, and
batching.

Why here: a reward model and a judge are loaded the same way and report the same per-step
figures (rewards/sources.py turns them into metrics); only what they compute differs.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

from finellama_rl.config import Device, HardwareConfig, ScoringPrecision


def load_kwargs(precision: ScoringPrecision, hardware: HardwareConfig, device: str) -> Dict[str, Any]:
    """from_pretrained keyword arguments for a frozen model at `precision` on `device`."""
    import torch
    from transformers import BitsAndBytesConfig

    precision = ScoringPrecision(precision)
    compute = torch.bfloat16 if hardware.bf16 and hardware.device == Device.cuda else torch.float32
    kwargs: Dict[str, Any] = {"device_map": {"": device}}
    if precision == ScoringPrecision.nf4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=compute)
        kwargs["dtype"] = compute
    elif precision == ScoringPrecision.int8:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["dtype"] = compute
    elif precision == ScoringPrecision.bf16:
        kwargs["dtype"] = torch.bfloat16
    elif precision == ScoringPrecision.fp32:
        kwargs["dtype"] = torch.float32
    else:
        raise ValueError(f"unknown precision {precision!r}: expected nf4|int8|bf16|fp32")
    return kwargs


def freeze(model) -> Any:
    """Eval mode, no parameter requires grad (the scorer never trains)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def weight_bytes(model) -> int:
    """Bytes of parameters and buffers as stored (4-bit weights count their packed bytes)."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def model_device(model):
    return next(model.parameters()).device


def batches(n: int, size: int) -> Iterator[Tuple[int, int]]:
    """(start, end) of consecutive batches of at most `size` items."""
    for start in range(0, n, max(1, size)):
        yield start, min(n, start + size)


class FrozenScorer:
    """Base of the scorers: device, description, memory figures and extra metrics."""

    description = "frozen scorer"

    def __init__(self, model, tokenizer, device: str):
        self.model, self.tokenizer, self.device = model, tokenizer, device

    def weight_bytes(self) -> int:
        return weight_bytes(self.model)

    def peak_memory_bytes(self) -> Optional[int]:
        """Peak allocated memory of the CUDA device the scorer runs on (None on CPU)."""
        import torch

        if not str(self.device).startswith("cuda") or not torch.cuda.is_available():
            return None
        return int(torch.cuda.max_memory_allocated(torch.device(self.device)))

    def drain_metrics(self) -> Dict[str, float]:
        return {}

    def score(self, questions: Sequence[str], completions: Sequence[str],
              references: Optional[Sequence[str]]) -> List[float]:
        raise NotImplementedError


def encode(tokenizer, texts: Sequence[str], max_tokens: int, device) -> Dict[str, Any]:
    """Left-padded batch; texts longer than max_tokens lose their beginning (the end holds
    the final answer, which is what is scored)."""
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_tokens,
                        add_special_tokens=False)
    finally:
        tokenizer.truncation_side = side
    return {k: v.to(device) for k, v in enc.items()}
