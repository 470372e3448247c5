"""Memory plan for a run: predicted peak GPU memory broken down by component, the
largest OOM-ladder rung predicted to fit with a margin, and a verdict per hardware
profile in one table.

    python -m finellama_rl.plan model=qwen2.5-3b trainer=ppo hardware=a100_40
    python -m finellama_rl.plan experiment=seed_ppo_3b

The decisions behind it (and launch's start rung) are in login/planner.py. Pure: no
torch import.
"""
from __future__ import annotations

from typing import List

from finellama_rl.compose import CONF_DIR, load_config, split_argv
from finellama_rl.config import Algo, Device, processes_per_node, world_size
from finellama_rl.errors import ConfigError
from finellama_rl.ladder.fitmem import describe as describe_fit_memory
from finellama_rl.ladder.run_ladder import ladder_for
from finellama_rl.login.memory import GIB, estimate_memory, format_estimate
from finellama_rl.login.plan_scoring import batch_table, format_parts, parse_batches, scoring_parts
from finellama_rl.login.planner import memory_inputs, plan, policy_budget_bytes, rung0_peak_bytes


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
          f"quantization={quant}, training processes={world_size(cfg.hardware)}"
          + (f" on {cfg.hardware.nodes} nodes ({processes_per_node(cfg.hardware)} per node; the peak below is each GPU's)"
             if cfg.hardware.nodes > 1 else "")
          + (f", {cfg.hardware.runs_per_gpu} runs per GPU" if str(cfg.hardware.runs_per_gpu) != "1" else ""))
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

    cli_main(main, overrides=True, resolve_paths=False)
