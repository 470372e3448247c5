"""Tests for finellama_rl.login.memory: peak derivation, monotonicity, Qwen2.5 sanity
cases with real numbers, and rung planning on 40 GB vs 80 GB cards."""
from __future__ import annotations

import dataclasses
import random

import pytest

from finellama_rl.ladder.rungs import Setting, build_ladder
from finellama_rl.login.memory import (
    GIB, LORA_TARGETS, QWEN2_5_SHAPES, MemoryInputs, estimate_memory, format_estimate, plan_rung,
)
from finellama_rl.login.memory import (  # internals: shape cross-check, per-layer formula
    _backbone_activation_bytes, _embedding_params, _layer_bytes_per_token, _linear_params,
)

SIZES = ["0.5B", "1.5B", "3B", "7B", "14B"]
GB40, GB80 = 40 * GIB, 80 * GIB


def _inputs(setting: Setting, size: str = "3B", algo: str = "ppo", **kw) -> MemoryInputs:
    base = dict(shape=QWEN2_5_SHAPES[size], algo=algo, setting=setting, lora_r=16,
                lora_target_modules=LORA_TARGETS, quantized=True, compute_bytes=2, beta=0.05)
    base.update(kw)
    return MemoryInputs(**base)


def _peak(setting: Setting, **kw) -> int:
    return estimate_memory(_inputs(setting, **kw)).peak_bytes


def _s(micro=4, accum=1, g=1, prompt=256, completion=256, ckpt=False) -> Setting:
    return Setting(micro, accum, g, prompt, completion, ckpt)


def test_peak_is_sum_of_peak_components_random():
    rng = random.Random(7)
    for _ in range(200):
        algo = rng.choice(["ppo", "grpo"])
        g = 1 if algo == "ppo" else rng.choice([2, 4, 8, 16])
        micro = rng.randint(1, 32)
        setting = Setting(micro, g, g, rng.randint(32, 1024), rng.randint(32, 2048), rng.random() < 0.5)
        inp = _inputs(setting, rng.choice(SIZES), algo, lora_r=rng.choice([4, 8, 16, 64]),
                      quantized=rng.random() < 0.8, beta=rng.choice([0.0, 0.04]),
                      generation_batch=rng.choice([None, micro * g, 256]))
        est = estimate_memory(inp)
        assert est.peak_bytes == sum(est.components[k] for k in est.peak_components)
        assert all(v >= 0 for v in est.components.values())
        # The other phase's transient is reported but excluded, and is not larger.
        summed = {"training": ("activations", "logits"), "generation": ("kv_cache",)}
        other = "generation" if est.phase == "training" else "training"
        assert not set(summed[other]) & set(est.peak_components)
        assert sum(est.components[k] for k in summed[other]) <= sum(est.components[k] for k in summed[est.phase])


def test_generation_phase_can_set_the_peak():
    # TRL-style: the whole effective batch (x group size) is decoded at once, long completions.
    setting = Setting(1, 64, 16, 256, 2048, True)
    est = estimate_memory(_inputs(setting, "7B", "grpo", generation_batch=64))
    assert est.phase == "generation" and "kv_cache" in est.peak_components
    assert est.components["kv_cache"] > est.components["activations"] + est.components["logits"]


def test_monotonic_in_micro_batch_and_completion_length():
    peaks = [_peak(_s(micro=m)) for m in (1, 2, 4, 8, 16, 32)]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
    peaks = [_peak(_s(completion=c)) for c in (64, 128, 256, 512, 1024)]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)


def test_monotonic_in_model_size_and_lora_r():
    for setting in (_s(), _s(micro=16, ckpt=True), _s(micro=1, completion=64)):
        peaks = [_peak(setting, size=size) for size in SIZES]
        assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks), peaks
    peaks = [_peak(_s(), lora_r=r) for r in (4, 8, 16, 32, 64, 128)]
    assert peaks == sorted(peaks) and len(set(peaks)) == len(peaks)
    acts = [estimate_memory(_inputs(_s(), lora_r=r)).components["activations"] for r in (8, 64)]
    assert acts[0] < acts[1]  # LoRA A outputs are saved per token


def test_activation_checkpointing_lowers_activations():
    for size in SIZES:
        off = estimate_memory(_inputs(_s(micro=8), size))
        on = estimate_memory(_inputs(_s(micro=8, ckpt=True), size))
        assert on.components["activations"] < 0.35 * off.components["activations"]
        assert on.peak_bytes < off.peak_bytes


def test_lora_dropout_costs_activation_memory():
    with_dropout = estimate_memory(_inputs(_s(), lora_dropout=0.05)).components["activations"]
    without = estimate_memory(_inputs(_s(), lora_dropout=0.0)).components["activations"]
    assert with_dropout > without


def test_ppo_at_least_grpo_but_below_1_5x():
    for size in SIZES:
        for micro, ckpt in ((1, False), (4, False), (8, True)):
            ppo = _peak(Setting(micro, 4, 1, 256, 256, ckpt), size=size, algo="ppo")
            grpo = _peak(Setting(micro, 4, 4, 256, 256, ckpt), size=size, algo="grpo")
            assert grpo < ppo < 1.5 * grpo, (size, micro, ckpt)
    ppo = estimate_memory(_inputs(Setting(4, 4, 1, 256, 256, False), algo="ppo")).components
    grpo = estimate_memory(_inputs(Setting(4, 4, 4, 256, 256, False), algo="grpo")).components
    assert ppo["activations"] > grpo["activations"]  # value head input per token
    assert ppo["value_head"] > 0 == grpo["value_head"]


def test_value_adapter_costs_more_than_shared_head():
    shared = estimate_memory(_inputs(_s(), value_head="shared"))
    adapter = estimate_memory(_inputs(_s(), value_head="adapter"))
    assert adapter.components["value_head"] > 100 * shared.components["value_head"]
    assert adapter.peak_bytes > shared.peak_bytes


def test_completion_logits_only_shrinks_logits():
    full = estimate_memory(_inputs(_s(prompt=256, completion=256))).components["logits"]
    sliced = estimate_memory(_inputs(_s(prompt=256, completion=256), completion_logits_only=True)).components["logits"]
    assert sliced * 2 == full
    # 3B, micro 4, 512 positions, vocab 151936, bf16 + 2 x fp32 = 10 bytes per logit.
    assert full == 4 * 512 * 151936 * 10


def test_beta_stores_reference_logprobs():
    with_ref = estimate_memory(_inputs(_s(g=4), algo="grpo", beta=0.04)).components["rollout_buffers"]
    without = estimate_memory(_inputs(_s(g=4), algo="grpo", beta=0.0)).components["rollout_buffers"]
    assert with_ref > without


def test_shape_parameter_counts_match_published_sizes():
    # Decoder linears + embeddings must account for ~all parameters (norms/biases are tiny).
    for size in SIZES:
        shape = QWEN2_5_SHAPES[size]
        counted = _linear_params(shape) + _embedding_params(shape)
        assert 0.97 * shape.params <= counted <= 1.01 * shape.params, (size, counted)


def test_3b_weights_are_about_2gb():
    c = estimate_memory(_inputs(_s())).components
    weights = c["weights_4bit"] + c["embeddings_and_head"]
    assert 1.8e9 <= weights <= 2.4e9, weights
    full = estimate_memory(_inputs(_s(), quantized=False)).components["weights_4bit"]
    assert full > 3 * c["weights_4bit"]
    single = estimate_memory(_inputs(_s(), double_quant=False)).components["weights_4bit"]
    assert single > c["weights_4bit"]


def test_3b_ppo_sanity_cases():
    too_big = estimate_memory(_inputs(_s(micro=64, prompt=256, completion=256)))
    assert too_big.peak_bytes > GB40
    fits = estimate_memory(_inputs(_s(micro=4, prompt=128, completion=256)))
    assert fits.peak_bytes <= 0.9 * GB80
    assert 8 * GIB < fits.peak_bytes < 40 * GIB  # plausible, not trivially small
    overhead = fits.components["cuda_context_and_overhead"]
    assert 0.5 * GIB < overhead < 0.25 * fits.peak_bytes


def _3b_ladder():
    return build_ladder(Setting(64, 1, 1, 256, 256, False), min_completion_tokens=64, min_prompt_tokens=128)


def test_plan_rung_picks_smaller_rung_on_40gb_than_80gb():
    ladder = _3b_ladder()
    make = lambda s: _inputs(s)  # noqa: E731
    i40, e40 = plan_rung(ladder, make, GB40)
    i80, e80 = plan_rung(ladder, make, GB80)
    assert i80 < i40
    assert ladder[i40].setting.micro_batch < ladder[i80].setting.micro_batch
    assert e40.peak_bytes <= 0.9 * GB40 and e80.peak_bytes <= 0.9 * GB80
    for i, gpu in ((i40, GB40), (i80, GB80)):  # first fitting rung: the one before does not fit
        assert i > 0 and _peak(ladder[i - 1].setting) > 0.9 * gpu
    assert not ladder[i40].changes_experiment and not ladder[i80].changes_experiment


def test_plan_rung_returns_last_rung_when_nothing_fits():
    ladder = _3b_ladder()
    index, est = plan_rung(ladder, lambda s: _inputs(s, "14B"), 2 * GIB)
    assert index == len(ladder) - 1
    assert est.peak_bytes == _peak(ladder[-1].setting, size="14B")
    with pytest.raises(ValueError):
        plan_rung([], lambda s: _inputs(s), GB80)
    with pytest.raises(ValueError):
        plan_rung(ladder, lambda s: _inputs(s), GB80, margin=1.0)


@pytest.mark.parametrize("change", [
    dict(algo="dpo"), dict(lora_r=0), dict(lora_target_modules=("qkv",)), dict(compute_bytes=3),
    dict(lora_target_modules=("q_proj", "q_proj")), dict(lora_target_modules=()),
    dict(value_head="separate"), dict(generation_batch=0),
])
def test_invalid_inputs_raise(change):
    with pytest.raises(ValueError):
        dataclasses.replace(_inputs(_s()), **change)


def test_ppo_requires_single_generation():
    with pytest.raises(ValueError):
        _inputs(_s(g=4), algo="ppo")


def test_format_estimate_lists_components_in_gib():
    est = estimate_memory(_inputs(_s()))
    text = format_estimate(est)
    for name in est.components:
        assert name in text
    assert f"{est.peak_bytes / GIB:.3f}" in text and "peak (training)" in text


def test_layer_bytes_hand_checked_3b():
    # h=2048, kv=256, I=11008, r=16, bf16, all 7 targets.
    # norms 2*4*2048=16384; attention 2*(2*2048+2*256)=9216; MLP 3*2*11008=66048;
    # LoRA A outputs 7*2*16=224; shared inputs (h + h + h + I)*2 = 34304.
    base = dict(lora_dropout=0.0)
    assert _layer_bytes_per_token(_inputs(_s(), **base)) == 16384 + 9216 + 66048 + 224 + 34304
    # dropout: a private copy + 1-byte mask per target: (6*2048 + 11008) * 3 = 69888.
    assert _layer_bytes_per_token(_inputs(_s(), lora_dropout=0.05)) == 16384 + 9216 + 66048 + 224 + 69888
    # no autocast, fp32 adapters: fp32 copy per target (23296*4) and fp32 A outputs (7*4*16).
    assert _layer_bytes_per_token(_inputs(_s(), autocast=False, **base)) == 16384 + 9216 + 66048 + 448 + 93184
    # checkpointing: 36 layer inputs (2*2048) + one recomputed layer, + final norm fp32 input.
    inp = _inputs(_s(micro=2, prompt=64, completion=64, ckpt=True), **base)
    assert _backbone_activation_bytes(inp) == 2 * 128 * (36 * 4096 + 126176 + 4 * 2048)


def _measured_saved_bytes(layers: int, adapter_fp32: bool, tokens: tuple) -> int:
    """Bytes of distinct non-parameter storages autograd saves in a Qwen2 + PEFT forward."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(hidden_size=256, intermediate_size=1376, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=500,
                                   tie_word_embeddings=True, attn_implementation="sdpa")
    model = transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.requires_grad_(False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules=list(LORA_TARGETS)))
    for p in model.parameters():
        if p.requires_grad:  # fp32 adapters without autocast -> PEFT casts inputs to fp32
            p.data = p.data.to(torch.float32 if adapter_fp32 else torch.bfloat16)
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=torch.randint(0, 500, tokens), use_cache=False)
    return sum(saved.values())


@pytest.mark.slow  # builds real (tiny) transformers models on CPU: ~10 s with imports
@pytest.mark.parametrize("adapter_fp32", [False, True])
def test_layer_formula_matches_autograd_saved_tensors(adapter_fp32):
    """Real check on CPU: per-layer saved bytes (3 layers minus 1, per token) vs the formula.
    bf16 adapters without autocast behave like autocast (no input casts)."""
    tokens = (2, 64)
    per_layer = (_measured_saved_bytes(3, adapter_fp32, tokens)
                 - _measured_saved_bytes(1, adapter_fp32, tokens)) / 2 / (tokens[0] * tokens[1])
    shape = dataclasses.replace(QWEN2_5_SHAPES["0.5B"], hidden_size=256, num_layers=3, num_attention_heads=4,
                                num_kv_heads=2, intermediate_size=1376, vocab_size=500)
    predicted = _layer_bytes_per_token(_inputs(_s(), algo="grpo", shape=shape, lora_dropout=0.0,
                                               autocast=not adapter_fp32))
    assert 0.98 * per_layer <= predicted <= 1.06 * per_layer, (predicted, per_layer)


def test_grpo_fused_logprobs_replace_full_vocab_logits():
    """TRL 1.16 GRPO: one tile + completion hidden states, not micro x seq x vocab logits."""
    from finellama_rl.login.memory import FUSED_TILE_TOKENS, FUSED_TILE_VOCAB

    s = Setting(128, 1, 8, 256, 256, False)
    full = estimate_memory(_inputs(s, "0.5B", "grpo")).components["logits"]
    fused = estimate_memory(_inputs(s, "0.5B", "grpo", fused_logprobs=True)).components["logits"]
    assert full == 128 * 512 * 151936 * 10  # 92.7 GiB: what the planner counted before
    n = 128 * 256  # completion positions only
    assert fused == FUSED_TILE_TOKENS * FUSED_TILE_VOCAB * 2 + n * 896 * 6 + n * 24
    assert 0.41 * GIB < fused < 0.42 * GIB
    small = estimate_memory(_inputs(Setting(1, 1, 8, 16, 16, False), "0.5B", "grpo", fused_logprobs=True))
    assert small.components["logits"] == 16 * 32768 * 2 + 16 * 896 * 6 + 16 * 24  # the tile shrinks with the tokens


@pytest.mark.slow  # builds a tiny model and imports TRL: a few seconds
def test_trl_grpo_fused_lm_head_keeps_no_vocab_sized_tensor():
    """The planner's GRPO assumption, checked on the installed TRL: GRPOTrainer asks for
    fused_lm_head=True, the tile constants match, and the fused head saves nothing of size
    tokens x vocab for backward where the plain head + log_softmax does."""
    import inspect

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from trl.kernels import chunked_logprob
    from trl.trainer import grpo_trainer
    from trl.trainer import utils as trl_utils

    from finellama_rl.login.memory import FUSED_TILE_TOKENS, FUSED_TILE_VOCAB

    assert (chunked_logprob.TOKEN_CHUNK_SIZE, trl_utils._CHUNKED_LOGPROB_CHUNK_SIZE) == (FUSED_TILE_TOKENS, FUSED_TILE_VOCAB)
    assert "fused_lm_head=True" in inspect.getsource(grpo_trainer.GRPOTrainer._get_per_token_logps_and_entropies)
    tokens = (2, 64)

    def saved_bytes(vocab: int, fused: bool) -> int:
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                       num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=True)
        model = transformers.Qwen2ForCausalLM(cfg)
        ids = torch.randint(0, vocab, tokens)
        params, saved = {p.untyped_storage().data_ptr() for p in model.parameters()}, {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in params:
                saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            if fused:
                trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy"))
                model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs.sum()
            else:
                torch.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), -1)
        return sum(saved.values())

    grown = tokens[0] * tokens[1] * (16384 - 2048) * 4  # one more fp32 (tokens, vocab) tensor
    plain = saved_bytes(16384, False) - saved_bytes(2048, False)
    fused = saved_bytes(16384, True) - saved_bytes(2048, True)
    assert plain >= grown and abs(fused) < grown / 100, (plain, fused, grown)
