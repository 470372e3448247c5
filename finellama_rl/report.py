"""Compare the runs of a sweep: a table with intervals and paired tests, arms of runs that differ
only by seed (mean across seeds with a bootstrap interval, arms compared), training signals beside
accuracy with a reward-hacking flag, plots, report.md and report.html (finellama_rl/eval/sweep_report.py
builds them).

    python -m finellama_rl.report results/<sweep> [--out DIR]
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import List

from finellama_rl.errors import UsageError
from finellama_rl.eval.sweep_report import markdown_table, write_report
from finellama_rl.results import iter_run_dirs

def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m finellama_rl.report", description="Compare the runs of a sweep.")
    parser.add_argument("sweep", help="the sweep folder, e.g. results/<sweep>")
    parser.add_argument("--out", help="output folder (default: the sweep folder)")
    args = parser.parse_args(argv)  # bad usage: argparse prints one line and exits 2
    sweep = Path(args.sweep)
    if not sweep.is_dir():
        raise UsageError(f"sweep: {sweep} is not a folder; pass results/<sweep>")
    if not any(iter_run_dirs(sweep)):
        raise UsageError(f"sweep: no run folders (with config.yaml) in {sweep}; pass results/<sweep>, not a run or results/")
    report = write_report(sweep, Path(args.out) if args.out else None)
    print(report.table)
    for section in report.sections:
        if section.rows:
            print(f"\n{section.title}:\n{markdown_table(section.headers, section.rows)}")
    print(f"\nreport: {report.markdown}\n        {report.html}", flush=True)
    return 0


if __name__ == "__main__":
    from finellama_rl.compose import cli_main

    cli_main(main)
