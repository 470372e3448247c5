"""GRPO end to end on CPU: a 4-bit LoRA run writes what it should and a crashed run
resumes where it stopped (that GRPO learns: tests/test_learning.py)."""
from __future__ import annotations

import json

import pytest

from finellama_rl.checkpoint import list_checkpoints
from finellama_rl.fileio import read_jsonl
from finellama_rl.trainers.run import run_training
from finellama_rl.errors import EXIT_CRASH_TEST

SMALL = ["experiment=smoke", "eval.num_examples=4", "eval.max_new_tokens=8", "trainer.max_completion_tokens=8"]
CKPT_FILES = {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt",
              "rng_state.pth", "trainer_state.json", "finellama_state.json"}


def test_grpo_two_steps_4bit_lora_writes_outputs(make_config, tmp_path):
    cfg = make_config(*SMALL, "trainer.max_steps=2", "trainer.save_every=1", "trainer.keep_last=1")
    assert cfg.trainer.quantization.enabled and cfg.trainer.lora.enabled
    assert run_training(cfg) == 0
    run = tmp_path / "run"
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    assert steps == [1, 2]
    record = read_jsonl(run / "metrics.jsonl")[-1]
    for key in ("train/reward_mean", "train/reward_std", "train/loss", "train/learning_rate", "perf/sec_per_step", "perf/tokens_per_sec"):
        assert key in record, key
    ckpts = list_checkpoints(run / "checkpoints")
    assert [c.name for c in ckpts] == ["step_000002"]  # keep_last=1 pruned step 1
    assert CKPT_FILES <= {p.name for p in ckpts[0].iterdir()}
    assert json.loads((ckpts[0] / "finellama_state.json").read_text())["data_position"] == 2 * cfg.trainer.prompts_per_step
    assert not (run / "checkpoints" / ".staging").exists() or not any((run / "checkpoints" / ".staging").iterdir())
    ev = json.loads((run / "eval_results.json").read_text())
    assert ev["schema_version"] == 2 and ev["step"] == 2 and ev["trainer"] == "grpo" and ev["total"] == 4
    assert set(ev["accuracy"]) == {"math_verify", "strict", "lenient", "lm_eval_strict", "lm_eval_flexible"}
    assert ev["primary"] == "math_verify" and len(ev["records"]) == 4  # eval.protocol=qwen_boxed (the default)
    assert ev["baseline"]["total"] == 4 and "records" not in ev["baseline"]
    assert ev["protocol"]["decoding"]["decoding"] == "greedy" and ev["protocol"]["shots"] == 0
    stats = json.loads((run / "training_stats.json").read_text())
    assert [s["step"] for s in stats["steps"]] == [1, 2] and stats["summary"]["last_step"] == 2
    assert "trainer:\n  algo: grpo" in (run / "config.yaml").read_text()


def test_crashed_run_resumes_from_latest_checkpoint(make_config, tmp_path):
    args = [*SMALL, "trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_last=2"]
    assert run_training(make_config(*args, "debug.crash_after_step=4")) == EXIT_CRASH_TEST
    run = tmp_path / "run"
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step_000002", "step_000004"]
    first = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    assert first == [1, 2, 3, 4]
    assert not (run / "eval_results.json").exists()

    assert run_training(make_config(*args)) == 0
    steps = [r["step"] for r in read_jsonl(run / "metrics.jsonl")]
    assert steps[len(first):] == [5, 6], "the second attempt must train only steps 5 and 6"
    assert [c.name for c in list_checkpoints(run / "checkpoints")] == ["step_000004", "step_000006"]
    state = json.loads((run / "checkpoints" / "step_000006" / "trainer_state.json").read_text())
    assert state["global_step"] == 6
    assert json.loads((run / "eval_results.json").read_text())["step"] == 6


def test_completed_run_is_not_retrained(make_config, tmp_path, capsys):
    cfg = make_config(*SMALL, "trainer.max_steps=1", "trainer.save_every=1", "eval.before_training=false")
    assert run_training(cfg) == 0
    n = len(read_jsonl(tmp_path / "run" / "metrics.jsonl"))
    attempts = (tmp_path / "run" / "attempts.jsonl").read_bytes()
    assert run_training(cfg) == 0
    assert "already finished at step 1/1" in capsys.readouterr().out
    assert len(read_jsonl(tmp_path / "run" / "metrics.jsonl")) == n
    assert (tmp_path / "run" / "attempts.jsonl").read_bytes() == attempts  # no attempt added


# ------------------------------------------------------- fp32 adapters, decoding


def _grpo_ctx(make_config, *extra):
    from _trainctx import alternating_reward, build_ctx

    cfg = make_config("experiment=smoke", "eval.protocol=finellama", "trainer.max_completion_tokens=8",
                      "trainer.prompts_per_step=2", "trainer.num_generations=4", "trainer.micro_batch=4",
                      "trainer.max_steps=1", "trainer.save_every=100", *extra)
    return cfg, build_ctx(cfg, reward_funcs=[alternating_reward])


def _dtypes(tensors):
    return {str(t.dtype) for t in tensors}


def test_grpo_trainable_weights_and_optimizer_state_are_fp32_on_a_4bit_base(make_config):
    import bitsandbytes as bnb
    import torch

    from finellama_rl.trainers import grpo

    cfg, ctx = _grpo_ctx(make_config)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in ctx.policy.modules())  # a 4-bit base
    trainer, _ = grpo.build_trainer(ctx)
    assert trainer.cast_back_to_fp32 > 0, "TRL 1.16 casts trainable weights of a 4-bit model to bf16"
    trainable = [p for p in trainer.model.parameters() if p.requires_grad]
    assert trainable and _dtypes(trainable) == {"torch.float32"}
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    assert trainer.state.global_step == 1
    assert _dtypes(p for p in trainer.model.parameters() if p.requires_grad) == {"torch.float32"}
    state = [v for s in trainer.optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.numel() > 1]
    assert state and _dtypes(state) == {"torch.float32"}  # exp_avg / exp_avg_sq
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters() if p.requires_grad)


def test_grpo_sampling_ignores_the_models_generation_config(make_config):
    """A checkpoint's generation_config (Qwen2.5 ships repetition_penalty 1.05, top_k 20,
    top_p 0.8, temperature 0.7) must not change what GRPO samples."""
    from transformers import GenerationConfig

    from finellama_rl.trainers import grpo
    from finellama_rl.trainers.decoding import own_generation_config

    cfg, ctx = _grpo_ctx(make_config)
    lm = ctx.policy.get_base_model()
    lm.generation_config = GenerationConfig(repetition_penalty=1.05, top_k=20, top_p=0.8, temperature=0.7,
                                            min_p=0.1, no_repeat_ngram_size=3, do_sample=True)
    trainer, _ = grpo.build_trainer(ctx)
    with own_generation_config(trainer.model):
        effective, _ = lm._prepare_generation_config(trainer.generation_config)
    assert lm.generation_config.repetition_penalty == 1.05  # restored afterwards
    assert (effective.temperature, effective.top_p, effective.top_k, effective.repetition_penalty) == (1.0, 1.0, 0, 1.0)
    assert effective.min_p is None and effective.no_repeat_ngram_size == 0
    leaked, _ = lm._prepare_generation_config(trainer.generation_config)  # without the guard: TRL alone
    assert leaked.min_p == 0.1  # what the guard keeps out (TRL leaves min_p unset: None)


@pytest.mark.slow
def test_a_run_stopped_after_its_last_step_resumes_into_the_final_evaluation_only(make_config, tmp_path, monkeypatch):
    """Stopped (a signal, a crash) right after the last step's checkpoint, before the final
    evaluation: the resumed run trains no step (the HF Trainer checks max_steps only after
    a step, so it trained step 3 of 2) and evaluates the checkpoint's weights."""
    import torch
    from safetensors.torch import load_file

    from finellama_rl.trainers import run as run_module

    args = [*SMALL, "trainer.max_steps=2", "trainer.save_every=2", "eval.before_training=false", "trainer.rewards=[digits]",
            "trainer.learning_rate=3e-3"]
    assert run_training(make_config(*args, "debug.crash_after_step=2")) == EXIT_CRASH_TEST
    seen = {}
    original = run_module.finish

    def spy(cfg, paths, policy, outcome, *rest):
        seen.update(step=outcome.final_step, weights={n: p.detach().clone() for n, p in policy.named_parameters()
                                                       if "lora_" in n})
        return original(cfg, paths, policy, outcome, *rest)

    monkeypatch.setattr(run_module, "finish", spy)
    assert run_training(make_config(*args)) == 0
    run = tmp_path / "run"
    assert [r["step"] for r in read_jsonl(run / "metrics.jsonl")] == [1, 2]
    assert json.loads((run / "eval_results.json").read_text())["step"] == 2 and seen["step"] == 2
    saved = load_file(str(run / "checkpoints" / "step_000002" / "adapter_model.safetensors"))
    assert any(t.abs().max() > 0 for n, t in saved.items() if "lora_B" in n), "training moved the adapter"
    for name, tensor in saved.items():  # the evaluated weights are the checkpoint's, not a fresh adapter
        match = [w for n, w in seen["weights"].items() if n.replace(".default", "").endswith(name.split("base_model.model.")[-1])]
        assert match and torch.equal(match[0].float(), tensor.float()), name
