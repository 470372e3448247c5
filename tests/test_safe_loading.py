"""No pickle from a run folder is executed on resume (issue 9's safety item, training side).

PPO keeps RNG and scheduler state in rng_state.safetensors and scheduler.json and reads
optimizer.pt with torch.load(weights_only=True); GRPO resumes through transformers 5.23's
Trainer, which reads optimizer.pt, scheduler.pt and rng_state.pth with
torch.load(weights_only=True) (trainer.py `_load_rng_state`, `_load_optimizer_and_scheduler`).
A pickle planted in the newest checkpoint (with its manifest updated, so only the
loader stands between it and execution) is refused, and the code in it never runs.
"""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from finellama_rl.checkpoint import STATE_FILE, latest_checkpoint, manifest, verify_checkpoint
from finellama_rl.trainers.run import run_training
from finellama_rl.errors import EXIT_CRASH_TEST

RUN = ["experiment=smoke", "eval.protocol=finellama", "eval.num_examples=2", "eval.max_new_tokens=4",
       "eval.before_training=false", "trainer.max_completion_tokens=6", "trainer.max_steps=3", "trainer.save_every=2",
       "ladder.enabled=false"]
ALGO = {"ppo": ["trainer=ppo", "trainer.prompts_per_step=4", "trainer.micro_batch=2"],
        "grpo": ["trainer=grpo", "trainer.prompts_per_step=2", "trainer.num_generations=4", "trainer.micro_batch=4"]}


class Planted:
    """Unpickling this creates `marker`: proof that the pickle ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(ckpt: Path, name: str, marker: Path) -> None:
    torch.save({"state": Planted(marker), "python": Planted(marker)}, ckpt / name)
    state = json.loads((ckpt / STATE_FILE).read_text())
    state["manifest"] = manifest(ckpt)  # the worst case: the folder still verifies
    (ckpt / STATE_FILE).write_text(json.dumps(state))
    assert verify_checkpoint(ckpt) is None


@pytest.mark.slow
@pytest.mark.parametrize("algo, planted, refused, precheck", [
    ("ppo", ["training_args.bin"], None, True),  # the HF Trainer writes it and never reads it back
    ("ppo", ["scheduler.pt", "rng_state.pth"], "rng_state.pth", True),  # PPO never reads these: still refused by name
    ("ppo", ["optimizer.pt"], "optimizer.pt", True),
    ("grpo", ["rng_state.pth"], "rng_state.pth", True),
    ("grpo", ["rng_state.pth"], "rng_state.pth", False),  # without the check, torch's restricted loader still refuses
])
def test_a_planted_pickle_is_not_executed_on_resume(algo, planted, refused, precheck, make_config, tmp_path, monkeypatch):
    """A planted pickle is refused before anything loads, in one line that names the file
    (job/snapshot.unsafe_pickle: its opcodes are read, nothing is constructed), and no
    attempt is recorded; behind that check, the loaders read with weights_only=True."""
    from finellama_rl.errors import ConfigError
    from finellama_rl.job import snapshot

    marker = tmp_path / "PWNED"
    assert run_training(make_config(*RUN, *ALGO[algo], "debug.crash_after_step=2")) == EXIT_CRASH_TEST
    ckpt = latest_checkpoint(tmp_path / "run" / "checkpoints")
    assert ckpt.name == "step_000002"
    for name in planted:
        _plant(ckpt, name, marker)
    attempts = (tmp_path / "run" / "attempts.jsonl").read_text()
    cfg = make_config(*RUN, *ALGO[algo])
    if not precheck:
        monkeypatch.setattr(snapshot, "unsafe_pickle", lambda folder: None)
    if refused is None:
        assert run_training(cfg) == 0  # resumed from the safe files; the planted one was never read
    elif precheck:
        with pytest.raises(ConfigError, match=rf"step_000002/{refused} holds pickled Python objects .*open"):
            run_training(cfg)
        assert (tmp_path / "run" / "attempts.jsonl").read_text() == attempts  # refused before any attempt began
    else:
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            run_training(cfg)
    assert not marker.exists(), "a pickle from the run folder was executed"
