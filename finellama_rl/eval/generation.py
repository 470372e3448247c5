"""Batched generation for evaluation and pass@k sampling: prompts in, completion
texts out, in eval mode under no_grad, with a progress bar.

    from finellama_rl.eval.generation import generate
    completions = generate(model, tokenizer, prompts, max_new_tokens=256, batch_size=32)
"""
from __future__ import annotations

import sys
from typing import List, Sequence


def generate_batched(model, tokenizer, prompts: Sequence[str], batch_size: int, desc: str, **generate_kwargs) -> List[str]:
    """Completions for `prompts`, `batch_size` prompts per `generate` call, in eval
    mode under no_grad, with a progress bar. With num_return_sequences=n the n
    completions of a prompt are adjacent in the result."""
    import torch
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    out: List[str] = []
    try:
        with torch.no_grad():
            for i in tqdm(range(0, len(prompts), batch_size), desc=desc, file=sys.stderr, mininterval=5, leave=False):
                batch = list(prompts[i : i + batch_size])
                enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
                ids = model.generate(**enc, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                                     **generate_kwargs)  # (B * num_return_sequences, prompt + new)
                out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return out


def generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int, desc: str = "eval") -> List[str]:
    """Greedy completions for `prompts`, `batch_size` at a time, with a progress bar."""
    return generate_batched(model, tokenizer, prompts, batch_size, desc, max_new_tokens=max_new_tokens,
                            do_sample=False, temperature=None, top_p=None, top_k=None)
