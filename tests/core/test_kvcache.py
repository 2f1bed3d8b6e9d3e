"""The KV cache under the name the installed transformers uses (5.23: past_key_values, 5.24+: cache).

transformers 5.24 drops a `past_key_values` given next to `cache` (with a FutureWarning), which made
loaded prompt/prefix adapters compute the base model. These run lorakit's own cache paths with every
deprecation warning an error, so a deprecated keyword in our code fails here, on any version."""

from __future__ import annotations

import warnings

import pytest
import torch

import lorakit as lk
from lorakit.core.kvcache import cache_argument, output_cache
from lorakit.generate import stream_chat
from lorakit.models import tiny_gpt2, tiny_llama, tiny_tokenizer


@pytest.fixture
def strict_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        yield


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_the_decoder_names_its_cache_argument(make) -> None:
    model = make()
    name = cache_argument(model.base_model)
    assert name in ("cache", "past_key_values")
    assert cache_argument(model) == name  # the causal LM and its decoder agree
    out = model(input_ids=torch.tensor([[5, 6, 7]]), use_cache=True)
    assert output_cache(out).get_seq_length() == 3


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.usefixtures("strict_warnings")
def test_prompt_and_prefix_change_the_output_without_deprecated_keywords(method) -> None:
    """The regression of transformers 5.24: the prefix must reach the attention (logits differ from
    the base model's), and the virtual tokens must be attended in a cached decode step too."""
    model = tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8]])
    base = model(input_ids=ids).logits
    config = lk.PromptTuningConfig(num_virtual_tokens=3) if method == "prompt" else lk.PrefixTuningConfig(3)
    lk.apply(model, config)
    full = model(input_ids=ids).logits
    assert not torch.allclose(full, base, atol=1e-4)
    name = cache_argument(model)
    first = model(input_ids=ids[:, :3], use_cache=True)
    step = model(input_ids=ids[:, 3:], use_cache=True, **{name: output_cache(first)})
    torch.testing.assert_close(step.logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
    generated = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 7)


@pytest.mark.usefixtures("strict_warnings")
def test_stream_chat_decodes_with_the_cache_without_deprecated_keywords() -> None:
    model, tokenizer = tiny_llama(), tiny_tokenizer()
    pieces = list(stream_chat(model, tokenizer, [{"role": "user", "content": "hi"}], max_new_tokens=4))
    assert len("".join(pieces)) > 0
