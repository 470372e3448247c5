"""Explicit decoding for training-time sampling (PPO rollouts, GRPO generation).

transformers 5 fills every generate() setting left unset (None) from the model's
generation_config, and Qwen2.5-Instruct ships one with repetition_penalty 1.05, top_k
20, top_p 0.8 and temperature 0.7. A sampler whose settings come from the checkpoint
silently changes the experiment, and for PPO also makes the old log-probs (computed
from logits / temperature) describe a different distribution than the one sampled.
So sampling passes every setting itself (`sampling_kwargs`) and runs with the model's
generation_config swapped for a blank one (`own_generation_config`), so nothing
unset can leak in either.
"""
from __future__ import annotations

import contextlib
from typing import Any, Dict, Iterator

from finellama_rl.config import TrainerConfig


def sampling_kwargs(t: TrainerConfig, tokenizer) -> Dict[str, Any]:
    """Plain temperature sampling from the policy itself (top_p: GRPO only; PPO requires 1)."""
    return dict(do_sample=True, temperature=t.temperature, top_p=t.top_p, top_k=0, typical_p=1.0,
                epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0,
                num_beams=1, max_new_tokens=t.max_completion_tokens, min_new_tokens=0,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, use_cache=True)


def _causal_lm(model):
    while hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return getattr(model, "module", model)  # DDP


@contextlib.contextmanager
def own_generation_config(model) -> Iterator[None]:
    """generate() sees a blank generation_config: only what the caller passes counts."""
    from transformers import GenerationConfig

    lm = _causal_lm(model)
    saved = getattr(lm, "generation_config", None)
    lm.generation_config = GenerationConfig()
    try:
        yield
    finally:
        lm.generation_config = saved
