"""A TrainContext like run_training's, without evaluation or the OOM ladder (shared by
the trainer tests; tests/ is on sys.path when pytest imports a test module)."""
from __future__ import annotations


def alternating_reward(completions, **kw):
    """Rewards with variance whatever the model writes (so advantages are not all 0)."""
    return [float(i % 2) for i in range(len(completions))]


def build_ctx(cfg, reward_funcs=None, resume_from=None, start_step=0):
    from finellama_rl.trainers.base import bare_context

    return bare_context(cfg, reward_funcs, resume_from, start_step, label="test")
