"""Load the tokenizer and the trainable policy: a 4-bit NF4 base (bitsandbytes) with a
LoRA adapter (PEFT), compute dtype from the hardware profile, and the attention
kernel chosen by what is installed. Also builds the `tiny` random-init
Qwen2-architecture model and tokenizer used by smoke runs and tests (no download).

    tok = load_tokenizer(cfg.model)
    policy = load_policy(cfg.model, cfg.trainer, cfg.hardware)

Correctness traps handled here:
- bitsandbytes on CPUs with avx512_bf16 repacks Linear4bit weights into an
  inference-only layout on the first eval-mode no-grad forward; training after
  an evaluation then fails. We switch that path off on every Linear4bit.
- transformers always loads Qwen2Tokenizer for qwen2 models, which rebuilds the
  normalizer and pre-tokenizer; the tiny BPE is trained with exactly that
  pipeline so ids survive a save/load round trip.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterable, Optional

from finellama_rl.config import AttnImpl, Device, HardwareConfig, ModelConfig, TrainerConfig

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def cache_root() -> Path:
    base = os.environ.get("FINELLAMA_CACHE") or os.path.join(os.environ.get("HF_HOME", str(Path.home() / ".cache" / "huggingface")), "finellama_rl")
    return Path(base)


def _tiny_key(m: ModelConfig) -> str:
    shape = [m.hidden_size, m.num_layers, m.num_attention_heads, m.num_kv_heads, m.intermediate_size, m.vocab_size, m.max_position_embeddings, m.tie_embeddings]
    if m.tiny_final_norm != 1.0:  # appended only when set, so existing tiny models keep their folder
        shape.append(["final_norm", m.tiny_final_norm])
    return "tiny-qwen2-" + hashlib.sha1(json.dumps(shape + [3]).encode()).hexdigest()[:10]


def _tiny_corpus() -> Iterable[str]:
    from finellama_rl.config import DataConfig
    from finellama_rl.task.data import generate_arithmetic

    system = DataConfig.system_prompt
    for p in generate_arithmetic(3000, seed=7, max_operand=99):
        yield f"{system}\n{p['question']}\n{p['answer']}"
    yield "0123456789 +-*/=#$%.,:;!?()"


def build_tiny_tokenizer(vocab_size: int):
    """A byte-level BPE trained with Qwen2's own normalizer and pre-tokenizer."""
    from tokenizers import trainers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    seed = Qwen2Tokenizer(vocab={t: i for i, t in enumerate(SPECIAL_TOKENS)}, merges=[])
    backend = seed.backend_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(_tiny_corpus(), trainer=trainer)
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, errors="replace", eos_token="<|im_end|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_tiny_model(m: ModelConfig, folder: Path, seed: int = 0) -> Path:
    """Random-init Qwen2ForCausalLM + tokenizer saved to `folder` (atomic rename)."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tiny_tokenizer(m.vocab_size)
    config = Qwen2Config(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_kv_heads,
        intermediate_size=m.intermediate_size, max_position_embeddings=m.max_position_embeddings,
        tie_word_embeddings=m.tie_embeddings, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id, bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # see ModelConfig.tiny_final_norm: lets LoRA on a frozen random base reach confident logits
        model.model.norm.weight.fill_(m.tiny_final_norm)
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # transformers writes no weights on a rank > 0 once torch.distributed is up; this cache is built by
    # whichever rank takes the lock first (a rank-1 build once left a folder with a tokenizer only)
    model.should_save_on_this_rank = lambda is_main_process: True
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if not (tmp / "config.json").exists() or not any(tmp.glob("*.safetensors")):
        raise RuntimeError(f"building the tiny model wrote no weights into {tmp}")
    os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
    return folder


def ensure_tiny_model(m: ModelConfig) -> Path:
    """The tiny model's folder, built once per shape under a file lock."""
    from filelock import FileLock

    folder = cache_root() / _tiny_key(m)
    if (folder / "config.json").exists():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if not (folder / "config.json").exists():
            log.info("building tiny model in %s", folder)
            build_tiny_model(m, folder)
    return folder


def model_source(m: ModelConfig) -> str:
    """Where weights come from: a local path, the tiny builder, or the hub id."""
    if m.path:
        return m.path
    if m.tiny:
        return str(ensure_tiny_model(m))
    return m.hub_id


def load_tokenizer(m: ModelConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_source(m), revision=None if (m.path or m.tiny) else m.revision)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"  # generation appends on the right
    return tok


def choose_attention(requested: AttnImpl, hardware: HardwareConfig) -> str:
    """flash_attention_2 if asked (or auto) and importable on CUDA, else sdpa."""
    has_flash = hardware.device == Device.cuda and importlib.util.find_spec("flash_attn") is not None
    if requested == AttnImpl.auto:
        return AttnImpl.flash_attention_2.value if has_flash else AttnImpl.sdpa.value
    if requested == AttnImpl.flash_attention_2 and not has_flash:
        log.warning("flash_attention_2 requested but flash_attn is not importable on this device; using sdpa")
        return AttnImpl.sdpa.value
    return requested.value


def compute_dtype(hardware: HardwareConfig):
    import torch

    return torch.bfloat16 if hardware.bf16 and hardware.device == Device.cuda else torch.float32


def disable_cpu_repack(model) -> int:
    """Switch off bitsandbytes' avx512-bf16 inference repack on every Linear4bit."""
    import bitsandbytes as bnb

    n = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def _quantization_config(t: TrainerConfig, dtype):
    from transformers import BitsAndBytesConfig

    if t.quantization.bits == 8:  # LLM.int8 (e.g. the *full* preset's 14B generator)
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=t.quantization.quant_type.value,
        bnb_4bit_use_double_quant=t.quantization.double_quant, bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=dtype,
    )


def load_base(m: ModelConfig, t: TrainerConfig, hardware: HardwareConfig):
    """The (optionally 4-bit) base model, before LoRA."""
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(hardware)
    attn = choose_attention(m.attn_implementation, hardware)
    device_map = {"": int(os.environ.get("LOCAL_RANK", 0))} if hardware.device == Device.cuda else {"": "cpu"}
    quant = _quantization_config(t, dtype) if t.quantization.enabled else None
    log.info("loading %s (4-bit=%s, dtype=%s, attention=%s)", model_source(m), bool(quant), str(dtype).replace("torch.", ""), attn)
    model = AutoModelForCausalLM.from_pretrained(
        model_source(m), revision=None if (m.path or m.tiny) else m.revision,
        dtype=dtype, attn_implementation=attn, quantization_config=quant, device_map=device_map,
    )
    if quant is not None:
        disable_cpu_repack(model)
    return model


def lora_config(t: TrainerConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=t.lora.r, lora_alpha=t.lora.alpha, lora_dropout=t.lora.dropout,
        target_modules=list(t.lora.target_modules), task_type="CAUSAL_LM", bias="none",
    )


def load_policy(m: ModelConfig, t: TrainerConfig, hardware: HardwareConfig, adapter_dir: Optional[str] = None):
    """Base + LoRA (a fresh adapter, or the one saved in `adapter_dir`); with
    model.adapter, that adapter frozen underneath (finellama_rl/job/adapters.py)."""
    model = load_base(m, t, hardware)
    if t.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if not t.lora.enabled:
        return model
    from peft import PeftModel, get_peft_model

    if t.activation_checkpointing:
        # Only checkpointing needs it (a checkpointed block whose inputs need no grad would
        # otherwise be skipped in backward), as in plain TRL; without checkpointing LoRA gets
        # its gradients anyway and the embedding-output grads cost 4-9% of backward time
        # (tests/test_model.py checks the gradients are identical).
        model.enable_input_require_grads()
    if m.adapter:  # a frozen trained adapter (e.g. SFT) under the trainable one: finellama_rl/job/adapters.py
        from finellama_rl.job.adapters import FROZEN, stack_adapters
        from finellama_rl.artifacts import resolve_adapter

        inside = Path(adapter_dir) / FROZEN if adapter_dir else None  # a checkpoint of such a run holds both
        frozen = inside if inside is not None and inside.is_dir() else resolve_adapter(m.adapter)
        log.info("starting from the frozen adapter %s", frozen)
        return stack_adapters(model, frozen, lora_config(t), Path(adapter_dir) if adapter_dir else None)
    if adapter_dir:
        return PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
    return get_peft_model(model, lora_config(t))


def count_parameters(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
