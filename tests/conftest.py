"""Fixtures shared across test folders (pytest's importlib mode lets tests share no helper module)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch


@pytest.fixture(scope="module")
def tiny_run_files(tmp_path_factory) -> Path:
    """A folder with a saved tiny Llama and its tokenizer (`base/`) and 24 prompt/completion rows
    (`train.jsonl`): what a command-line run in a child process needs."""
    from lorakit.models import tiny_llama, tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny-run")
    tiny_llama().save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    rows = [{"prompt": f"Say the word number {i}.", "completion": f"word{i}"} for i in range(24)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture
def peft_logits() -> Callable[[Callable[[], torch.nn.Module], Path, torch.Tensor], torch.Tensor]:
    """Load a saved adapter folder with PEFT on a fresh base model; fail on any missing- or
    unexpected-key warning; return PEFT's logits for `ids`."""
    peft = pytest.importorskip("peft")

    def load(make_base: Callable[[], torch.nn.Module], folder: Path, ids: torch.Tensor) -> torch.Tensor:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = peft.PeftModel.from_pretrained(make_base(), folder).eval()
        messages = [str(w.message) for w in caught]
        assert not [m for m in messages if "missing" in m.lower() or "unexpected" in m.lower()], messages
        return loaded(ids).logits

    return load


@pytest.fixture
def checkpointing_grads() -> Callable[
    [Callable[[], torch.nn.Module], torch.Tensor], list[list[torch.Tensor]]
]:
    """The trainable gradients of one chunked-loss step without and with activation checkpointing,
    each on a fresh model from `make` (methods that read the per-forward context must match)."""
    from lorakit.train.loss import chunked_causal_lm_loss
    from lorakit.train.trainer import enable_activation_checkpointing

    def run(make: Callable[[], torch.nn.Module], ids: torch.Tensor) -> list[list[torch.Tensor]]:
        grads = []
        for checkpointing in (False, True):
            model = make().train()
            if checkpointing:
                enable_activation_checkpointing(model)
            total, count = chunked_causal_lm_loss(model, ids, torch.ones_like(ids), ids.clone())
            (total / count).backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
        return grads

    return run
