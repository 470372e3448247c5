"""finellama_rl.eval.generation on the tiny model: the model's generation_config never
changes an evaluation (Qwen2.5-Instruct ships repetition_penalty 1.05, and transformers
5.x fills unset generate() settings from it), results do not depend on the batch size
or on the length sorting, an out-of-memory steps the batch down without changing
results, and completions are cut at eos and at stop strings."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from finellama_rl.compose import load_config
from finellama_rl.task.data import load_problems
from finellama_rl.eval.core import evaluate_model, prepare_eval
from finellama_rl.eval.generation import Decoding, finish_text, generate_completions, model_generation_overrides

QWEN_INSTRUCT_GENERATION_CONFIG = {"repetition_penalty": 1.05, "do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random Qwen2 model over the tiny tokenizer with UNTIED embeddings (init std 0.1), and a 12-problem
    greedy evaluation setup. (The smoke model ties its embeddings, so at random init it
    repeats its last token whatever the penalty: too insensitive to show the trap.)"""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from finellama_rl.job.model import load_tokenizer

    root = tmp_path_factory.mktemp("results")
    cfg = load_config(["experiment=smoke", "eval.protocol=finellama", f"run.results_dir={root}", "eval.num_examples=12",
                       "eval.max_new_tokens=12"])
    tok = load_tokenizer(cfg.model)
    setup = prepare_eval(cfg, tok, load_problems(cfg.data, "test"), load_problems(cfg.data, "train"))
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=128, tie_word_embeddings=False, initializer_range=0.1,
                                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    return cfg, tok, setup, model


def completions(model, tok, setup, batch_size=64):
    return [r["completion"] for r in evaluate_model(model, tok, replace(setup, batch_size=batch_size), "t")["records"]]


def test_model_generation_config_never_changes_the_evaluation(tiny):
    cfg, tok, setup, model = tiny
    before = evaluate_model(model, tok, setup, "t")
    enc = tok.pad({"input_ids": tok(setup.prompts, add_special_tokens=False)["input_ids"]}, return_tensors="pt")
    with torch.no_grad():
        plain = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    saved = model.generation_config.to_dict()
    try:
        model.generation_config.repetition_penalty = 1.05
        with torch.no_grad():  # the trap is real: a greedy generate() with only do_sample set picks up the 1.05
            leaked = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
        assert (plain != leaked).any(dim=1).sum() >= 4  # 8 of 12 completions change
        after = evaluate_model(model, tok, setup, "t")
        for key, value in QWEN_INSTRUCT_GENERATION_CONFIG.items():  # everything Qwen2.5-Instruct ships
            setattr(model.generation_config, key, value)
        after_all = evaluate_model(model, tok, setup, "t")
        assert model_generation_overrides(model) == QWEN_INSTRUCT_GENERATION_CONFIG
    finally:
        for key in QWEN_INSTRUCT_GENERATION_CONFIG:
            setattr(model.generation_config, key, saved.get(key))
    for other in (after, after_all):
        assert [r["completion"] for r in other["records"]] == [r["completion"] for r in before["records"]]
        assert other["accuracy"] == before["accuracy"]
    assert after_all["protocol"]["model_generation_config_ignored"] == QWEN_INSTRUCT_GENERATION_CONFIG
    assert model.generation_config.repetition_penalty in (None, 1.0)  # restored after every call
    decoding = before["protocol"]["decoding"]
    assert decoding["repetition_penalty"] == 1.0 and decoding["do_sample"] is False and decoding["max_new_tokens"] == 12
    assert decoding["num_beams"] == 1 and decoding["no_repeat_ngram_size"] == 0 and decoding["temperature"] is None


def test_results_do_not_depend_on_batch_size_or_sorting(tiny):
    cfg, tok, setup, model = tiny
    lengths = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in setup.prompts]
    assert len(set(lengths)) > 3  # uneven prompts: sorting and left padding are exercised
    reference = completions(model, tok, setup, batch_size=1)
    assert completions(model, tok, setup, batch_size=5) == reference
    assert completions(model, tok, setup, batch_size=64) == reference
    assert len(set(reference)) > 1


def test_out_of_memory_halves_the_batch_and_keeps_results(tiny, monkeypatch):
    cfg, tok, setup, model = tiny
    reference = completions(model, tok, setup)
    real = type(model).generate
    calls = []

    def generate(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        if kwargs["input_ids"].shape[0] > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fault injected)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", generate)
    gen = generate_completions(model, tok, setup.prompts, setup.decoding, setup.stops, batch_size=16)
    assert [c.text for c in gen.completions] == reference
    assert gen.oom_steps == [16, 8, 4] and gen.batch_size == 2 and calls[:4] == [12, 8, 4, 2]
    assert all(n <= 3 for n in calls[3:]) and gen.calls == 6


def test_out_of_memory_at_batch_one_is_raised(tiny, monkeypatch):
    cfg, tok, setup, model = tiny

    def generate(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (fault injected)")

    monkeypatch.setattr(type(model), "generate", generate)
    with pytest.raises(torch.OutOfMemoryError):
        generate_completions(model, tok, setup.prompts[:2], setup.decoding, setup.stops, batch_size=2)


def test_sampling_returns_n_adjacent_samples_per_prompt_deterministically(tiny):
    cfg, tok, setup, model = tiny
    decoding = Decoding(max_new_tokens=6, do_sample=True, temperature=1.0, num_return_sequences=3, seed=5)
    a = generate_completions(model, tok, setup.prompts[:4], decoding, setup.stops, batch_size=6)
    b = generate_completions(model, tok, setup.prompts[:4], decoding, setup.stops, batch_size=6)
    assert len(a.completions) == 12 and [c.text for c in a.completions] == [c.text for c in b.completions]
    assert a.calls == 2  # 2 prompts x 3 samples per call
    assert decoding.record()["top_k"] is None and decoding.record()["temperature"] == 1.0
    assert decoding.record()["sampler"] == "keyed-gumbel-v1" and "sampler" not in setup.decoding.record()
    other = generate_completions(model, tok, setup.prompts[:4], replace(decoding, seed=6), setup.stops, batch_size=6)
    assert [c.text for c in other.completions] != [c.text for c in a.completions]  # the seed keys the draws


def test_pass_at_k_samples_do_not_depend_on_the_eval_batch_or_an_oom(tiny, monkeypatch):
    """12 problems x 4 samples at T 0.7: eval batch 1 (one prompt's 4 samples per call), 16,
    and 16 with an out-of-memory from 8 sequences up (halved to 4) sample the same texts."""
    cfg, tok, setup, model = tiny
    decoding = Decoding(max_new_tokens=8, do_sample=True, temperature=0.7, num_return_sequences=4, seed=3)

    def texts(batch_size):
        return [c.text for c in generate_completions(model, tok, setup.prompts, decoding, setup.stops, batch_size).completions]

    reference = texts(1)
    assert len(reference) == 48 and len(set(reference)) > 24, "the test needs varied samples"
    assert texts(16) == reference
    real = type(model).generate

    def generate(self, *args, **kwargs):
        if kwargs["input_ids"].shape[0] > 7:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fault injected)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "generate", generate)
    gen = generate_completions(model, tok, setup.prompts, decoding, setup.stops, batch_size=16)
    assert gen.oom_steps == [16, 8] and [c.text for c in gen.completions] == reference


def test_finish_text_cuts_at_eos_then_at_stop_strings(tiny):
    cfg, tok, setup, model = tiny
    eos = tok.eos_token_id
    ids = tok("#### 70\n\nQuestion: what?", add_special_tokens=False)["input_ids"]
    stops = ["</s>", "<|im_end|>", "<|endoftext|>", "\nQuestion:"]
    c = finish_text(tok, ids + [eos] + ids, [eos], stops, max_new_tokens=100)
    assert (c.text, c.finish) == ("#### 70\n", "stop:\nQuestion:")
    plain = tok("#### 70", add_special_tokens=False)["input_ids"]
    assert finish_text(tok, plain + [eos, eos], [eos], stops, 100).finish == "eos"
    assert finish_text(tok, plain, [eos], stops, max_new_tokens=len(plain)).finish == "length"
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    c = finish_text(tok, plain + [im_start] + plain, [eos], ["</s>"], 100)  # stray special tokens are dropped
    assert c.text == "#### 70#### 70"


def test_a_peft_wrapped_model_is_protected_and_left_as_it_was(tiny):
    """PeftModel.generate copies its (forwarded) generation_config onto the HF model: the swap must
    cover that path, and afterwards the wrapper must still forward to the model's own config."""
    from peft import LoraConfig, get_peft_model

    cfg, tok, setup, model = tiny
    before = completions(model, tok, setup)
    peft = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM"))  # B = 0: same outputs
    inner = peft.get_base_model()
    try:
        inner.generation_config.repetition_penalty = 1.05
        assert completions(peft, tok, setup) == before
        assert "generation_config" not in vars(peft) and peft.generation_config is inner.generation_config
        assert inner.generation_config.repetition_penalty == 1.05  # restored, not replaced
    finally:
        inner.generation_config.repetition_penalty = None
        peft.unload()
