"""A process that saves PPO-format checkpoints in a loop, for the SIGKILL test
(tests/test_checkpoint.py): it resumes from the newest complete checkpoint, then for
each later step writes the payload files (a crash point after each) and commits it
twice (a re-save of the same step, with keep_last=1).

    python tests/ckpt_saver.py <checkpoints dir> <last step>
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from finellama_rl.checkpoint import (clear_staging, commit_checkpoint, fault_point, latest_checkpoint, staging_root,
                                     step_of)
from finellama_rl.job.snapshot import rng_state, save_rng, save_scheduler


def payload(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"adapter": {f"layer{i}.lora_A.weight": torch.randn(64, 32, generator=g) for i in range(4)},
            "optimizer": {"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.randn(64, 32, generator=g)}},
                          "param_groups": [{"lr": 1e-5, "params": [0]}]},
            "scheduler": {"last_epoch": step, "base_lrs": [1e-5], "_last_lr": [1e-5]}}


def write(folder: Path, step: int) -> None:
    p = payload(step)
    save_file(p["adapter"], str(folder / "adapter_model.safetensors"))
    fault_point("adapter written")
    torch.save(p["optimizer"], folder / "optimizer.pt")
    fault_point("optimizer written")
    save_scheduler(folder / "scheduler.json", p["scheduler"])
    save_rng(folder / "rng_state.safetensors", rng_state())
    fault_point("scheduler and rng written")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))


def main(root: Path, last: int) -> None:
    clear_staging(root)  # what a restarted run does first
    latest = latest_checkpoint(root)
    for step in range((step_of(latest) if latest else 0) + 1, last + 1):
        for _ in range(2):
            staged = staging_root(root) / f"checkpoint-{step}"
            shutil.rmtree(staged, ignore_errors=True)
            staged.mkdir(parents=True)
            write(staged, step)
            commit_checkpoint(root, staged, step, {"data_position": step}, keep_last=1)
    print("saved up to step", last, flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
