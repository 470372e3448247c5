"""GRPO gives one gradient per step whatever the micro batches, generate calls and ranks
(issue 20), for every accepted loss_type, on forced uneven completion lengths
(tests/grpo_grad.py: debug.eos_logit_bias; a tiny random model otherwise runs every
completion to the cap, where dapo's token count equals everyone's and hides the bug).

Before the fix, TRL scored each generation batch on its own: a step in two generate calls
moved dapo's gradient by 1.5 (relative) here and changed what was sampled; TRL's metrics were
means of per-micro-batch means. The arms: micro batch 8 (one micro batch), 4, 2, 1, and
one or two generate calls per rank; tolerance 1e-4 relative (measured: under 5e-7).
benchmarks/bench_grpo_split.py runs the whole matrix (losses x micro batches x calls x ranks).

    .venv/bin/python -m pytest tests/test_grpo_split.py -q
"""
from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from grpo_grad import Arms, relative_difference  # noqa: E402

ACCEPTED = ("grpo", "dr_grpo", "dapo")  # bnpo is refused (tests/test_knobs.py)


def test_the_trl_internals_the_override_relies_on():
    """TRL is pinned ~=1.16; trainers/grpo.py overrides private methods. If any of these
    change, the override may silently stop covering the whole step: fail here first."""
    import trl
    from trl import GRPOTrainer
    from trl.models import utils as model_utils

    assert trl.__version__.startswith("1.16."), trl.__version__
    params = list(inspect.signature(GRPOTrainer._generate_single_turn).parameters)
    assert params == ["self", "prompt_ids", "images", "multimodal_fields", "num_generations", "has_tool_images"]
    assert "self._generate_single_turn(" in inspect.getsource(GRPOTrainer._generate)
    single = inspect.getsource(GRPOTrainer._generate_single_turn)
    assert re.search(r"unwrap_model_for_generation\(\s*self\.model_wrapped", single)  # the object we shadow .generate on
    assert "unwrapped_model.generate(" in single and "generation_config=self.generation_config" in single
    assert "accelerator.unwrap_model(model" in inspect.getsource(model_utils._unwrap_model_for_generation)
    prepare = inspect.getsource(GRPOTrainer._prepare_inputs)
    assert "generate_every = self.args.steps_per_generation * self.num_iterations" in prepare  # one scoring call per step
    score = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    assert "num_items_in_batch = self.accelerator.gather(loss_mask.sum()).sum()" in score  # dapo: the call's tokens, all ranks
    assert "self.accelerator.process_index * len(prompts)" in score  # rank r holds rows [r n, (r + 1) n): our sampling keys
    assert 'self._metrics[mode]["reward_std"].append(nanstd(rewards).item())' in score  # over the call's gathered rewards
    assert re.search(r"advantages = rewards - mean_grouped_rewards\s+if self.scale_rewards != \"none\":", score)
    loss = inspect.getsource(GRPOTrainer._compute_loss)
    assert "* self.current_gradient_accumulation_steps / self.args.steps_per_generation" in loss
    assert 'self._metrics[mode]["entropy"].append(global_masked_mean(entropies))' in loss  # one mean per micro step
    assert "sum(valid) / len(valid)" in inspect.getsource(GRPOTrainer.log)  # ... averaged unweighted by log()
    assert "return self._compute_loss(model, inputs)" in inspect.getsource(GRPOTrainer.compute_loss)


@pytest.fixture(scope="module")
def arms(tmp_path_factory):
    torch.set_num_threads(1)
    return Arms(tmp_path_factory.mktemp("grpo-grad"))


def _uneven(result) -> None:
    lengths = {len(c) for _, c in result["samples"]}
    truncated = result["logs"]["completions/clipped_ratio"]
    assert len(lengths) > 3 and 0 < truncated < 1, ("the test needs uneven lengths", lengths, truncated)


@pytest.mark.parametrize("loss", ACCEPTED)
def test_each_loss_gives_one_gradient_whatever_the_micro_batches_and_generate_calls(arms, loss):
    """8 sequences (2 prompts x 4): micro batch 8 in one generate call is the reference;
    micro 4 in two calls, micro 2 in one, micro 1 in two: same samples, same gradient, same
    reward_std and entropy."""
    ref = arms.gradient(f"{loss}:8:0")
    _uneven(ref)
    for arm in (f"{loss}:4:4", f"{loss}:2:0", f"{loss}:1:4"):
        r = arms.gradient(arm)
        assert r["samples"] == ref["samples"], arm
        rel = relative_difference(r["grad"], ref["grad"])
        assert rel < 1e-4, (arm, rel)
        for key in ("reward_std", "completions/clipped_ratio", "completions/mean_length"):
            assert r["logs"][key] == pytest.approx(ref["logs"][key], rel=1e-6), (arm, key)
        assert r["logs"]["entropy"] == pytest.approx(ref["logs"]["entropy"], rel=1e-5), arm


def test_batch_scaling_and_masked_truncations_keep_the_gradient_and_the_logged_entropy(arms):
    """advantage_scaling=batch (the std of all the step's rewards) and truncation=mask
    (a micro batch may hold no loss token at all): one gradient, and train/entropy is the
    token mean of the step (TRL alone averaged per-micro-batch means: 6.22 -> 4.67)."""
    ref = arms.gradient("dapo:8:0:batch:mask")
    unmasked = arms.gradient("dapo:8:0:batch:none")
    assert relative_difference(unmasked["grad"], ref["grad"]) > 1e-2  # masking changes the step
    for arm in ("dapo:1:4:batch:mask", "grpo:2:3:batch:mask"):
        r = arms.gradient(arm)
        if arm.startswith("dapo"):
            assert relative_difference(r["grad"], ref["grad"]) < 1e-4, arm
        assert r["samples"] == ref["samples"] and r["logs"]["reward_std"] == pytest.approx(ref["logs"]["reward_std"])
        assert r["logs"]["entropy"] == pytest.approx(ref["logs"]["entropy"], rel=1e-5), arm


def test_advantage_scaling_none_is_reward_minus_group_mean(arms):
    """What the nanochat_rl preset asks for (issue 21): no std scaling, group mean removed."""
    r = arms.gradient("dapo:8:0:none:none")
    rewards = torch.tensor(r["rewards"]).view(-1, 4)  # groups of num_generations adjacent rows
    expected = (rewards - rewards.mean(1, keepdim=True)).flatten()
    assert rewards.std(1).max() > 0 and not torch.allclose(expected, expected / rewards.std(1).repeat_interleave(4))
    assert torch.allclose(r["advantages"], expected, atol=1e-6)


@pytest.mark.slow
def test_two_ranks_give_the_gradient_of_one_process_for_every_loss(arms, tmp_path):
    """torchrun, 2 CPU ranks over gloo, 4 sequences each: micro 4 in one call and micro 2 in
    two calls per rank, against one process at micro 8 in one call."""
    out = tmp_path / "ranks.pt"
    two = ["grpo:4:0", "dr_grpo:2:2", "dapo:2:2", "dapo:4:0:batch:mask"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(Path(__file__).parent / "grpo_grad.py"), str(out), *two],
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = torch.load(out, weights_only=False)
    for arm in two:
        loss, _, _, *rest = arm.split(":")
        ref = arms.gradient(":".join([loss, "8", "0", *rest]))
        r = ranks[arm]
        assert r["samples"] == ref["samples"], arm
        rel = relative_difference(r["grad"], ref["grad"])
        assert rel < 1e-4, (arm, rel)
        assert r["logs"]["reward_std"] == pytest.approx(ref["logs"]["reward_std"], rel=1e-6), arm
        assert r["logs"]["entropy"] == pytest.approx(ref["logs"]["entropy"], rel=1e-5), arm
