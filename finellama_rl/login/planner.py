"""The planner's decisions on the login node: the memory inputs of a run's config at a
rung (the trainers as the memory models in login/memory.py see them), the largest rung
predicted to fit with a margin, and the rung a job starts at (configured > remembered
fit > planner > 0). launch calls `choose_start_rung` for every run; `python -m
finellama_rl.plan` prints the same figures. Pure: no torch import.
"""
from __future__ import annotations

from typing import List, Tuple

from finellama_rl.config import Algo, Config, Device, ModelConfig
from finellama_rl.ladder.fitmem import remembered
from finellama_rl.ladder.run_ladder import ladder_for
from finellama_rl.ladder.rungs import Rung, Setting
from finellama_rl.login.memory import GIB, MemoryEstimate, MemoryInputs, ModelShape, estimate_memory, plan_rung
from finellama_rl.login.plan_scoring import scoring_parts, shared_bytes


def model_shape(m: ModelConfig) -> ModelShape:
    return ModelShape(params=int(m.params_b * 1e9), hidden_size=m.hidden_size, num_layers=m.num_layers,
                      num_attention_heads=m.num_attention_heads, num_kv_heads=m.num_kv_heads,
                      intermediate_size=m.intermediate_size, vocab_size=m.vocab_size, tie_embeddings=m.tie_embeddings)


def memory_inputs(cfg: Config, setting: Setting) -> MemoryInputs:
    """Our trainers as the planner sees them: both generate trainer.generation_batch
    sequences per generate call (the rung's setting.generation: PPO's whole rollout, or
    TRL's whole step, unless set or cut by the ladder), without LoRA dropout; PPO builds
    logits only for completion positions and keeps reference log-probs when
    ppo.kl_coef > 0 (GRPO when beta > 0); GRPO (TRL 1.16) takes its log-probs through
    TRL's fused, chunked lm_head and never holds full-vocabulary logits."""
    t = cfg.trainer
    ppo = t.algo == Algo.ppo
    return MemoryInputs(
        shape=model_shape(cfg.model), algo=t.algo.value, setting=setting, lora_r=t.lora.r if t.lora.enabled else 0,
        lora_target_modules=tuple(t.lora.target_modules), quantized=t.quantization.enabled,
        compute_bytes=2 if cfg.hardware.bf16 else 4, beta=t.ppo.kl_coef if ppo else t.beta,
        generation_batch=setting.generation,
        lora_dropout=t.lora.dropout, value_head=t.ppo.value_head.value,
        completion_logits_only=ppo, fused_logprobs=t.algo == Algo.grpo, double_quant=t.quantization.double_quant, quant_bits=t.quantization.bits)


def policy_budget_bytes(cfg: Config) -> int:
    """GPU bytes left to the policy: the card minus the scoring models that share its GPU."""
    return int(cfg.hardware.gpu_mem_gb * GIB) - shared_bytes(scoring_parts(cfg))


def plan(cfg: Config) -> Tuple[List[Rung], int, MemoryEstimate]:
    ladder = ladder_for(cfg)
    index, est = plan_rung(ladder, lambda s: memory_inputs(cfg, s), policy_budget_bytes(cfg), cfg.ladder.planner_margin)
    return ladder, index, est


def rung0_peak_bytes(cfg: Config) -> int:
    """The policy's predicted peak at rung 0 (the seed-style batch table's policy part)."""
    from finellama_rl.ladder.run_ladder import setting_of

    return estimate_memory(memory_inputs(cfg, setting_of(cfg.trainer, cfg.hardware))).peak_bytes


def predicted_peak_bytes(cfg: Config, rung: int) -> int:
    """The GPU peak the planner predicts at a rung: the policy's and the scoring models'
    that share its GPU (runs_per_gpu=auto packs runs by it)."""
    ladder = ladder_for(cfg)
    setting = ladder[min(max(rung, 0), len(ladder) - 1)].setting
    return estimate_memory(memory_inputs(cfg, setting)).peak_bytes + shared_bytes(scoring_parts(cfg))


def choose_start_rung(cfg: Config) -> Tuple[int, str]:
    """(rung, why): configured > remembered fit > planner > 0."""
    if not cfg.ladder.enabled or cfg.ladder.start_rung:
        return cfg.ladder.start_rung, "configured"
    ladder = ladder_for(cfg)
    found = remembered(cfg, ladder)
    if found is not None:
        return found
    if cfg.ladder.use_planner and cfg.hardware.device == Device.cuda:
        _, index, est = plan(cfg)
        fits = est.peak_bytes <= (1 - cfg.ladder.planner_margin) * cfg.hardware.gpu_mem_gb * GIB
        return index, f"planner {est.peak_bytes / GIB:.1f} GiB{'' if fits else ' (no rung fits!)'}"
    return 0, "start"
