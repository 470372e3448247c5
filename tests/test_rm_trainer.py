"""trainer=rm (trainers/rm.py, rm_data.py) and its metrics (eval/classification.py)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from finellama_rl.eval.classification import auroc, binary_metrics
from finellama_rl.trainers.rm_data import balance, build_candidates, corrupt, label_examples, split_problems


def test_auroc_and_binary_metrics_known_values():
    assert auroc([0.9, 0.8, 0.1, 0.2], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.9, 0.8], [1, 1, 0, 0]) == 0.0
    assert auroc([0.5, 0.5, 0.5, 0.5], [1, 0, 1, 0]) == 0.5  # ties count one half
    assert auroc([0.9, 0.2, 0.7], [1, 0, 0]) == 1.0
    assert auroc([0.3, 0.2, 0.7], [1, 0, 0]) == 0.5
    assert auroc([0.3, 0.2], [1, 1]) is None
    m = binary_metrics([0.9, 0.6, 0.4, 0.1], [1, 0, 1, 0])
    assert (m["accuracy"], m["precision"], m["recall"], m["majority_baseline"]) == (0.5, 0.5, 0.5, 0.5)
    assert m["auroc"] == 0.75 and m["n"] == 4 and m["positives"] == 2


def test_corrupt_changes_the_final_answer_everywhere():
    rng = random.Random(0)
    for _ in range(50):
        bad = corrupt("3 + 4 = 7\n#### 7", rng)
        first, final = bad.split("= ")[1].split("\n")[0], bad.split("#### ")[1]
        assert first == final != "7" and bad.startswith("3 + 4 = ")
    assert corrupt("no numbers here", rng) is None
    assert "110" not in corrupt("10 + 100 = 110\n#### 110", random.Random(1)).split("####")[1]


def test_labels_come_from_the_scorer_and_the_split_is_by_problem():
    problems = [{"question": f"q{i}", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(10)]
    samples = [[f"{i} + 1 = {i + 1}\n#### {i + 1}", f"{i} + 1 = {i + 2}\n#### {i + 2}"] for i in range(10)]
    cands = build_candidates(problems, samples, "finellama", corrupted_per_problem=1, include_reference=True, seed=0)
    ex = label_examples("finellama", cands)
    by = {o: [e.label for e in ex if e.origin == o] for o in ("sample", "corrupted", "reference")}
    assert by["sample"] == [1, 0] * 10 and set(by["reference"]) == {1} and len(by["corrupted"]) == 10
    assert sum(by["corrupted"]) <= 3  # a corrupted copy is right only by chance (of a wrong sample)
    train, held = split_problems(10, 0.2, seed=0)
    assert len(held) == 2 and not set(train) & set(held) and sorted(train + held) == list(range(10))
    bal = balance([e for e in ex if e.problem in train], seed=0)
    assert sum(e.label for e in bal) * 2 == len(bal)


@pytest.mark.slow
def test_trainer_rm_end_to_end_and_scoring_with_its_run_folder(make_config, tmp_path):
    """trainer=rm on the tiny model: samples, labels, trains, writes rm_eval.json and a reward
    model that reward_model.path=<run> loads and scores with."""
    from finellama_rl.rewards.reward_model import load_reward_model
    from finellama_rl.trainers.run import run_training

    tiny = ["model=tiny", "data=arithmetic", "hardware=cpu", "eval.protocol=finellama", "data.num_train=40",
            "data.num_test=8", "data.max_operand=5", "data.ops=[add]"]
    cfg = make_config(*tiny, "trainer=rm", "trainer.rm.num_problems=20", "trainer.rm.samples_per_problem=2",
                      "trainer.max_completion_tokens=12", "trainer.max_steps=4", "trainer.prompts_per_step=8",
                      "trainer.micro_batch=4", "trainer.eval_every=2", "trainer.log_every=1")
    assert run_training(cfg) == 0
    run = Path(cfg.run.dir)
    doc = json.loads((run / "rm_eval.json").read_text())
    assert doc["heldout"]["n"] == len(doc["records"]) > 0 and 0 <= doc["heldout"]["accuracy"] <= 1
    assert doc["heldout_data"]["reference"]["positives"] == doc["heldout_data"]["reference"]["n"] > 0  # scorer credits references
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and "eval/rm_accuracy" in metrics[1]
    assert (run / "reward_model" / "finellama_reward_model.json").is_file()
    assert run_training(cfg) == 0  # already trained: says so, trains nothing
    rm_cfg = make_config(*tiny, "trainer.rewards=[reward_model]", "model@reward_model.model=tiny",
                         f"reward_model.path={run}", "reward_model.quantization=nf4", run_dir=str(tmp_path / "other"))
    scorer = load_reward_model(rm_cfg.reward_model, rm_cfg.hardware, "cpu")
    held = [r for r in doc["records"]][:4]
    scores = scorer.score([r["question"] for r in held], [r["completion"] for r in held])
    assert all(0 <= s <= 1 for s in scores)
    assert scores == pytest.approx([r["score"] for r in held], abs=0.05)  # nf4 scoring ~ the fp32 training eval
