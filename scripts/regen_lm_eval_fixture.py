"""Regenerate tests/fixtures/gsm8k_completions_lm_eval.json with lm-evaluation-harness's
OWN code: its gsm8k task (tasks/gsm8k/gsm8k.yaml), its few-shot sampler, its
stop-sequence post-processing, its filters (strict-match, flexible-extract) and its
exact_match metric, run on every completion of tests/fixtures/gsm8k_completions.jsonl.
finellama_rl's reimplementation (finellama_rl/task/lm_eval.py, the lm_eval_gsm8k
protocol's prompts) must reproduce this file exactly (tests/test_scoring.py).

Not run in CI, and lm-eval is NOT a project dependency (it pulls many packages). Run
it in a separate virtual environment:

    python3 -m venv /tmp/lmeval-venv
    /tmp/lmeval-venv/bin/pip install "lm-eval==0.4.13"
    /tmp/lmeval-venv/bin/python scripts/regen_lm_eval_fixture.py

The task is built offline: `datasets.load_dataset` is replaced by one that returns the
fixture (each completion's problem is a test doc, in file order) and
tests/fixtures/lm_eval_train_docs.json (the few-shot pool). Everything else is the
harness as installed: `task.build_all_requests` makes the 5-shot contexts with the
evaluator's few-shot seed, each completion is cut like the HF backend cuts a
generation (`postprocess_generated_text` with the task's `until` plus the eos text of a
Qwen2.5-Instruct tokenizer, `<|im_end|>`), then `task.apply_filters()` and
`task.process_results()` score it.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "gsm8k_completions.jsonl"
TRAIN_DOCS = ROOT / "tests" / "fixtures" / "lm_eval_train_docs.json"
OUT = ROOT / "tests" / "fixtures" / "gsm8k_completions_lm_eval.json"
EOS_TEXT = "<|im_end|>"  # lm-eval appends the tokenizer's eos text to `until`; Qwen2.5-Instruct's


def offline_datasets(test_docs, train_docs):
    """Make the harness's dataset download return our docs."""
    import datasets

    def load_dataset(*args, **kwargs):
        return datasets.DatasetDict({"train": datasets.Dataset.from_list(train_docs),
                                     "test": datasets.Dataset.from_list(test_docs)})

    datasets.load_dataset = load_dataset
    import lm_eval.api.task as task_module

    if hasattr(task_module, "datasets"):
        task_module.datasets.load_dataset = load_dataset


def main() -> int:
    from importlib.metadata import version

    cases = [json.loads(line) for line in FIXTURE.read_text().splitlines() if line.strip()]
    train = json.loads(TRAIN_DOCS.read_text())["train"]
    test_docs = [{"question": c["question"], "answer": c["reference"]} for c in cases]
    offline_datasets(test_docs, train)

    from lm_eval.api.instance import Instance  # noqa: F401 - the harness's own classes below
    from lm_eval.defaults import DEFAULT_OTHER_SEED
    from lm_eval.models.utils import handle_stop_sequences, postprocess_generated_text
    from lm_eval.tasks import TaskManager, get_task_dict

    task = get_task_dict(["gsm8k"], TaskManager())["gsm8k"]
    task.set_fewshot_seed(seed=DEFAULT_OTHER_SEED)  # what lm_eval.simple_evaluate does by default
    task.build_all_requests(limit=None, rank=0, world_size=1)
    instances = sorted(task.instances, key=lambda inst: inst.doc_id)
    assert len(instances) == len(cases), (len(instances), len(cases))
    until = handle_stop_sequences(list(instances[0].arguments[1]["until"]), eos=EOS_TEXT)
    for inst, case in zip(instances, cases):
        inst.resps = [postprocess_generated_text(case["completion"], until, None)]
    task.apply_filters()

    results = []
    for inst, case in zip(instances, cases):
        row = {"id": case["id"], "cut": inst.resps[0]}
        for name in ("strict-match", "flexible-extract"):
            filtered = inst.filtered_resps[name]
            row[name] = {"filtered": filtered,
                         "exact_match": task.process_results(inst.doc, [filtered])["exact_match"]}
        results.append(row)
    doc = {
        "what": "lm-evaluation-harness verdicts on tests/fixtures/gsm8k_completions.jsonl, produced by the harness's own code",
        "lm_eval_version": version("lm_eval"), "task_version": task.VERSION if hasattr(task, "VERSION") else None,
        "command": "/tmp/lmeval-venv/bin/python scripts/regen_lm_eval_fixture.py  (venv: pip install lm-eval==0.4.13)",
        "until": until, "fewshot_seed": DEFAULT_OTHER_SEED, "num_fewshot": task.config.num_fewshot,
        "generation_kwargs": instances[0].arguments[1],
        "contexts": [inst.arguments[0] for inst in instances],
        "results": results,
    }
    OUT.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    strict = sum(r["strict-match"]["exact_match"] for r in results)
    flexible = sum(r["flexible-extract"]["exact_match"] for r in results)
    print(f"{len(results)} completions: strict-match {strict:.0f}, flexible-extract {flexible:.0f} correct -> {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
