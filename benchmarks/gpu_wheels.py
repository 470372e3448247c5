"""The wheels that travel to the GPU machine with benchmarks/gpu_check.py (it has no network).

The GPU machine has Python 3.12, torch 2.11 (CUDA 13), transformers 5.17, peft, accelerate,
safetensors, tokenizers, numpy, pyarrow, pandas, ... (docs: ../shared/FACTS.md), but not
trl, bitsandbytes, hydra-core, omegaconf, antlr4, submitit, datasets (dill, multiprocess)
or math-verify. Those travel as wheels, at the versions this checkout tests with (read from
the local environment), and so do transformers and peft, so that the GPU runs the code CI
tests (transformers 5.23, not the machine's 5.17). Everything must fit the 64 MiB a device
call carries, together with the working tree.

    .venv/bin/python benchmarks/gpu_wheels.py download            # here, with PyPI: fills .whl/
    .venv/bin/python benchmarks/gpu_wheels.py check [--python python3.12]
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parents[1]
CARRIED = ("trl", "bitsandbytes", "transformers", "peft", "hydra-core", "omegaconf", "antlr4-python3-runtime",
           "submitit", "datasets", "dill", "multiprocess", "math-verify", "latex2sympy2_extended")
SDIST_ONLY = ("antlr4-python3-runtime",)  # 4.9.3 (hydra's pin) has no wheel: built here (pure Python)
# Requirements of the carried wheels that the GPU machine's image has (its package list), with
# the versions that list gives where it gives one.
ON_DEVICE: Dict[str, str] = {
    "torch": "2.11.0", "numpy": "2.5.2", "huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "safetensors": "0.8.0",
    "accelerate": "1.15.0", "packaging": "", "pyyaml": "", "regex": "", "typer": "", "tqdm": "", "pandas": "",
    "psutil": "", "pyarrow": "", "jinja2": "", "filelock": "", "xxhash": "", "fsspec": "", "sympy": "",
    "cloudpickle": "", "typing-extensions": "", "requests": "", "httpx": "", "aiohttp": "", "matplotlib": ""}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64")
LIMIT_MIB = 64


def norm(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def pins() -> List[str]:
    return [f"{name}=={md.version(name)}" for name in CARRIED]


def download(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    binary = [p for p in pins() if p.split("==")[0] not in SDIST_ONLY]
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version", "3.12",
           "--implementation", "cp", *platforms, "--platform", "any", "-d", str(folder), *binary]
    wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(folder),
             *[p for p in pins() if p.split("==")[0] in SDIST_ONLY]]
    for c in (cmd, wheel):
        print("+ " + " ".join(c), flush=True)
        if subprocess.call(c):
            return 1
    return 0


def requirements(wheel: Path) -> List[str]:
    """Requires-Dist lines of a wheel that apply on the GPU machine (Python 3.12, Linux x86-64, no extras)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "platform_system": "Linux",
           "platform_machine": "x86_64", "implementation_name": "cpython", "extra": ""}
    out = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                out.append(str(req))
    return out


def check(folder: Path, python: str = "") -> int:
    """Size, one version per package, every requirement carried or on the device (with a
    known-compatible version where the device's is known); with `python` (a 3.12
    interpreter), the device's own install command against the folder."""
    from packaging.requirements import Requirement

    wheels = sorted(folder.glob("*.whl"))
    problems = []
    names = [norm(w.name.split("-")[0]) for w in wheels]
    problems += [f"two wheels of {n}" for n in sorted({n for n in names if names.count(n) > 1})]
    problems += [f"missing wheel: {n}" for n in sorted({norm(c) for c in CARRIED} - set(names))]
    carried = dict(zip(names, (w.name.split("-")[1] for w in wheels)))
    for w in wheels:
        for line in requirements(w):
            req = Requirement(line)
            name = norm(req.name)
            version = carried.get(name, ON_DEVICE.get(name))
            if version is None:
                problems.append(f"{w.name}: needs {line}, neither carried nor on the device")
            elif version and req.specifier and not req.specifier.contains(version, prereleases=True):
                problems.append(f"{w.name}: needs {line}, has {version}")
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True).stdout.split(b"\0")
    tree = sum((REPO / f.decode()).stat().st_size for f in tracked if f and (REPO / f.decode()).is_file())
    size = sum(w.stat().st_size for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB; tracked files {tree / 2**20:.1f} MiB; "
          f"limit {LIMIT_MIB} MiB (untracked files that git does not ignore travel too)")
    if size + tree > LIMIT_MIB * 2**20:
        problems.append(f"wheels + tree = {(size + tree) / 2**20:.1f} MiB > {LIMIT_MIB} MiB")
    if python:
        with tempfile.TemporaryDirectory() as target:
            cmd = [python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
                   "--target", target, *map(str, wheels)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            print(f"{python} -m pip install --no-index --no-deps --target ...: exit {proc.returncode}")
            if proc.returncode:
                problems.append("install failed: " + proc.stderr.strip()[-500:])
    for p in problems:
        print("PROBLEM: " + p)
    print("ok" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("action", choices=("download", "check", "pins"))
    ap.add_argument("--folder", type=Path, default=REPO / ".whl")
    ap.add_argument("--python", default="", help="a Python 3.12 to try the device's install command with")
    args = ap.parse_args(argv)
    if args.action == "pins":
        print("\n".join(pins()))
        return 0
    return download(args.folder) if args.action == "download" else check(args.folder, args.python)


if __name__ == "__main__":
    sys.exit(main())
