"""One GRPO step's gradient on forced uneven completion lengths, for the split-invariance
tests (tests/test_grpo_split.py) and benchmarks/bench_grpo_split.py: the step runs through
our GRPO trainer (TRL underneath) with max_grad_norm=0, the gradient is read before the
optimizer step and then zeroed (AdamW with a zero gradient and no weight decay leaves the
weights alone), so one loaded policy serves every arm. debug.eos_logit_bias makes the tiny
random model stop at varied lengths (without it every completion runs to the cap and hides
what a loss normalises by); the reward is a function of a completion's text only.

    torchrun --standalone --nproc_per_node 2 tests/grpo_grad.py OUT.pt ARM [ARM ...]

where ARM is `loss_type:micro_batch:generation_batch[:advantage_scaling:truncation]`; rank 0
saves {arm: {"grad", "logs", "samples"}} to OUT.pt.
"""
from __future__ import annotations

import dataclasses
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

import torch

COMMON = ["experiment=smoke", "trainer=grpo", "eval.protocol=finellama", "trainer.prompts_per_step=2",
          "trainer.num_generations=4", "trainer.max_completion_tokens=16", "trainer.max_steps=1",
          "trainer.save_every=100", "trainer.max_grad_norm=0", "trainer.weight_decay=0", "trainer.learning_rate=1e-3",
          "eval.before_training=false", "debug.eos_logit_bias=4", "ladder.enabled=false"]


def arm_overrides(arm: str, processes: int = 1) -> List[str]:
    """`loss:micro:generation[:scaling:truncation]` -> config overrides."""
    loss, micro, gen, *rest = arm.split(":")
    scaling, truncation = rest or ("group", "none")
    return [f"trainer.loss_type={loss}", f"trainer.micro_batch={micro}", f"trainer.generation_batch={gen}",
            f"trainer.advantage_scaling={scaling}", f"trainer.truncation={truncation}", f"hardware.processes={processes}"]


def content_reward(completions, **kw):
    """A function of the text alone (not of its place in a call), with variance within groups."""
    return [float(sum(map(ord, c)) % 5) / 4.0 for c in completions]


class Arms:
    """A policy loaded once; `gradient(arm)` trains one step of that arm from the same weights."""

    def __init__(self, root: Path, processes: int = 1):
        from finellama_rl.compose import load_config
        from finellama_rl.trainers.base import bare_context

        self.root, self.processes, self.samples, self.rewards = Path(root), processes, [], []
        cfg = load_config([*COMMON, *arm_overrides(f"dapo:{8 // processes}:0", processes), f"run.results_dir={root}", f"run.dir={root}/base"])
        self.ctx = bare_context(cfg, [self._recording_reward], label="grad")

    def _recording_reward(self, completions, **kw):
        rewards = content_reward(completions)
        self.samples.extend(zip(kw["question"], completions))
        self.rewards.extend(rewards)
        return rewards

    def gradient(self, arm: str) -> Dict[str, object]:
        """{"grad": flat fp32 gradient, "logs": TRL's logged step, "samples": sorted (question,
        completion) pairs, "rewards" and "advantages": this rank's, in TRL's row order (groups
        of num_generations adjacent)}."""
        from transformers import TrainerCallback

        from finellama_rl.compose import load_config
        from finellama_rl.job.faults import PhaseTracker
        from finellama_rl.job.monitor import TrainingMonitor
        from finellama_rl.job.snapshot import SnapshotHolder
        from finellama_rl.results import RunPaths
        from finellama_rl.trainers import grpo

        run = self.root / arm.replace(":", "_")
        cfg = load_config([*COMMON, *arm_overrides(arm, self.processes), f"run.results_dir={self.root}", f"run.dir={run}"])
        paths = RunPaths(run).make()
        ctx = dataclasses.replace(self.ctx, cfg=cfg, paths=paths, tracker=PhaseTracker(), snapshots=SnapshotHolder(),
                                  monitor=TrainingMonitor(cfg.trainer, paths, 0, "grad", print_fn=lambda s: None))
        trainer, _ = grpo.build_trainer(ctx)
        grads: List[torch.Tensor] = []

        class Grab(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kw):
                params = [p for p in trainer.model.parameters() if p.requires_grad]
                grads.append(torch.cat([p.grad.detach().float().reshape(-1) for p in params]))
                for p in params:
                    p.grad.zero_()  # the optimizer step then changes nothing: the next arm starts from these weights

        advantages: List[torch.Tensor] = []
        score = trainer._generate_and_score_completions

        def scored(inputs):
            out = score(inputs)
            advantages.append(out["advantages"].detach().clone())
            return out

        trainer._generate_and_score_completions = scored
        trainer.add_callback(Grab())
        self.samples, self.rewards = [], []
        trainer.train()
        logs = next(h for h in trainer.state.log_history if "loss" in h)
        return {"grad": grads[0], "logs": logs, "samples": sorted(self.samples), "rewards": list(self.rewards),
                "advantages": torch.cat(advantages)}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main(argv: Sequence[str]) -> int:
    """torchrun entry: every rank computes each arm; rank 0 saves them with every rank's samples."""
    from finellama_rl.job import distributed as dist

    torch.set_num_threads(1)
    out, arms = Path(argv[0]), argv[1:]
    dist.init(cuda=False)
    if dist.is_main():  # the tiny model is built once, before any rank loads it (a fresh cache: no half-written files)
        from finellama_rl.compose import load_config
        from finellama_rl.job.model import ensure_tiny_model

        ensure_tiny_model(load_config([*COMMON, *arm_overrides("dapo:4:0", 2)], resolve_paths=False).model)
    dist.barrier()
    runner = Arms(Path(tempfile.mkdtemp(prefix=f"grpo-grad-{dist.rank()}-")), processes=dist.world())
    results = {}
    for arm in arms:
        r = runner.gradient(arm)
        gathered = [None] * dist.world()
        torch.distributed.all_gather_object(gathered, r["samples"])
        results[arm] = {**r, "samples": sorted(s for part in gathered for s in part)}
    if dist.is_main():
        torch.save(results, out)
    dist.leave()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
