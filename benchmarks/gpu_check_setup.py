"""What benchmarks/gpu_check.py measures with: the two profiles (real Qwen2.5 shapes on a
CUDA GPU, tiny shapes on CPU for --dry), random-init model folders, prompts of an exact
token length, composed configs, a phase tracker that records peak CUDA memory per phase,
and the time budget. No model or tokenizer is downloaded: the model folders are built
here (random weights of the real shape, bf16 on a GPU) with the project's tiny BPE
tokenizer, whose few hundred tokens are a subset of the model's vocabulary (decoding
skips the sampled ids it does not know; every id is still a real row of the embedding
and of the logits).

Imports of torch and the project happen inside functions: `gpu_check.py --help` and
the pure helpers (Clock, Profile) stay cheap.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

REPO = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
SYSTEM_PROMPT = "Solve."  # data.system_prompt under eval.protocol=finellama: a short, fixed prompt overhead


@dataclass(frozen=True)
class LadderCap:
    label: str  # "40 GB" (GPU) or "sim 60 tokens" (dry)
    plan_hardware: str  # conf/hardware profile the planner plans for (a100_40, a100_80)
    gib: float = 0.0  # GPU: the card is capped at this many GiB (set_per_process_memory_fraction)
    oom_above_tokens: Optional[int] = None  # dry: simulated budget (debug.oom_above_tokens)


@dataclass(frozen=True)
class Profile:
    """Every size the check uses; GPU and dry mode run the same code with these."""

    name: str  # "gpu" | "dry"
    hardware: str  # conf/hardware option of sections 1, 3, 4
    models: Tuple[str, ...]  # conf/model options, largest first
    model_overrides: Tuple[str, ...] = ()
    # 1. planner against measurement: micro batches x (prompt, completion) per model and algorithm
    planner_micro_batches: Tuple[int, ...] = (2, 8)
    planner_lengths: Tuple[Tuple[int, int], ...] = ((192, 64), (448, 64))  # sequences 256 and 512; short sampling
    planner_steps: int = 2  # step 2 runs with the optimizer state allocated
    planner_grpo: Tuple[int, int] = (1, 8)  # (prompts_per_step, num_generations)
    planner_ppo_prompts: int = 8
    # 2. the real OOM ladder: the seed's too-large start
    ladder_model: str = "qwen2.5-3b"
    ladder_start: Tuple[int, int, int, int] = (64, 64, 256, 256)  # prompts, micro batch, prompt, completion
    ladder_steps: int = 2
    ladder_caps: Tuple[LadderCap, ...] = ()
    ladder_cases: Tuple[Tuple[int, bool], ...] = ((0, False), (0, True), (1, True), (1, False))  # (cap, planner)
    # 3. overhead: GRPO preset batch on the smallest model; PPO at the same sequences per step
    overhead_model: str = "qwen2.5-0.5b"
    overhead_grpo: Tuple[int, int, int] = (8, 8, 8)  # prompts, generations, micro batch (the grpo preset)
    overhead_lengths: Tuple[int, int] = (256, 128)
    overhead_steps: int = 3  # step 1 is warm-up; the median of the others is reported
    # 4. generation throughput at the presets' rollout sizes (ppo preset 32, grpo preset and seed 64)
    generation_models: Tuple[str, ...] = ("qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-3b")
    generation_batches: Tuple[int, ...] = (32, 64)
    generation_lengths: Tuple[int, int] = (256, 128)
    # budget shares of the sections (of the time left when a section starts)
    shares: Dict[str, float] = field(default_factory=lambda: {"planner": 0.40, "ladder": 0.35, "overhead": 0.17,
                                                              "generation": 0.08})


GPU = Profile(
    name="gpu", hardware="h200", models=("qwen2.5-3b", "qwen2.5-1.5b", "qwen2.5-0.5b"),
    ladder_caps=(LadderCap("40 GB", "a100_40", gib=40), LadderCap("80 GB", "a100_80", gib=80)),
)
# Tiny shapes: conf/model/tiny.yaml with a vocabulary larger than the tokenizer's (as in the
# real runs); one cell per grid where the GPU has several (same code, seconds on CPU). The
# simulated budgets make micro batch 4 run out of memory in training (4 x 40 tokens) and let
# micro batch 1 (60 tokens) or 2 (100 tokens) fit.
DRY = Profile(
    name="dry", hardware="cpu", models=("tiny",), model_overrides=("model.vocab_size=1024",),
    planner_micro_batches=(2,), planner_lengths=((32, 8),), planner_grpo=(1, 2), planner_ppo_prompts=2,
    ladder_model="tiny", ladder_start=(4, 4, 32, 8),
    ladder_caps=(LadderCap("sim 60 tokens", "a100_40", oom_above_tokens=60),
                 LadderCap("sim 100 tokens", "a100_80", oom_above_tokens=100)),
    ladder_cases=((0, False), (1, True)),
    overhead_model="tiny", overhead_grpo=(2, 2, 4), overhead_lengths=(32, 8), overhead_steps=2,
    generation_models=("tiny",), generation_batches=(4,), generation_lengths=(32, 8),
)


# ------------------------------------------------------------------------------ time budget


class BudgetExceeded(BaseException):
    """Raised by the alarm when the whole budget (plus grace) is spent; BaseException so that
    the project's `except Exception` handlers (e.g. the ladder's) let it through."""


class Clock:
    """The run's deadline and each section's share of what is left when it starts."""

    def __init__(self, budget_s: float, shares: Dict[str, float], now=time.monotonic):
        self.now = now
        self.start = now()
        self.deadline = self.start + budget_s
        self.shares = dict(shares)
        self.section_deadline = self.deadline

    def left(self) -> float:
        return self.deadline - self.now()

    def begin(self, section: str, remaining_sections: Sequence[str]) -> float:
        """Start `section`; its deadline is its share of the time left among the sections still to run."""
        total = sum(self.shares[s] for s in remaining_sections) or 1.0
        self.section_deadline = min(self.deadline, self.now() + max(0.0, self.left()) * self.shares[section] / total)
        return max(0.0, self.section_deadline - self.now())

    def allows(self, expected_s: float) -> bool:
        """True when a piece expected to take `expected_s` ends before the section's deadline."""
        return self.now() + expected_s <= self.section_deadline

    def elapsed(self) -> float:
        return self.now() - self.start


# ------------------------------------------------------------------------------ environment


def offline_environment(work: Path) -> None:
    """Before transformers/datasets are imported: no network, caches and fit memory in `work`."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[var] = "1"
    os.environ.setdefault("HF_HOME", str(work / "hf_home"))
    os.environ["FINELLAMA_FIT_MEMORY"] = str(work / "fit_memory.json")  # never the user's
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "")


def versions() -> Dict[str, Any]:
    import importlib.metadata as md
    import platform

    import torch

    out: Dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets", "hydra-core", "tokenizers",
                 "huggingface-hub", "pyarrow", "regex", "fsspec", "numpy"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out["device"] = torch.cuda.get_device_name(0)
        out["device_memory_gib"] = round(p.total_memory / GIB, 2)
        out["capability"] = f"{p.major}.{p.minor}"
    else:
        out["device"] = f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return out


PREFLIGHT = ("bitsandbytes", "peft", "trl", "datasets", "hydra", "omegaconf", "math_verify",
             "finellama_rl.train", "finellama_rl.trainers.grpo", "finellama_rl.trainers.ppo")


def preflight() -> List[str]:
    """Import what the check needs before any work: a missing or incompatible package costs
    seconds of device time, not minutes. Returns the failures."""
    import importlib

    failures = []
    for name in PREFLIGHT:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every failing import
            failures.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    return failures


def free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def outside_allocator_bytes() -> Optional[int]:
    """Device memory in use that PyTorch's allocator does not hold (CUDA context, cuBLAS/NCCL
    handles, kernels): what the planner's context allowance stands for. None on CPU."""
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    return total - free - torch.cuda.memory_reserved()


# ------------------------------------------------------------------------------ models and data


def compose(profile: Profile, model: str, overrides: Sequence[str], hardware: Optional[str] = None,
            resolve_paths: bool = True):
    """A resolved, validated Config through the project's own composition (load_config)."""
    from finellama_rl.compose import load_config

    return load_config([f"model={model}", *profile.model_overrides, f"hardware={hardware or profile.hardware}",
                        "model.tiny=false", "model.attn_implementation=sdpa", *overrides], resolve_paths=resolve_paths)


def build_model_folder(m, folder: Path, tok) -> float:
    """A random-init Qwen2 model of `m`'s exact shape (bf16 on a GPU, fp32 on CPU) and the tiny
    tokenizer `tok`, saved like a downloaded checkpoint. Returns the seconds it took (0 if it existed)."""
    if (folder / "config.json").exists():
        return 0.0
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    t0 = time.perf_counter()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    config = Qwen2Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_kv_heads,
        intermediate_size=m.intermediate_size, max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_embeddings, eos_token_id=eos, pad_token_id=eos, bos_token_id=None)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    del model
    free_cuda()
    os.replace(tmp, folder)
    return time.perf_counter() - t0


def write_problems(tokenizer, cfg, folder: Path, prompt_tokens: int, n: int, seed: int = 0) -> Path:
    """train.jsonl / test.jsonl whose prompts, under cfg's protocol, are exactly `prompt_tokens`
    tokens: a question of random digits (one token each), so every batch is unpadded and every
    sequence has the planned length."""
    from finellama_rl.task.data import build_prompt
    from finellama_rl.task.protocols import prompt_format

    fmt = prompt_format(cfg.eval.protocol, cfg.data.system_prompt)

    def length(q: str) -> int:
        return len(tokenizer(build_prompt(tokenizer, fmt, q), add_special_tokens=False)["input_ids"])

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for _ in range(n):
        digits = prompt_tokens - length("")
        if digits < 1:
            raise ValueError(f"the prompt template alone is {length('')} tokens; ask for more than {prompt_tokens}")
        q = "".join(rng.choice("0123456789") for _ in range(digits))
        got = length(q)
        if got != prompt_tokens:
            raise AssertionError(f"prompt of {got} tokens, wanted {prompt_tokens}")
        rows.append({"question": q, "answer": f"{q[:3]}\n#### {int(q[:3])}"})
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    return folder


class Workspace:
    """Model folders (one per shape, built once) and data folders under one scratch folder."""

    def __init__(self, profile: Profile, root: Path):
        self.profile = profile
        self.root = root
        self.build_seconds: Dict[str, float] = {}
        self._runs = 0
        self._tokenizer = None

    def model_folder(self, model: str) -> Path:
        folder = self.root / "models" / model
        folder.parent.mkdir(parents=True, exist_ok=True)
        if (folder / "config.json").exists():
            return folder
        if self._tokenizer is None:  # trained once (seconds): the BPE stops at a few hundred tokens
            from finellama_rl.job.model import build_tiny_tokenizer

            self._tokenizer = build_tiny_tokenizer(4096)
        cfg = compose(self.profile, model, [], resolve_paths=False)
        seconds = build_model_folder(cfg.model, folder, self._tokenizer)
        if seconds:
            self.build_seconds[model] = round(seconds, 1)
        return folder

    def config(self, model: str, algo: str, prompt: int, completion: int, overrides: Sequence[str] = (),
               hardware: Optional[str] = None, rows: int = 128):
        """A run config on the random-init model with prompts of exactly `prompt` tokens."""
        folder = self.model_folder(model)
        data = self.root / "data" / f"{model}-p{prompt}"
        base = ["trainer=" + algo, f"model.path={folder}", "data=gsm8k", "eval.protocol=finellama",
                f"data.system_prompt={SYSTEM_PROMPT}", f"trainer.max_prompt_tokens={prompt}",
                f"trainer.max_completion_tokens={completion}"]
        if not (data / "train.jsonl").exists():
            from finellama_rl.job.model import load_tokenizer

            probe = compose(self.profile, model, base, hardware, resolve_paths=False)
            write_problems(load_tokenizer(probe.model), probe, data, prompt, rows)
        self._runs += 1
        run = self.root / "runs" / f"run{self._runs:03d}-{model}-{algo}"
        return compose(self.profile, model, [
            *base, f"data.path={data / 'train.jsonl'}", f"data.test_path={data / 'test.jsonl'}",
            f"data.validation_size={max(1, rows // 16)}",  # carved from the `rows` written (issue 21's split)
            "eval.before_training=false", "eval.num_examples=1", "eval.max_new_tokens=4", "trainer.save_every=100000",
            "trainer.log_every=1", "trainer.warmup_steps=0", "ladder.remember_fit=false",
            f"run.results_dir={self.root / 'runs'}", f"run.dir={run}", *overrides], hardware)


# ------------------------------------------------------------------------------ measuring


def _phase_tracker_class():
    from finellama_rl.job.faults import PhaseTracker

    class PeakTracker(PhaseTracker):
        """The project's PhaseTracker that also records the peak CUDA memory (allocated,
        reserved) of each phase, child phases excluded: every change of `current` (the
        trainers' `with tracker.phase(...)` and GRPO's optimizer callbacks) closes the
        window of the phase being left and resets the peak counters."""

        def __init__(self):
            self.peaks: Dict[str, List[int]] = {}  # phase -> [allocated, reserved] bytes
            self.windows: Dict[str, int] = {}  # phase -> windows closed (also on CPU)
            self._current = "other"
            super().__init__()

        @property
        def current(self) -> str:
            return self._current

        @current.setter
        def current(self, name: str) -> None:
            if name != self._current:
                self.close()
            self._current = name

        def close(self) -> None:
            """End the window of the current phase: fold its peaks in and reset the counters."""
            import torch

            self.windows[self._current] = self.windows.get(self._current, 0) + 1
            if not torch.cuda.is_available():
                return
            peak = self.peaks.setdefault(self._current, [0, 0])
            peak[0] = max(peak[0], torch.cuda.max_memory_allocated())
            peak[1] = max(peak[1], torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()

        def summary(self) -> Dict[str, Any]:
            """Peaks over the whole run and per phase (GiB; None on CPU), and the windows per phase."""
            self.close()
            phases = {k: {"allocated_gib": gib(self.peaks[k][0]) if k in self.peaks else None,
                          "reserved_gib": gib(self.peaks[k][1]) if k in self.peaks else None, "windows": n}
                      for k, n in self.windows.items()}
            if not self.peaks:
                return {"allocated_gib": None, "reserved_gib": None, "phases": phases}
            return {"allocated_gib": gib(max(a for a, _ in self.peaks.values())),
                    "reserved_gib": gib(max(r for _, r in self.peaks.values())), "phases": phases}

    return PeakTracker


def peak_tracker():
    return _phase_tracker_class()()


def gib(n: Optional[float]) -> Optional[float]:
    return None if n is None else round(n / GIB, 3)


def median(values: Sequence[float]) -> Optional[float]:
    import statistics

    return round(statistics.median(values), 4) if values else None
