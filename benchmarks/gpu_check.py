"""GPU acceptance check (issue 14), one command: planner against measured CUDA memory, the
real OOM ladder on a capped card, finellama_rl's overhead against plain TRL and PPO against
GRPO, and 4-bit generation throughput, on random-init models of the real Qwen2.5-0.5B, 1.5B
and 3B shapes (no download). Writes gpu_check.json and gpu_check.md into --out after every
measurement, so a run stopped by its budget (or killed) keeps what it has.

    bash benchmarks/gpu_check.sh                      # on the GPU machine: wheels, then this
    python benchmarks/gpu_check.py                    # one CUDA GPU, budget 480 s
    python benchmarks/gpu_check.py --dry              # CPU, tiny shapes, same code paths (CI)
    python benchmarks/gpu_check.py --sections ladder --merge benchmarks/results/gpu_check.json

The sizes of each mode are in gpu_check_setup.py (GPU, DRY); the measurements in
gpu_check_sections.py; the plain-TRL script in gpu_check_trl.py. README "GPU acceptance
check" says how to carry the wheels the GPU machine lacks.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_check_* beside this file
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # finellama_rl from this checkout

from gpu_check_setup import DRY, GPU, REPO, BudgetExceeded, Clock, Workspace, offline_environment  # noqa: E402

SECTION_ORDER = ("planner", "ladder", "overhead", "generation")
GRACE_S = 45  # past the budget, the alarm interrupts the piece in flight


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry", action="store_true", help="CPU, tiny shapes, simulated memory caps (CI)")
    ap.add_argument("--budget-s", type=float, default=None, help="stop starting new pieces after this (default 480; dry 300)")
    ap.add_argument("--out", type=Path, default=None,
                    help="folder for gpu_check.json/.md (default benchmarks/results; dry: a temp folder)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for model folders and runs (default: temp)")
    ap.add_argument("--sections", default=",".join(SECTION_ORDER), help="comma list of " + "|".join(SECTION_ORDER))
    ap.add_argument("--merge", type=Path, default=None, help="an earlier gpu_check.json: keep its pieces, run the rest")
    args = ap.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = sorted(set(args.sections) - set(SECTION_ORDER))
    if unknown:
        ap.error(f"unknown section(s) {unknown}: expected some of {','.join(SECTION_ORDER)}")
    return args


# ------------------------------------------------------------------------------ report


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _pair(record: Dict[str, Any], a: str, b: str, sep: str) -> str:
    return f"{_fmt(record.get(a))}{sep}{_fmt(record.get(b))}"


def _table(headers: List[str], rows: List[List[Any]]) -> List[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]


def render_markdown(results: Dict[str, Any]) -> str:
    m = results.get("meta", {})
    v = m.get("versions", {})
    lines = [f"# GPU check ({m.get('mode', '?')}): {v.get('device', '?')}", "",
             f"{m.get('started', '')}; torch {v.get('torch')} (CUDA {v.get('cuda')}), transformers {v.get('transformers')}, "
             f"trl {v.get('trl')}, peft {v.get('peft')}, bitsandbytes {v.get('bitsandbytes')}; budget {m.get('budget_s')} s, "
             f"ran {m.get('elapsed_s')} s{'; STOPPED: ' + results['stopped'] if results.get('stopped') else ''}.", ""]
    planner = results.get("planner", {}).get("items", [])
    if planner:
        lines += ["## 1. Planner against measurement (GiB; ratio = predicted / measured)", ""]
        lines += _table(["model", "algo", "micro", "seq", "predicted", "phase", "allocated", "reserved", "outside",
                         "pred/(reserved+outside)", "pred-overhead/allocated", "within 10%"],
                        [[c.get("model"), c.get("algo"), _pair(c, "micro_batch", "grad_accum", "x"),
                          _pair(c, "prompt", "completion", "+"), c.get("predicted_gib"), c.get("predicted_phase"),
                          c.get("allocated_gib"), c.get("reserved_gib"), c.get("outside_allocator_gib"),
                          c.get("ratio_vs_reserved"), c.get("ratio_vs_allocated"), c.get("within_10pct")] for c in planner])
        lines.append("")
    ladder = results.get("ladder", {}).get("items", [])
    if ladder:
        lines += [f"## 2. The OOM ladder from {ladder[0].get('start', '?')}", ""]
        lines += _table(["cap", "planner", "start rung", "attempts", "OOMs (real CUDA)", "s before fitting rung",
                         "final rung", "final micro x accum", "every step once", "exit"],
                        [[c.get("cap"), "yes" if c.get("planner") else "no", c.get("start_rung"), c.get("attempts"),
                          f"{_fmt(c.get('ooms'))} ({_fmt(c.get('real_cuda_ooms'))})", c.get("wasted_s"), c.get("final_rung"),
                          _pair(c.get("final_setting") or {}, "micro_batch", "grad_accum", "x"),
                          c.get("every_step_once"), c.get("exit_code")] for c in ladder])
        lines.append("")
    overhead = results.get("overhead", {})
    if overhead.get("items"):
        lines += ["## 3. Overhead (median s/step after step 1; peak allocated GiB)", ""]
        lines += _table(["run", "model", "sequences/step", "tokens/step", "s/step", "peak GiB"],
                        [[r.get("id"), r.get("model"), r.get("sequences_per_step"), r.get("tokens_per_step"),
                          r.get("median_s"), r.get("allocated_gib")] for r in overhead["items"]])
        lines += [""] + [f"- {k}: {_fmt(x)}" for k, x in overhead.get("ratios", {}).items()] + [""]
    gen = results.get("generation", {}).get("items", [])
    if gen:
        lines += ["## 4. Generation throughput of the 4-bit policy", ""]
        lines += _table(["model", "batch", "prompt", "new tokens", "s", "tokens/s", "peak GiB"],
                        [[g.get("model"), g.get("batch"), g.get("prompt"), g.get("new_tokens"), g.get("seconds"),
                          g.get("tokens_per_s"), g.get("allocated_gib")] for g in gen])
        lines.append("")
    skipped = {k: results[k]["skipped"] for k in SECTION_ORDER if results.get(k, {}).get("skipped")}
    if skipped:
        lines += ["Skipped for lack of time: " + "; ".join(f"{k}: {', '.join(v)}" for k, v in skipped.items()), ""]
    for err in results.get("errors", []):
        lines.append(f"ERROR in {err['section']}{' / ' + err['piece'] if err.get('piece') else ''}: {err['error']}")
    return "\n".join(lines).rstrip() + "\n"


def write_results(results: Dict[str, Any], out: Path, clock: Clock) -> None:
    results["meta"]["elapsed_s"] = round(clock.elapsed(), 1)
    out.mkdir(parents=True, exist_ok=True)
    for name, text in (("gpu_check.json", json.dumps(results, indent=1, sort_keys=False) + "\n"),
                       ("gpu_check.md", render_markdown(results))):
        tmp = out / (name + ".tmp")
        tmp.write_text(text)
        tmp.replace(out / name)


# ------------------------------------------------------------------------------ main


def _alarm(_signum, _frame):
    raise BudgetExceeded()


def run(args: argparse.Namespace) -> int:
    profile = DRY if args.dry else GPU
    budget = args.budget_s if args.budget_s is not None else (300.0 if args.dry else 480.0)
    clock = Clock(budget, profile.shares)
    out = args.out or (Path(tempfile.mkdtemp(prefix="gpu_check-out-")) if args.dry else REPO / "benchmarks" / "results")
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-work-"))
    offline_environment(work)
    if args.dry:  # spin-waiting OpenMP threads make a shared CPU 3-5x slower (docs/LOG.md)
        os.environ["OMP_NUM_THREADS"] = "1"

    import torch  # after the environment: transformers/datasets read it at import

    if args.dry:
        torch.set_num_threads(1)
    import transformers

    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars would fill the log

    from gpu_check_sections import SECTIONS
    from gpu_check_setup import preflight, versions

    if not args.dry and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry on a machine without a GPU", file=sys.stderr)
        return 2
    results: Dict[str, Any] = json.loads(args.merge.read_text()) if args.merge else {}
    for section in SECTION_ORDER:  # an earlier run's pieces stay; its skips are this run's to decide
        results.get(section, {}).pop("skipped", None)
    results["meta"] = {"mode": profile.name, "started": _dt.datetime.now().isoformat(timespec="seconds"),
                       "budget_s": budget, "versions": versions(), "sections": args.sections, "out": str(out)}
    results["errors"], results["stopped"] = [], None
    v = results["meta"]["versions"]
    print(f"device: {v['device']}", flush=True)
    print("versions: " + ", ".join(f"{k} {x}" for k, x in v.items() if k != "device"), flush=True)
    failures = preflight()
    if failures:
        print("error: cannot import what the check needs (carry the wheels: README 'GPU acceptance check'):\n  "
              + "\n  ".join(failures), file=sys.stderr)
        return 2
    ws = Workspace(profile, work)

    def save() -> None:
        results["meta"]["model_build_s"] = ws.build_seconds
        write_results(results, out, clock)

    previous_handler = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(max(1, int(clock.left() + GRACE_S)))  # from the clock's start, like the budget
    try:
        for i, name in enumerate(args.sections):
            share = clock.begin(name, args.sections[i:])
            print(f"== {name}: {share:.0f} s of {clock.left():.0f} s left", flush=True)
            try:
                SECTIONS[name](ws, clock, results, save)
            except Exception as exc:  # noqa: BLE001 - one section's failure must not lose the others
                traceback.print_exc()
                results["errors"].append({"section": name, "error": f"{type(exc).__name__}: {str(exc)[:500]}"})
            save()
    except BudgetExceeded:
        results["stopped"] = f"budget {budget:.0f} s + {GRACE_S} s grace spent during '{name}'"
        print(results["stopped"], flush=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous_handler)
    save()
    print(render_markdown(results), flush=True)
    print(f"results: {out / 'gpu_check.json'} and {out / 'gpu_check.md'}", flush=True)
    return 1 if results["errors"] else 0


def main(argv: Optional[List[str]] = None) -> int:
    started = time.monotonic()
    code = run(parse_args(argv))
    print(f"gpu_check finished in {time.monotonic() - started:.1f} s (exit {code})", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
