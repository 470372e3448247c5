"""finellama_rl.evaluate (the command) and finellama_rl.eval.passk: pass@k against a brute-force
count, bad input exits 2 before any model loads, the protocol of older run folders, file
naming without overwrites, a real tiny run evaluated twice with identical results, and
`checkpoint=all` loading the base once with the same results as one checkpoint at a time."""
from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from finellama_rl import evaluate
from finellama_rl.compose import cli_main, load_config
from finellama_rl.config import EvalProtocol
from finellama_rl.eval.passk import k_values, pass_at_k, score_samples
from finellama_rl.fileio import atomic_write_json, atomic_write_text, read_json
from finellama_rl.task.protocols import QWEN_INSTRUCTION

REPO = Path(__file__).resolve().parent.parent


def brute_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of the k-subsets of n samples (c correct) that contain a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k,expected", [(10, 3, 1, 0.3), (5, 0, 1, 0.0), (5, 0, 5, 0.0), (5, 5, 1, 1.0),
                                            (5, 5, 3, 1.0), (4, 1, 4, 1.0), (4, 2, 2, 1 - 1 / 6)])
def test_pass_at_k_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("n,c,k", [(6, 2, 3), (7, 3, 2), (8, 1, 4), (9, 4, 5), (10, 7, 3), (12, 5, 6)])
def test_pass_at_k_matches_brute_force(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_k_is_stable_for_large_n():
    assert pass_at_k(1000, 10, 100) == pytest.approx(1 - math.comb(990, 100) / math.comb(1000, 100), rel=1e-9)


@pytest.mark.parametrize("n,c,k", [(5, 6, 1), (5, -1, 1), (5, 2, 0), (5, 2, 6)])
def test_pass_at_k_rejects_impossible_inputs(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_k_values():
    assert k_values(1) == [1]
    assert k_values(6) == [1, 2, 4, 6]
    assert k_values(8) == [1, 2, 4, 8]


def test_score_samples_strict_and_lenient():
    problems = [{"question": "q1", "answer": "2 + 3 = 5\n#### 5"}, {"question": "q2", "answer": "#### 7"}]
    samples = [["so #### 5", "it is 5", "#### 6", "no idea"], ["#### 1", "8", "x", "#### 2"]]
    out = score_samples(problems, samples, temperature=0.7, seed=0)["summary"]
    assert out["samples"] == 4 and out["primary"] == "strict"
    assert out["strict"] == pytest.approx({"1": 0.125, "2": 0.25, "4": 0.5})
    assert out["lenient"] == pytest.approx({"1": 0.25, "2": (1 - 1 / 6) / 2, "4": 0.5})
    assert out["math_verify"] == pytest.approx({"1": 0.25, "2": (1 - 1 / 6) / 2, "4": 0.5})  # last number, like lenient here
    cut = score_samples(problems, [["#### 5\nQuestion: x? #### 9"] * 2, ["#### 7"] * 2], 0.7, 0, stops=["\nQuestion:"])
    assert cut["summary"]["strict"]["1"] == 1.0 and cut["per_problem"][0]["samples"][0] == "#### 5"


# ------------------------------------------------------------------ a hand-made run folder


def make_run_folder(root: Path, steps=(2, 4), *overrides: str) -> Path:
    """config.yaml from the real conf/ plus committed (empty) checkpoint folders."""
    from finellama_rl.compose import config_yaml

    run = root / "sweep" / "grpo-tiny-cpu"
    cfg = load_config(["experiment=smoke", f"run.dir={run}", f"run.results_dir={root}", "run.sweep=sweep", *overrides])
    atomic_write_text(run / "config.yaml", config_yaml(cfg))
    for s in steps:
        ck = run / "checkpoints" / f"step_{s:06d}"
        ck.mkdir(parents=True)
        (ck / "adapter_model.safetensors").write_bytes(len(b"{}").to_bytes(8, "little") + b"{}")  # a valid, empty one
        atomic_write_json(ck / "adapter_config.json", {"peft_type": "LORA"})
        atomic_write_json(ck / "finellama_state.json", {"step": s})
    return run


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load weights fails the test."""
    import finellama_rl.job.model as model

    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(model, "load_base", boom)
    monkeypatch.setattr(model, "load_tokenizer", boom)


@pytest.mark.parametrize("args,key", [
    (["checkpoint=7"], "checkpoint: no step 7"),
    (["checkpoint=soon"], "checkpoint: expected latest|all|base|<step>"),
    (["eval.samples=0"], "eval.samples: must be > 0"),
    (["eval.samples=two"], "eval.samples:"),
    (["eval.num_examples=-3"], "eval.num_examples: must be > 0 or `all`"),
    (["eval.sample_temperature=0"], "eval.sample_temperature: must be > 0"),
    (["eval.num_exampels=5"], "Did you mean eval.num_examples?"),
    (["eval.protocol=harness"], "eval.protocol"),
    (["split=train"], "split: expected test|validation"),
    (["trainer.learning_rate=1"], "trainer.learning_rate: not a setting of finellama_rl.evaluate"),
])
def test_bad_input_exits_2_before_loading(tmp_path, capsys, no_model_load, args, key):
    run = make_run_folder(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli_main(evaluate.main, [f"run={run}", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert key in err and len(err.splitlines()) == 1


def test_missing_run_folder_exits_2_from_the_shell(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "finellama_rl.evaluate", f"run={tmp_path / 'nope'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: run: {tmp_path / 'nope'} is not a folder; pass run=<results/<sweep>/<run>>"


def test_choose_targets(tmp_path):
    run = make_run_folder(tmp_path, steps=(2, 4, 6))
    assert [t.label for t in evaluate.choose_targets(run, "latest")] == ["step_000006"]
    assert [t.step for t in evaluate.choose_targets(run, "all")] == [2, 4, 6]
    assert evaluate.choose_targets(run, "4")[0].adapter_dir == run / "checkpoints" / "step_000004"
    assert evaluate.choose_targets(run, "step_000002")[0].step == 2
    base = evaluate.choose_targets(run, "base")[0]
    assert (base.label, base.step, base.adapter_dir) == ("base", 0, None)


def test_protocol_of_older_run_folders_is_finellama(tmp_path):
    """A config.yaml written before eval.protocol existed trained on `####`: evaluate it that way."""
    run = make_run_folder(tmp_path)
    assert evaluate.load_run_config(run).eval.protocol == EvalProtocol.qwen_boxed  # written now: the default
    text = (run / "config.yaml").read_text()
    old = "\n".join(line for line in text.splitlines() if not line.strip().startswith("protocol:"))
    (run / "config.yaml").write_text(old.replace("batch_size: 64", "batch_size: 0"))
    cfg = evaluate.load_run_config(run)
    assert cfg.eval.protocol == EvalProtocol.finellama and cfg.eval.batch_size == 0
    assert evaluate.load_run_config(run, ["eval.protocol=lm_eval_gsm8k"]).eval.protocol == EvalProtocol.lm_eval_gsm8k


def test_file_names_never_overwrite(tmp_path):
    run = make_run_folder(tmp_path)
    cfg = evaluate.load_run_config(run, ["eval.num_examples=all", "eval.samples=8"])
    assert evaluate.eval_file_name("base", cfg.eval) == "base-qwen_boxed-nall-k8.json"
    cfg = evaluate.load_run_config(run, ["eval.num_examples=50", "eval.shots=3", "eval.protocol=lm_eval_gsm8k"])
    name = evaluate.eval_file_name("step_000200", cfg.eval)
    assert name == "step_000200-lm_eval_gsm8k-n50-greedy-3shot.json"
    paths = [evaluate.reserve_path(tmp_path / "evals", name) for _ in range(3)]
    assert [p.name for p in paths] == [name, name.replace(".json", "-2.json"), name.replace(".json", "-3.json")]


# ------------------------------------------------------------------ a real tiny run


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real two-step GRPO run of the tiny model on the synthetic task, with a checkpoint per step
    (a large learning rate and the digits reward, which varies between samples, so that the
    two adapters differ: a 16-token completion of the random model holds a digit about one time
    in four, so 2 groups of 4 leave both steps without reward variance about once in 200 seeds;
    with 2 of 2 and 8 tokens it was one in three)."""
    from finellama_rl.trainers.run import run_training

    root = tmp_path_factory.mktemp("results")
    run = root / "sweep" / "grpo-tiny-cpu"
    cfg = load_config(["experiment=smoke", f"run.dir={run}", f"run.results_dir={root}", "run.sweep=sweep",
                       "trainer.max_steps=2", "trainer.save_every=1", "trainer.keep_last=2", "trainer.prompts_per_step=2",
                       "trainer.num_generations=4", "trainer.micro_batch=4", "trainer.max_completion_tokens=16",
                       "trainer.learning_rate=0.05", "trainer.rewards=[digits]", "data.num_train=16", "data.num_test=8", "eval.num_examples=2",
                       "eval.max_new_tokens=8", "eval.before_training=false", "ladder.remember_fit=false"])
    assert run_training(cfg) == 0
    return root, run


@pytest.mark.slow
def test_tiny_run_evaluated_twice_gives_identical_results(tiny_run, capsys):
    root, run = tiny_run
    args = [f"run={run}", "checkpoint=1", "eval.num_examples=4", "eval.max_new_tokens=8"]
    assert evaluate.main(args) == 0
    assert evaluate.main(args) == 0
    first = run / "evals" / "step_000001-qwen_boxed-n4-greedy.json"
    second = run / "evals" / "step_000001-qwen_boxed-n4-greedy-2.json"
    a, b = read_json(first), read_json(second)
    assert a["total"] == b["total"] == 4
    assert (a["accuracy"], a["correct"], a["ci95"]) == (b["accuracy"], b["correct"], b["ci95"])
    assert [r["completion"] for r in a["records"]] == [r["completion"] for r in b["records"]]
    assert all(r["new_tokens"] > 0 for r in a["records"])  # the model really generated
    assert (a["checkpoint"], a["step"], a["schema_version"], a["run_dir"]) == ("step_000001", 1, 2, str(run))
    protocol = a["protocol"]
    assert (protocol["name"], protocol["primary"], a["primary"], protocol["shots"]) == ("qwen_boxed", "math_verify", "math_verify", 0)
    assert protocol["decoding"]["decoding"] == "greedy" and protocol["decoding"]["max_new_tokens"] == 8
    assert protocol["batch_size"] == 64 and protocol["stop_strings"] == ["</s>", "<|im_end|>", "<|endoftext|>"]
    assert protocol["chat_template"] and len(protocol["chat_template_sha256"]) == 64 and "im_start" in protocol["chat_template_text"]
    assert protocol["model"]["adapter"] == str(run / "checkpoints" / "step_000001")
    assert protocol["model"]["quantization"]["quant_type"] == "nf4" and protocol["scorer_versions"]["math-verify"] == "0.9.0"
    assert set(a["accuracy"]) == {"math_verify", "strict", "lenient", "lm_eval_strict", "lm_eval_flexible"}
    assert a["ci95"]["math_verify"][0] <= a["accuracy"]["math_verify"] <= a["ci95"]["math_verify"][1]
    assert [r["index"] for r in a["records"]] == [0, 1, 2, 3] and set(a["records"][0]["correct"]) == set(a["accuracy"])
    index = json.loads((root / "eval_results.json").read_text())
    paths = sorted(e["path"] for e in index["entries"] if e["checkpoint"] == "step_000001" and e["n"] == 4)
    assert paths == ["sweep/grpo-tiny-cpu/evals/step_000001-qwen_boxed-n4-greedy-2.json",
                     "sweep/grpo-tiny-cpu/evals/step_000001-qwen_boxed-n4-greedy.json"]
    assert "step_000001: qwen_boxed/math_verify" in capsys.readouterr().out


@pytest.mark.slow
def test_split_validation_evaluates_the_validation_problems(tiny_run):
    """`split=validation` (choosing a checkpoint) evaluates validation problems, never test
    ones, records the split, and names its file and index entry apart from test's."""
    from finellama_rl.task.data import load_problems

    root, run = tiny_run
    assert evaluate.main([f"run={run}", "checkpoint=1", "split=validation", "eval.num_examples=3", "eval.max_new_tokens=4"]) == 0
    doc = read_json(run / "evals" / "step_000001-qwen_boxed-validation-n3-greedy.json")
    cfg = evaluate.load_run_config(run)
    val, test = load_problems(cfg.data, "validation"), load_problems(cfg.data, "test")
    assert [r["question"] for r in doc["records"]] == [p["question"] for p in val[:3]]
    assert not {r["question"] for r in doc["records"]} & {p["question"] for p in test}
    assert doc["split"]["name"] == "validation" and doc["split"]["size"] == len(val) == cfg.data.validation_size
    entries = json.loads((root / "eval_results.json").read_text())["entries"]
    assert [e["split"] for e in entries if "-validation-" in e["path"]] == ["validation"]


@pytest.mark.slow
def test_eval_files_record_the_training_and_evaluation_budgets_and_shots(tiny_run):
    """Issue 21: every eval document says what training sampled (16 tokens, zero-shot) beside what
    evaluation generated, here under qwen25_math_cot at 6 tokens and lm_eval_gsm8k with its 5 shots."""
    root, run = tiny_run
    final = read_json(run / "eval_results.json")  # written by the training run itself
    assert final["budgets"] == {"training": {"trainer": "grpo", "max_completion_tokens": 16, "shots": 0},
                                "evaluation": {"protocol": "qwen_boxed", "max_new_tokens": 8, "shots": 0}}
    assert evaluate.main([f"run={run}", "checkpoint=2", "eval.num_examples=2", "eval.protocol=qwen25_math_cot",
                          "eval.max_new_tokens=6"]) == 0
    cot = read_json(run / "evals" / "step_000002-qwen25_math_cot-n2-greedy.json")
    assert cot["budgets"]["evaluation"] == {"protocol": "qwen25_math_cot", "max_new_tokens": 6, "shots": 0}
    assert cot["protocol"]["system_prompt"] == QWEN_INSTRUCTION and cot["protocol"]["user_template"] == "{question}"
    assert cot["protocol"]["decoding"]["max_new_tokens"] == 6 and cot["budgets"]["training"]["max_completion_tokens"] == 16
    assert evaluate.main([f"run={run}", "checkpoint=2", "eval.num_examples=2", "eval.protocol=lm_eval_gsm8k",
                          "eval.max_new_tokens=6"]) == 0
    shots = read_json(run / "evals" / "step_000002-lm_eval_gsm8k-n2-greedy.json")["budgets"]
    assert shots["evaluation"]["shots"] == 5 and shots["training"]["shots"] == 0


@pytest.mark.slow
def test_tiny_run_pass_at_k_with_samples(tiny_run):
    root, run = tiny_run
    assert evaluate.main([f"run={run}", "checkpoint=1", "eval.num_examples=2", "eval.samples=3",
                          "eval.sample_temperature=1.0", "eval.max_new_tokens=6", "eval.protocol=finellama"]) == 0
    doc = read_json(run / "evals" / "step_000001-finellama-n2-k3.json")
    k = doc["pass_at_k"]
    assert (k["samples"], k["temperature"], k["primary"], sorted(k["strict"])) == (3, 1.0, "strict", ["1", "2", "3"])
    assert k["decoding"]["do_sample"] is True and k["decoding"]["num_return_sequences"] == 3
    for rec in doc["records"]:
        assert len(rec["samples"]) == 3
        assert all(0 <= c <= 3 for c in rec["samples_correct"].values())
    expect = sum(pass_at_k(3, r["samples_correct"]["lenient"], 1) for r in doc["records"]) / 2
    assert k["lenient"]["1"] == pytest.approx(expect)


@pytest.mark.slow
def test_checkpoint_all_loads_the_base_once_and_matches_one_at_a_time(tiny_run, monkeypatch):
    """Both checkpoints of the tiny run: one base load, adapters swapped onto it, and the same
    logits and completions as evaluating each checkpoint in a load of its own."""
    import torch

    import finellama_rl.job.model as model

    root, run = tiny_run
    loads, logits = [], {}
    real_load, real_run_target = model.load_base, evaluate.run_target
    monkeypatch.setattr(model, "load_base", lambda *a, **k: loads.append(1) or real_load(*a, **k))

    def spy(cfg, target, m, tokenizer, setup):  # next-token logits of the first prompt, per checkpoint
        enc = tokenizer(setup.prompts[:1], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            logits.setdefault(target.label, []).append(m(**enc).logits[0, -1].float().clone())
        return real_run_target(cfg, target, m, tokenizer, setup)

    monkeypatch.setattr(evaluate, "run_target", spy)
    args = [f"run={run}", "eval.num_examples=2", "eval.max_new_tokens=6", "eval.protocol=lm_eval_gsm8k", "eval.shots=2"]
    assert evaluate.main([*args, "checkpoint=all"]) == 0
    assert len(loads) == 1
    for step in ("1", "2"):
        assert evaluate.main([*args, f"checkpoint={step}"]) == 0
    assert len(loads) == 3
    for name in ("step_000001", "step_000002"):
        together, alone = logits[name]
        assert torch.allclose(together, alone, atol=1e-5), name
        a = read_json(run / "evals" / f"{name}-lm_eval_gsm8k-n2-greedy-2shot.json")
        b = read_json(run / "evals" / f"{name}-lm_eval_gsm8k-n2-greedy-2shot-2.json")
        assert [r["completion"] for r in a["records"]] == [r["completion"] for r in b["records"]], name
        assert a["protocol"]["model"]["adapter"].endswith(name) and a["protocol"]["shots"] == 2
    assert (logits["step_000001"][0] - logits["step_000002"][0]).abs().max() > 1e-3  # the adapters really differ
