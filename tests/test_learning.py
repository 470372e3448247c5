"""Learning on the real path users run: the tiny model SFT'd on the synthetic task
(experiment=demo_sft, 4-bit base + LoRA), then GRPO and PPO from that adapter with the
real correctness reward (the protocol's strict `#### n` scorer), 3 seeds each. The
assertion is on held-out accuracy (256 test problems, greedy, whose additions are never
trained as written: data.heldout_pairs=ordered), not on training reward.

Budget (CI: 2 cores): one SFT for the session (about 25 s) and six short RL runs.
Measured margins: docs/LOG.md ("validation split and a demo that generalises", issue 21).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

# The demo trains 120; the test asserts a smaller margin over fewer steps. GRPO trains 80: with
# keyed sampling (issue 20) its 40-step gains were +0.8/+5.5/-2.3 points for seeds 0-2 (+2.7 on
# average over seeds 0-8, sd 5.4: a 3-seed mean passes or fails by luck), at 80 steps
# +7.8/+14.0/+3.5 (docs/LOG.md, lead's entry of 2026-12-07).
RL_STEPS = {"grpo": 80, "ppo": 40}
SEEDS = (0, 1, 2)
# final - baseline held-out accuracy, in [0, 1], on the additions never trained as written
# (docs/LOG.md, issue 21: PPO +10.9/-1.2/+11.7 points at 40 steps, mean +7.1)
MEAN_MARGIN = 0.04  # the mean gain over the three seeds
WORST_DROP = 0.03  # no seed may lose more than this


@pytest.fixture(scope="session")
def sft_run():
    """The demo's SFT, trained once per test session in the session's cache (HF_HOME is a
    temp folder, see conftest.py), exactly as `make run` trains it on a fresh machine."""
    from finellama_rl.console import setup_logging
    from finellama_rl.demo import ensure_sft, sft_config

    setup_logging()
    return ensure_sft(sft_config([]))


def _doc(run: Path) -> dict:
    return json.loads((run / "eval_results.json").read_text())


def _accuracy(doc: dict, which: str = "final") -> float:
    primary = doc["primary"]
    return (doc if which == "final" else doc["baseline"])["accuracy"][primary]


def test_sft_learns_the_task_partly(sft_run):
    """Some but not most problems right after the demo's SFT (0% before it)."""
    doc = _doc(sft_run)
    assert doc["trainer"] == "sft" and doc["total"] >= 64 and doc["primary"] == "strict"
    assert _accuracy(doc, "baseline") == 0.0
    print(f"sft: {_accuracy(doc):.3f}")
    assert 0.15 <= _accuracy(doc) <= 0.5, _accuracy(doc)
    # what generalises is commutativity: every right answer is a sum trained in the other order
    # (README "What the demo shows"); none of a sum trained in neither order
    import re

    from finellama_rl.demo import sft_config
    from finellama_rl.task.data import load_problems

    def operands(question: str) -> tuple:
        return tuple(map(int, re.search(r"has (\d+) .* finds (\d+) more", question).groups()))

    trained = {operands(p["question"]) for p in load_problems(sft_config([]).data, "train")}
    right = [operands(r["question"]) for r in doc["records"] if r["correct"]["strict"]]
    assert right and all(pair[::-1] in trained for pair in right), right


@pytest.mark.parametrize("algo", ["grpo", "ppo"])
def test_rl_from_the_sft_adapter_raises_heldout_accuracy(algo, sft_run, tmp_path):
    """Three seeds: the mean gain over the SFT policy, and no seed much worse than it."""
    from finellama_rl.demo import plan_rl
    from finellama_rl.trainers.run import run_training

    gains = []
    for seed in SEEDS:
        (run,) = plan_rl([f"trainer={algo}", f"trainer.seed={seed}", f"trainer.max_steps={RL_STEPS[algo]}", "trainer.eval_every=0",
                          "trainer.save_every=1000", f"run.results_dir={tmp_path / str(seed)}"], sft_run, "learning")
        cfg = run.cfg
        assert cfg.trainer.quantization.enabled and cfg.trainer.lora.enabled and cfg.trainer.rewards == ["correctness"]
        assert run_training(cfg) == 0
        doc = _doc(Path(cfg.run.dir))
        base, final = _accuracy(doc, "baseline"), _accuracy(doc)
        assert doc["total"] >= 64 and base == pytest.approx(_accuracy(_doc(sft_run)))  # the baseline is the SFT policy
        assert doc["split"]["name"] == "test"
        print(f"{algo} seed {seed}: {base:.3f} -> {final:.3f}")  # shown by pytest -rA (docs/LOG.md quotes them)
        gains.append(final - base)
    assert sum(gains) / len(gains) >= MEAN_MARGIN and min(gains) >= -WORST_DROP, f"{algo}: gains {gains}"
