"""The demo behind `make run` (finellama_rl/demo.py) without training: which overrides
reach the SFT, the SFT cache key, and the RL runs it plans. The demo's learning is
measured in tests/test_learning.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from finellama_rl.errors import UsageError
from finellama_rl.demo import plan_rl, sft_config, split_overrides


def test_overrides_reach_the_sft_only_when_they_shape_it():
    sft, rl = split_overrides(["trainer=ppo", "trainer.seed=3", "data.max_operand=5", "model.tiny_final_norm=8",
                               "eval.protocol=finellama", "sft_seed=2"])
    assert sft == ["data.max_operand=5", "model.tiny_final_norm=8", "eval.protocol=finellama", "trainer.seed=2"]
    assert rl == ["trainer=ppo", "trainer.seed=3", "data.max_operand=5", "model.tiny_final_norm=8", "eval.protocol=finellama"]
    with pytest.raises(UsageError, match="one SFT adapter"):
        split_overrides(["data.max_operand=5,9"])


def test_sft_cache_folder_is_keyed_by_what_changes_the_adapter(monkeypatch, tmp_path):
    monkeypatch.setenv("FINELLAMA_CACHE", str(tmp_path))
    default = sft_config([])
    assert Path(default.run.dir).parent == tmp_path / "sft" and Path(default.run.dir).name.startswith("demo-")
    assert sft_config([]).run.dir == default.run.dir  # stable
    assert default.trainer.algo.value == "sft" and default.model.tiny and default.model.tiny_final_norm == 10.0
    others = {sft_config(o).run.dir for o in (["trainer.seed=1"], ["data.max_operand=5"], ["model.tiny_final_norm=8"])}
    assert len(others) == 3 and default.run.dir not in others


def test_rl_runs_get_their_trainers_demo_batch(tmp_path):
    runs = plan_rl(["trainer=ppo,grpo", f"run.results_dir={tmp_path}"], tmp_path / "sft", "demo-test")
    by_algo = {r.cfg.trainer.algo.value: r.cfg for r in runs}
    assert by_algo["grpo"].trainer.prompts_per_step == 8 and by_algo["grpo"].trainer.num_generations == 8
    assert by_algo["ppo"].trainer.prompts_per_step == 32 and by_algo["ppo"].trainer.num_generations == 1
    for cfg in by_algo.values():
        assert cfg.model.adapter == str(tmp_path / "sft") and cfg.trainer.rewards == ["correctness"]
        assert cfg.trainer.quantization.enabled and cfg.trainer.lora.enabled and cfg.eval.num_examples == "256"
        assert Path(cfg.run.dir).parent == tmp_path / "demo-test"
    (ppo,) = plan_rl(["trainer=ppo", "trainer.prompts_per_step=16", f"run.results_dir={tmp_path}"], tmp_path / "sft", "d")
    assert ppo.cfg.trainer.prompts_per_step == 16  # the command line wins


def test_synthetic_task_difficulty_knobs(make_config):
    """data.ops and data.max_operand shape the synthetic task the demo uses; a bad kind is
    refused at composition (exit 2), not at data loading."""
    import re

    from finellama_rl.errors import ConfigError
    from finellama_rl.task.data import generate_arithmetic

    adds = generate_arithmetic(200, seed=3, max_operand=9, ops=["add"])
    for p in adds:
        a, b, c = map(int, re.fullmatch(r"(\d+) \+ (\d+) = (\d+)\n#### \d+", p["answer"]).groups())
        assert 1 <= a <= 9 and 1 <= b <= 9 and c == a + b and p["answer"].endswith(f"#### {c}")
    mixed = generate_arithmetic(200, seed=3, max_operand=9)
    assert any("*" in p["answer"] for p in mixed) and any("-" in p["answer"] for p in mixed)
    with pytest.raises(ConfigError, match="data.ops"):
        make_config("experiment=demo", "data.ops=[add,div]")


def _step_pairs(problems, ordered: bool) -> set:
    """Every operand pair of every worked step, read from the solution text ("3 + 5 = 8";
    unless ordered, a sum or product is the same pair either way round)."""
    import re

    pairs = set()
    for p in problems:
        for line in p["answer"].splitlines()[:-1]:
            x, op, y = re.fullmatch(r"(\d+) ([-+*]) (\d+) = -?\d+", line).groups()
            pairs.add((op, *sorted((int(x), int(y)))) if op in "+*" and not ordered else (op, int(x), int(y)))
    return pairs


def test_the_demos_test_pairs_never_occur_in_sft_or_rl_training(make_config):
    """`make run`'s held-out problems: every operand pair of the test (and validation)
    solutions, as written, is absent from the SFT and RL training problems, and no test
    solution step occurs in any SFT target; its pairs are ordered (data.heldout_pairs), so
    some test sums are trained in the other order and some in neither (README "make run").
    The reward-model demo's task is the same kind (its pairs ordered too)."""
    import sys

    from finellama_rl.task.data import load_problems
    from finellama_rl.task.protocols import target_text

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import rm_learning_demo

    sft, rl = make_config("experiment=demo_sft"), make_config("experiment=demo")
    assert sft.data == rl.data  # one task: the adapter is trained for it
    rm = make_config(*rm_learning_demo.TASK)
    assert (sft.data.heldout_pairs.value, rm.data.heldout_pairs.value) == ("ordered", "ordered")
    for cfg, what, ordered in [(sft, "demo", True), (rm, "rm demo", True)]:
        train = load_problems(cfg.data, "train")
        held = {s: load_problems(cfg.data, s) for s in ("validation", "test")}
        trained = _step_pairs(train, ordered)
        for split, problems in held.items():
            assert len(_step_pairs(problems, ordered)) >= 3, (what, split)  # several held-out pairs, not one
            assert not _step_pairs(problems, ordered) & trained, (what, split)
        target_lines = {line for p in train for line in target_text(cfg.eval.protocol, p["answer"]).splitlines()}
        for p in held["test"]:
            assert not set(p["answer"].splitlines()[:-1]) & target_lines, (what, p["answer"])
    test = _step_pairs(load_problems(sft.data, "test"), True)
    reversed_trained = {(op, y, x) for op, x, y in _step_pairs(load_problems(sft.data, "train"), True)}
    assert test & reversed_trained and test - reversed_trained  # commutativity testable, and sums never trained
    assert len(load_problems(sft.data, "test")) == int(sft.eval.num_examples) == 256


@pytest.mark.slow  # a few seconds: the tiny model built, three greedy evaluations of 8 problems
def test_the_rm_demos_figures_for_choices_are_measured_on_the_validation_split(make_config, monkeypatch):
    """scripts/rm_learning_demo.py: each SFT-stage figure is measured on the split its name
    says; those a choice reads (--sft-steps, --rm-base-sft-steps) on exactly the validation
    problems, never a test one; the test figure on exactly the test problems."""
    import sys

    from finellama_rl.eval import core
    from finellama_rl.job.model import model_source
    from finellama_rl.task.data import load_problems

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
    import rm_learning_demo

    seen, real = [], core.prepare_split_eval

    def spy(cfg, tokenizer, split, adapter=None):
        setup = real(cfg, tokenizer, split, adapter)
        seen.append((str(getattr(split, "value", split)), [p["question"] for p in setup.problems], setup.split))
        return setup

    monkeypatch.setattr(core, "prepare_split_eval", spy)
    cfg = make_config(*rm_learning_demo.TASK)
    tiny = Path(model_source(cfg.model))  # any policy will do: the test is about which problems are read
    figures = rm_learning_demo.sft_accuracies(tiny, base=tiny, num_examples="8")
    assert list(figures) == ["policy_validation", "policy_test", "rm_base_validation"]
    assert all(0.0 <= v <= 1.0 for v in figures.values())
    assert [split for split, _, _ in seen] == [name.rsplit("_", 1)[1] for name in figures]
    questions = {s: [p["question"] for p in load_problems(cfg.data, s)] for s in ("validation", "test")}
    assert len(questions["validation"]) == 256 and len(questions["test"]) == 256
    assert not set(questions["validation"]) & set(questions["test"])
    for split, asked, record in seen:
        assert asked == questions[split][:8] and record["name"] == split and record["size"] == len(questions[split])


def test_a_stopped_demo_resumes_its_own_sweep_with_resume(tmp_path, monkeypatch, capsys):
    """A signal stops the first RL run (saved, exit 75): the demo starts no further run and says
    the exact command; `--resume` plans the same sweep with the same arguments (so each run
    continues from its checkpoints), and takes no other arguments."""
    import types

    from finellama_rl import demo, train
    from finellama_rl.errors import EXIT_STOPPED
    from finellama_rl.eval import sweep_report

    calls = []

    def fake_train(argv):
        calls.append(argv)
        return EXIT_STOPPED if len(calls) == 1 else 0

    monkeypatch.setattr(demo, "ensure_sft", lambda cfg: Path(cfg.run.dir))
    monkeypatch.setattr(train, "main", fake_train)
    monkeypatch.setattr(sweep_report, "write_report", lambda sweep: types.SimpleNamespace(html=sweep / "r.html", markdown=sweep / "r.md"))
    results = f"run.results_dir={tmp_path}"
    assert demo.main(["-m", "trainer=ppo,grpo", "trainer.max_steps=30", results]) == EXIT_STOPPED
    assert len(calls) == 1  # the second run never started
    out = capsys.readouterr().out
    assert "continue it (same sweep, from the checkpoints): python -m finellama_rl.demo --resume" in out
    (sweep,) = list(tmp_path.glob("demo-*"))
    assert demo.main(["--resume", results]) == 0
    resumed = calls[1:]
    assert [a for a in resumed[0] if a.startswith("run.dir=")] == [a for a in calls[0] if a.startswith("run.dir=")]
    assert len(resumed) == 2 and all(f'run.sweep="{sweep.name}"' in " ".join(r) or f"run.sweep={sweep.name}" in " ".join(r)
                                     for r in resumed)
    assert all("trainer.max_steps=30" in r for r in resumed)
    with pytest.raises(UsageError, match="give no others"):
        demo.main(["--resume", "trainer=ppo", results])
    with pytest.raises(UsageError, match="no demo sweep to resume"):
        demo.main(["--resume", f"run.results_dir={tmp_path / 'empty'}"])
