"""Memory plan for a run: predicted peak GPU memory broken down by component, the
largest OOM-ladder rung predicted to fit with a margin, and a verdict per hardware
profile in one table.

    python -m finellama_rl.plan model=qwen2.5-3b trainer=ppo hardware=a100_40
    python -m finellama_rl.plan experiment=seed_ppo_3b

launch uses `choose_start_rung` to start each job at its planned (or remembered)
rung. Pure: no torch import.
"""
from __future__ import annotations

from typing import List, Tuple

from finellama_rl.fitmem import describe as describe_fit_memory, remembered
from finellama_rl.ladder.run_ladder import ladder_for
from finellama_rl.compose import CONF_DIR, load_config, split_argv
from finellama_rl.config import Algo, Config, Device, world_size
from finellama_rl.errors import ConfigError
from finellama_rl.ladder.rungs import Rung, Setting
from finellama_rl.login.memory import GIB, MemoryEstimate, MemoryInputs, ModelShape, estimate_memory, format_estimate, plan_rung
from finellama_rl.login.plan_scoring import batch_table, format_parts, parse_batches, scoring_parts, shared_bytes


def model_shape(cfg: Config) -> ModelShape:
    m = cfg.model
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
        shape=model_shape(cfg), algo=t.algo.value, setting=setting, lora_r=t.lora.r if t.lora.enabled else 0,
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

    return estimate_memory(memory_inputs(cfg, setting_of(cfg))).peak_bytes


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


def verdict_table(overrides: List[str]) -> str:
    rows = [["hardware", "GPU GiB", "scorers GiB", "rung 0 peak", "planned rung", "setting", "peak", "verdict"]]
    for hw in sorted(p.stem for p in (CONF_DIR / "hardware").glob("*.yaml")):
        if load_config([f"hardware={hw}"], resolve_paths=False).hardware.device != Device.cuda:
            continue
        try:
            cfg = load_config([*overrides, f"hardware={hw}"], resolve_paths=False)
        except ConfigError as exc:  # e.g. reward_model.gpu=1 on a one-GPU profile
            rows.append([hw, "", "", "", "", "", "", f"n/a: {exc.key} (not valid on this profile)"])
            continue
        if cfg.hardware.device != Device.cuda:
            continue
        ladder, index, est = plan(cfg)
        first = estimate_memory(memory_inputs(cfg, ladder[0].setting))
        budget = (1 - cfg.ladder.planner_margin) * policy_budget_bytes(cfg)
        parts = scoring_parts(cfg)
        scorers = " ".join(f"{p.total / GIB:.1f}{'' if p.gpu is None else f'@GPU{p.gpu}'}" for p in parts) or "-"
        s = ladder[index].setting
        verdict = "fits" if index == 0 else ("fits after step-down" if est.peak_bytes <= budget else "DOES NOT FIT")
        if est.peak_bytes <= budget and ladder[index].changes_experiment:
            verdict = "fits only with shorter sequences"
        rows.append([hw, f"{cfg.hardware.gpu_mem_gb:g}", scorers, f"{first.peak_bytes / GIB:.1f}", str(index),
                     f"{s.micro_batch}x{s.grad_accum} seq {s.max_prompt_tokens}+{s.max_completion_tokens}"
                     f"{' ckpt' if s.activation_checkpointing else ''}", f"{est.peak_bytes / GIB:.1f}", verdict])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: List[str]) -> int:
    argv, batches = parse_batches(argv)  # --batches 1,2,4,8: the seed-style table (plan_scoring.py)
    _, overrides = split_argv(argv)
    cfg = load_config(overrides, resolve_paths=False)
    t = cfg.trainer
    quant = f"{t.quantization.bits}-bit" if t.quantization.enabled else "no"
    print(f"{cfg.model.name} {t.algo.value} on {cfg.hardware.name}: micro batch {t.micro_batch} x accum {t.grad_accum}, "
          f"prompt {t.max_prompt_tokens} + completion {t.max_completion_tokens} tokens, LoRA r={t.lora.r}, "
          f"quantization={quant}, training processes={world_size(cfg.hardware)}")
    if t.algo not in (Algo.grpo, Algo.ppo):
        print(f"the planner models GRPO and PPO steps; trainer={t.algo.value} is not planned")
        return 0
    parts = scoring_parts(cfg)
    if parts:
        print("\nscoring models (additive to the policy; plan_scoring.py):\n" + format_parts(parts))
    if cfg.hardware.device == Device.cuda:
        ladder, index, est = plan(cfg)
        print(f"\npredicted peak at the planned rung {index} ({ladder[index].description}):")
        print(format_estimate(est))
    print("\n" + describe_fit_memory(cfg, ladder_for(cfg)))
    print("\nper GPU profile (margin {:.0%}):".format(cfg.ladder.planner_margin))
    print(verdict_table([o for o in overrides if not o.startswith("hardware=")]))
    if batches:
        print(f"\npredicted GiB per GPU used (GPU 0 [+ GPU 1]) by sequences per process per step (rung 0, "
              f"margin {cfg.ladder.planner_margin:.0%}):")
        print(batch_table(overrides, batches, rung0_peak_bytes))
    return 0


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main)
