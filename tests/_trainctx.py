"""A TrainContext like run_training's, without evaluation or the OOM ladder (shared by
the trainer tests; tests/ is on sys.path when pytest imports a test module)."""
from __future__ import annotations

from pathlib import Path


def alternating_reward(completions, **kw):
    """Rewards with variance whatever the model writes (so advantages are not all 0)."""
    return [float(i % 2) for i in range(len(completions))]


def build_ctx(cfg, reward_funcs=None, resume_from=None, start_step=0):
    import transformers

    from finellama_rl.data import load_problems, with_prompts
    from finellama_rl.model import ensure_tiny_model, load_policy, load_tokenizer
    from finellama_rl.monitor import TrainingMonitor
    from finellama_rl.results import RunPaths
    from finellama_rl.rewards.rules import build_reward_funcs
    from finellama_rl.trainers.base import TrainContext

    ensure_tiny_model(cfg.model)  # built before seeding: building consumes RNG
    transformers.set_seed(cfg.trainer.seed)
    tok = load_tokenizer(cfg.model)
    policy = load_policy(cfg.model, cfg.trainer, cfg.hardware)
    rows, _ = with_prompts(load_problems(cfg.data, "train"), tok, cfg.data.system_prompt, cfg.trainer.max_prompt_tokens)
    paths = RunPaths(Path(cfg.run.dir)).make()
    monitor = TrainingMonitor(cfg.trainer, paths, start_step, "test", print_fn=lambda s: None)
    funcs = reward_funcs or build_reward_funcs(cfg.trainer.rewards)
    return TrainContext(cfg, paths, policy, tok, rows, funcs, monitor, lambda m, s: {}, resume_from, start_step)
