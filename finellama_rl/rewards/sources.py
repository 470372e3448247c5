"""The reward-source registry behind `trainer.rewards`: rule rewards (rules.py: correctness,
format, digits) and rewards scored by a frozen model (reward_model.py: a reward model;
judge.py: an LLM judge), weighted by `trainer.reward_weights`, each logged as
`train/reward/<name>` by GRPO and PPO alike.

Why one registry: both trainers call rewards as `f(completions, **dataset_columns)`
(TRL's convention), so a model-backed source is just another callable. Each source is
wrapped so that its name is the one in trainer.rewards (GRPO logs `rewards/<__name__>`,
PPO uses trainer.rewards), and a model-backed source scores under `torch.no_grad()`
and keeps its time and memory, which the monitor adds to every metrics line:
`perf/reward/<name>_s` (seconds scoring per step), `perf/reward/<name>_mem_gb` (peak
memory of the device it runs on; CUDA only), `perf/reward/<name>_weights_gb` (its
weights), and for the judge `train/judge_malformed_frac` (verdicts that were neither
CORRECT nor INCORRECT, scored 0).

    sources = build_reward_sources(cfg)          # in trainers/run.py, before training
    monitor.metric_sources += [s.metrics for s in sources if isinstance(s, ScoringSource)]

Pure at import (no torch). The names trainer.rewards accepts are config.SOURCE_NAMES.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from finellama_rl.config import SCORING_SOURCES, SOURCE_NAMES, Config, Device, EvalProtocol, HardwareConfig
from finellama_rl.errors import ConfigError
from finellama_rl.rewards.rules import REWARD_FUNCS, RewardFunc, _completion_text

log = logging.getLogger(__name__)


class NamedReward:
    """A rule reward under its trainer.rewards name (TRL reads `__name__` for its metric key)."""

    def __init__(self, name: str, func: RewardFunc):
        self.__name__ = name
        self.func = func

    def __call__(self, completions: list, **columns: Any) -> list:
        return self.func(completions, **columns)


class ScoringSource:
    """A reward scored by a frozen model: `scorer.score(questions, completions, references)
    -> list[float]`, called without gradients; records time and memory for the monitor.

    Not an nn.Module on purpose: TRL would treat a module as its own kind of reward model."""

    def __init__(self, name: str, scorer: Any):
        self.__name__ = name
        self.scorer = scorer
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, completions: list, question: Optional[list] = None, answer: Optional[list] = None,
                 **columns: Any) -> List[float]:
        import torch

        if question is None or len(question) != len(completions):
            raise ValueError(f"{self.__name__}: needs the `question` column, one per completion")
        texts = [_completion_text(c) for c in completions]
        t0 = time.perf_counter()
        with torch.no_grad():
            scores = [float(s) for s in self.scorer.score(list(question), texts, list(answer) if answer else None)]
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        if len(scores) != len(completions):
            raise RuntimeError(f"{self.__name__}: {len(scores)} scores for {len(completions)} completions")
        return scores

    def metrics(self, steps: int = 1) -> Dict[str, float]:
        """Per-step figures since the last call (the monitor calls it once per metrics line)."""
        steps = max(1, steps)
        out = {f"perf/reward/{self.__name__}_s": self.seconds / steps,
               f"perf/reward/{self.__name__}_weights_gb": self.scorer.weight_bytes() / 2**30}
        peak = self.scorer.peak_memory_bytes()
        if peak is not None:
            out[f"perf/reward/{self.__name__}_mem_gb"] = peak / 2**30
        out.update(self.scorer.drain_metrics())
        self.seconds, self.calls = 0.0, 0
        return out


def scoring_device(hardware: HardwareConfig, gpu: Optional[int]) -> str:
    """Where a scoring model lives: `cuda:<gpu>` when it names a GPU, else the policy's own
    device (`cuda:<LOCAL_RANK>`, i.e. the training process's GPU), `cpu` on CPU."""
    import os

    if hardware.device != Device.cuda:
        return "cpu"
    return f"cuda:{gpu if gpu is not None else int(os.environ.get('LOCAL_RANK', 0))}"


def check_sources_available(cfg: Config) -> None:
    """Before any model loads: each model-backed source's weights can be found (exit 2 if not)."""
    from finellama_rl.config import scoring_sources

    if "reward_model" in scoring_sources(cfg.trainer):
        from finellama_rl.artifacts import describe_source

        describe_source(cfg.reward_model)  # ConfigError("reward_model.path", ...) when it is not a reward model
    if "judge" in scoring_sources(cfg.trainer):
        from finellama_rl.rewards.judge import judge_source

        judge_source(cfg.judge)


def _build_scorer(name: str, cfg: Config):
    device = scoring_device(cfg.hardware, getattr(cfg, name).gpu)
    if name == "reward_model":
        from finellama_rl.rewards.reward_model import load_reward_model

        return load_reward_model(cfg.reward_model, cfg.hardware, device)
    if name == "judge":
        from finellama_rl.rewards.judge import load_judge

        return load_judge(cfg.judge, cfg.hardware, device)
    raise ValueError(f"unknown scoring source {name!r}: expected {'|'.join(SCORING_SOURCES)}")


def build_reward_sources(cfg: Config, protocol: Optional[EvalProtocol] = None) -> List[Callable]:
    """One callable per name in cfg.trainer.rewards, in order (so reward_weights line up)."""
    protocol = protocol or cfg.eval.protocol
    funcs: List[Callable] = []
    for name in cfg.trainer.rewards:
        if name in REWARD_FUNCS:
            funcs.append(NamedReward(name, REWARD_FUNCS[name](protocol)))
        elif name in SCORING_SOURCES:
            scorer = _build_scorer(name, cfg)
            funcs.append(ScoringSource(name, scorer))
            log.info("reward source %s: %s on %s (%.2f GiB of weights)", name, scorer.description,
                     scorer.device, scorer.weight_bytes() / 2**30)
        else:
            raise ConfigError("trainer.rewards", f"unknown reward {name!r}: expected one of {'|'.join(SOURCE_NAMES)}")
    return funcs


def metric_sources(funcs: Sequence[Callable]) -> List[Callable[[int], Dict[str, float]]]:
    """The per-step metrics of the model-backed sources among `funcs`, for TrainingMonitor."""
    return [f.metrics for f in funcs if isinstance(f, ScoringSource)]
