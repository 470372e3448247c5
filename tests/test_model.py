"""Tiny model/tokenizer builder and the 4-bit LoRA policy on CPU."""
from __future__ import annotations

import pytest
import torch

from finellama_rl.compose import load_config
from finellama_rl.config import AttnImpl
from finellama_rl.job.model import (build_tiny_tokenizer, choose_attention, compute_dtype, ensure_tiny_model,
                                load_policy, load_tokenizer)


@pytest.fixture(scope="module")
def cfg():
    return load_config(["experiment=smoke"])


def test_tiny_tokenizer_round_trip(cfg):
    """FACTS: Qwen2Tokenizer rebuilds its pipeline on load; ids must survive save/load."""
    loaded = load_tokenizer(cfg.model)
    fresh = build_tiny_tokenizer(cfg.model.vocab_size)
    texts = ["Ava has 12 apples. #### 12", "3 * 7 = 21\n#### 21", "  spaces\tand\nnewlines ", "$1,234.50 costs 50%",
             "Ünïcödé – “quotes”", "<|im_start|>user\nhi<|im_end|>\n"]
    for text in texts:
        assert loaded(text)["input_ids"] == fresh(text)["input_ids"], text
        assert loaded.decode(loaded(text)["input_ids"]) == text
    assert len(loaded) <= cfg.model.vocab_size
    assert loaded.eos_token == "<|im_end|>" and loaded.padding_side == "left"


def test_tiny_model_is_cached_and_offline(cfg):
    a = ensure_tiny_model(cfg.model)
    assert (a / "config.json").exists() and (a / "tokenizer.json").exists()
    assert ensure_tiny_model(cfg.model) == a


def test_tiny_model_is_built_whole_by_a_rank_other_than_0(cfg, tmp_path, monkeypatch):
    """Under torchrun whichever rank takes the lock builds the cache; transformers' save_pretrained
    writes nothing on a rank > 0, which once left a folder with only a tokenizer."""
    import transformers.distributed.mixin as mixin

    from finellama_rl.job.model import build_tiny_model

    monkeypatch.setattr(mixin, "_is_torch_distributed_initialized", lambda: True)
    monkeypatch.setattr(mixin, "_get_torch_distributed_rank", lambda: 1)
    folder = build_tiny_model(cfg.model, tmp_path / "tiny")
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in folder.iterdir()}


def test_attention_and_dtype_choice(cfg):
    gpu = load_config(["hardware=a100_80"]).hardware
    assert choose_attention(AttnImpl.auto, cfg.hardware) == "sdpa"
    assert choose_attention(AttnImpl.flash_attention_2, cfg.hardware) == "sdpa"  # not importable on CPU
    assert choose_attention(AttnImpl.eager, gpu) == "eager"
    assert compute_dtype(cfg.hardware) == torch.float32 and compute_dtype(gpu) == torch.bfloat16


def test_4bit_lora_policy_trains_after_eval(cfg):
    """The bitsandbytes avx512-bf16 repack trap: eval under no_grad, then train."""
    import bitsandbytes as bnb

    tok = load_tokenizer(cfg.model)
    policy = load_policy(cfg.model, cfg.trainer, cfg.hardware)
    layers = [m for m in policy.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.support_avx512bf16_for_cpu is False for m in layers)
    assert layers[0].weight.quant_type == "nf4"
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    enc = tok(["Ava has 3 apples."], return_tensors="pt")
    policy.eval()
    with torch.no_grad():
        policy.generate(**enc, max_new_tokens=4, do_sample=False)
    policy.train()
    loss = policy(**enc, labels=enc["input_ids"]).loss
    loss.backward()
    grads = [p.grad for n, p in policy.named_parameters() if p.requires_grad and "lora_A" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_input_require_grads_only_with_activation_checkpointing(cfg):
    """enable_input_require_grads() (an embedding-output hook that makes backward compute
    gradients for the embeddings' output) only where checkpointing needs it, as plain TRL
    does; without checkpointing the LoRA gradients are identical with or without it."""
    from dataclasses import replace

    tok = load_tokenizer(cfg.model)
    enc = tok(["Ava has 3 apples. Ben has 4."], return_tensors="pt")

    def lora_grads(policy):
        policy.zero_grad(set_to_none=True)
        policy(**enc, labels=enc["input_ids"]).loss.backward()
        return {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}

    torch.manual_seed(0)
    policy = load_policy(cfg.model, cfg.trainer, cfg.hardware)
    base = policy.get_base_model()
    assert getattr(base, "_require_grads_hook", None) is None
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)  # non-zero B: lora_A gets gradients too
    plain = lora_grads(policy)
    base.enable_input_require_grads()
    hooked = lora_grads(policy)
    assert plain.keys() == hooked.keys() and all(torch.equal(plain[n], hooked[n]) for n in plain)
    assert all(g.abs().sum() > 0 for g in plain.values())

    ckpt = replace(cfg.trainer, activation_checkpointing=True)
    checkpointed = load_policy(cfg.model, ckpt, cfg.hardware)
    assert getattr(checkpointed.get_base_model(), "_require_grads_hook", None) is not None
