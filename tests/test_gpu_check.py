"""benchmarks/gpu_check.py, the GPU acceptance check, proven on CPU: --dry runs the same code
paths (planner cells through the real trainers, the real in-process ladder with simulated
memory caps, finellama_rl GRPO against plain TRL, PPO against GRPO, generation) on tiny
shapes; the budget stops it cleanly; the pieces it is built from are checked one by one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
sys.path.insert(0, str(REPO / "benchmarks"))

from gpu_check_setup import GIB, Clock, peak_tracker  # noqa: E402


def _run(tmp_path: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--dry", "--out", str(tmp_path / "out"),
                           "--work", str(tmp_path / "work"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


@pytest.mark.slow
def test_dry_run_measures_every_section(tmp_path):
    committed = REPO / "benchmarks" / "results" / "gpu_check.json"
    before = committed.stat().st_mtime if committed.exists() else None
    t0 = time.monotonic()
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "device: cpu" in proc.stdout and "versions: python" in proc.stdout and "trl 1.16" in proc.stdout
    r = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert r["meta"]["mode"] == "dry" and r["errors"] == [] and r["stopped"] is None
    assert all(not r[s]["skipped"] for s in ("planner", "ladder", "overhead", "generation"))

    # 1. planner: both trainers ran 2 steps, reported their phases to the tracker; the planner predicted
    cells = {c["algo"]: c for c in r["planner"]["items"]}
    assert set(cells) == {"ppo", "grpo"}
    for algo, c in cells.items():
        assert c["steps"] == [1, 2] and c["micro_batch"] == 2 and (c["prompt"], c["completion"]) == (32, 8)
        assert c["predicted_phase"] in ("training", "generation") and c["predicted_gib"] > 0.7  # 768 MiB context allowance
        assert c["allocated_gib"] is None  # no CUDA allocator on CPU
        assert {"generation", "training"} <= set(c["measured_phases"]), (algo, c["measured_phases"])
    assert "scoring" in cells["ppo"]["measured_phases"] and "optimizer" in cells["grpo"]["measured_phases"]

    # 2. the real in-process ladder: micro batch 4 runs out at 60 tokens, steps down to 1, keeps the batch
    cases = {c["id"]: c for c in r["ladder"]["items"]}
    small, large = cases["sim 60 tokens/no planner"], cases["sim 100 tokens/planner"]
    assert [a["outcome"] for a in small["attempt_rows"]] == ["oom", "oom", "completed"]
    assert [a["micro_batch"] for a in small["attempt_rows"]] == [4, 2, 1]
    assert all(a["micro_batch"] * a["grad_accum"] == 4 for a in small["attempt_rows"])
    assert (small["ooms"], small["simulated_ooms"], small["real_cuda_ooms"]) == (2, 2, 0)
    assert small["final_setting"]["micro_batch"] == 1 and small["every_step_once"] and small["steps"] == [1, 2]
    assert small["exit_code"] == 0 and small["wasted_s"] > 0 and small["start_rung"] == 0
    assert large["start_why"].startswith("planner") and [a["outcome"] for a in large["attempt_rows"]] == ["oom", "completed"]
    assert large["final_setting"]["micro_batch"] == 2 and large["every_step_once"]

    # 3. overhead: the same GRPO through finellama_rl and through TRL alone; PPO at equal tokens per step
    runs = {x["id"]: x for x in r["overhead"]["items"]}
    assert set(runs) == {"finellama_grpo", "plain_trl_grpo", "finellama_ppo"}
    assert len({x["tokens_per_step"] for x in runs.values()}) == 1
    assert all(x["median_s"] > 0 for x in runs.values())
    assert runs["plain_trl_grpo"]["adapter_dtype"] == "bfloat16"  # TRL's cast; finellama_rl keeps fp32
    assert runs["finellama_grpo"]["steps"] == runs["finellama_ppo"]["steps"] == [1, 2]
    ratios = r["overhead"]["ratios"]
    assert ratios["grpo_time_finellama_over_trl"] > 0 and ratios["time_ppo_over_grpo"] > 0
    assert ratios["grpo_memory_finellama_over_trl"] is None  # measured on CUDA only

    # 4. generation throughput of the 4-bit policy
    (g,) = r["generation"]["items"]
    assert g["batch"] == 4 and 0 < g["new_tokens"] <= 4 * 8 and g["tokens_per_s"] > 0

    md = (tmp_path / "out" / "gpu_check.md").read_text()
    for heading in ("## 1. Planner", "## 2. The OOM ladder from tiny ppo, 4 prompts, micro batch 4", "## 3. Overhead",
                    "## 4. Generation"):
        assert heading in md
    assert "| sim 60 tokens | no | 0 | 3 | 2 (0) |" in md
    after = committed.stat().st_mtime if committed.exists() else None
    assert before == after, "--dry must not write the committed results"
    print(f"dry run: {time.monotonic() - t0:.1f} s")


@pytest.mark.slow  # a subprocess that imports everything (about 10 s)
def test_zero_budget_skips_every_piece_and_still_writes(tmp_path):
    proc = _run(tmp_path, "--budget-s", "0", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert r["planner"]["skipped"] == ["tiny/ppo/mb2/seq32+8", "tiny/grpo/mb2/seq32+8"]
    assert r["ladder"]["skipped"] == ["sim 60 tokens/no planner", "sim 100 tokens/planner"]
    assert r["overhead"]["skipped"] == ["finellama_grpo", "plain_trl_grpo", "finellama_ppo"]
    assert r["generation"]["skipped"] == ["tiny/batch4"]
    assert not any(r[s]["items"] for s in ("planner", "ladder", "overhead", "generation"))
    assert "Skipped for lack of time" in (tmp_path / "out" / "gpu_check.md").read_text()
    assert not (tmp_path / "work" / "models").exists()  # nothing was built


def test_alarm_stops_the_piece_in_flight_and_keeps_what_was_measured(tmp_path, monkeypatch):
    import torch

    import gpu_check
    import gpu_check_sections
    import gpu_check_setup

    for var in ("HF_HOME", "FINELLAMA_FIT_MEMORY", "OMP_NUM_THREADS", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
                "TRANSFORMERS_OFFLINE", "TOKENIZERS_PARALLELISM", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.setenv(var, os.environ.get(var, ""))  # restored after the test whatever run() sets

    def slow_section(ws, clock, results, save):
        pieces = gpu_check_sections.Pieces(results, "planner", clock, save)
        pieces.add({"id": "first"}, time.monotonic())
        time.sleep(60)  # a piece that outlives the budget

    monkeypatch.setitem(gpu_check_sections.SECTIONS, "planner", slow_section)
    monkeypatch.setattr(gpu_check_setup, "preflight", lambda: [])  # the imports are the slow dry run's business
    monkeypatch.setattr(gpu_check, "GRACE_S", 1)
    threads = torch.get_num_threads()
    t0 = time.monotonic()
    try:
        code = gpu_check.run(gpu_check.parse_args(["--dry", "--budget-s", "1", "--sections", "planner",
                                                   "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")]))
    finally:
        torch.set_num_threads(threads)
    assert code == 0 and time.monotonic() - t0 < 50
    r = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert r["stopped"].startswith("budget 1 s + 1 s grace spent during 'planner'")
    assert [i["id"] for i in r["planner"]["items"]] == ["first"]


def test_merge_keeps_earlier_pieces(tmp_path, monkeypatch):
    import gpu_check_sections

    earlier = {"planner": {"items": [{"id": "a", "wall_s": 1.0}], "skipped": []}}
    clock = Clock(100, {"planner": 1.0})
    pieces = gpu_check_sections.Pieces(earlier, "planner", clock, lambda: None)
    assert not pieces.want("a") and pieces.want("b")
    clock.begin("planner", ["planner"])
    pieces.last = 1000.0  # the next piece would end after the section's deadline
    assert not pieces.want("c") and earlier["planner"]["skipped"] == ["c"]


def test_a_failing_piece_is_recorded_and_the_section_goes_on():
    import gpu_check_sections
    from gpu_check import render_markdown

    results = {}
    pieces = gpu_check_sections.Pieces(results, "ladder", Clock(100, {"ladder": 1.0}), lambda: None)

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    pieces.attempt("40 GB/no planner", broken)
    pieces.attempt("40 GB/planner", lambda: {"cap": "40 GB"})
    assert [i["id"] for i in results["ladder"]["items"]] == ["40 GB/planner"]
    assert results["errors"] == [{"section": "ladder", "piece": "40 GB/no planner",
                                  "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}]
    assert "ERROR in ladder / 40 GB/no planner: RuntimeError" in render_markdown({"meta": {}, **results})


def test_clock_gives_each_section_its_share_of_what_is_left():
    now = [0.0]
    clock = Clock(100, {"a": 0.5, "b": 0.25, "c": 0.25}, now=lambda: now[0])
    assert clock.begin("a", ["a", "b", "c"]) == pytest.approx(50)
    now[0] = 20.0  # a finished early: b gets its share of the 80 s left among b and c
    assert clock.begin("b", ["b", "c"]) == pytest.approx(40)
    assert clock.allows(39) and not clock.allows(41)
    now[0] = 120.0
    assert clock.begin("c", ["c"]) == 0 and not clock.allows(0)


def test_summarize_attempts_counts_real_ooms_and_time_before_the_fitting_rung():
    from gpu_check_sections import summarize_attempts

    attempts = [
        {"rung": 0, "micro_batch": 64, "grad_accum": 1, "outcome": "oom", "steps_done": 0, "wall_time_s": 20.0,
         "error": "OutOfMemoryError: CUDA out of memory. Tried to allocate 9.27 GiB"},
        {"rung": 1, "micro_batch": 32, "grad_accum": 2, "outcome": "oom", "steps_done": 0, "wall_time_s": 15.5,
         "error": "OutOfMemoryError: simulated out of memory: a forward of (32, 512)"},
        {"rung": 2, "micro_batch": 16, "grad_accum": 4, "outcome": "oom", "steps_done": 1, "wall_time_s": 30.0,
         "error": "OutOfMemoryError: CUDA out of memory."},
        {"rung": 3, "micro_batch": 8, "grad_accum": 8, "outcome": "completed", "steps_done": 1, "wall_time_s": 40.0},
    ]
    s = summarize_attempts(attempts, [1, 2], 2, discarded=False)
    assert (s["attempts"], s["ooms"], s["real_cuda_ooms"], s["simulated_ooms"]) == (4, 3, 2, 1)
    assert s["wasted_s"] == 35.5  # rung 2 trained a step before it ran out: not wasted
    assert s["final_rung"] == 3 and s["final_setting"]["micro_batch"] == 8 and s["every_step_once"]
    assert not summarize_attempts(attempts, [1, 2, 2], 2, discarded=False)["every_step_once"]
    assert not summarize_attempts(attempts, [1, 2], 2, discarded=True)["every_step_once"]


def test_peak_tracker_attributes_cuda_peaks_to_phases(monkeypatch):
    import torch

    state = {"peak": 0}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: state["peak"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: state["peak"] + GIB)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: state.update(peak=0))

    def use(gib):
        state["peak"] = max(state["peak"], gib * GIB)

    tracker = peak_tracker()
    use(2)
    with tracker.phase("generation"):
        use(5)
    with tracker.phase("training"):
        use(9)
        with tracker.phase("scoring"):  # a child phase: its window is its own
            use(3)
        use(4)
    tracker.current = "optimizer"  # how GRPO's callbacks report the optimizer step
    use(6)
    tracker.current = "other"
    s = tracker.summary()
    got = {k: (v["allocated_gib"], v["windows"]) for k, v in s["phases"].items()}
    assert got == {"other": (2, 4), "generation": (5, 1), "training": (9, 2), "scoring": (3, 1), "optimizer": (6, 1)}
    assert (s["allocated_gib"], s["reserved_gib"]) == (9, 10)


def test_markdown_shows_the_ratio_of_every_cell():
    from gpu_check import render_markdown

    cell = {"model": "qwen2.5-3b", "algo": "ppo", "micro_batch": 8, "grad_accum": 1, "prompt": 384, "completion": 128,
            "predicted_gib": 20.5, "predicted_phase": "training", "allocated_gib": 18.25, "reserved_gib": 19.0,
            "outside_allocator_gib": 0.52, "ratio_vs_reserved": 1.05, "ratio_vs_allocated": 1.071, "within_10pct": True}
    md = render_markdown({"meta": {"mode": "gpu", "versions": {"device": "NVIDIA H200"}}, "planner": {"items": [cell]}})
    assert "# GPU check (gpu): NVIDIA H200" in md
    assert "| qwen2.5-3b | ppo | 8x1 | 384+128 | 20.5 | training | 18.2 | 19 | 0.52 | 1.05 | 1.07 | True |" in md


def _fake_wheel(folder: Path, name: str, version: str, requires) -> None:
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as z:
        meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)


def test_wheel_check_finds_missing_requirements_and_duplicates(tmp_path, monkeypatch, capsys):
    import gpu_wheels

    monkeypatch.setattr(gpu_wheels, "CARRIED", ("alpha", "beta"))
    _fake_wheel(tmp_path, "alpha", "1.0", ["beta>=2", "numpy>=1.17", "torch>=2.12", "win-only; sys_platform == 'win32'"])
    _fake_wheel(tmp_path, "beta", "2.1", ["nowhere-pkg", "dev-only; extra == 'dev'"])
    assert gpu_wheels.check(tmp_path) == 1
    out = capsys.readouterr().out
    assert "needs nowhere-pkg, neither carried nor on the device" in out
    assert "needs torch>=2.12, has 2.11.0" in out  # the GPU machine's torch
    assert "win-only" not in out and "dev-only" not in out and "numpy" not in out and "beta>=2" not in out
    _fake_wheel(tmp_path, "beta", "2.2", [])
    assert gpu_wheels.check(tmp_path) == 1 and "two wheels of beta" in capsys.readouterr().out
