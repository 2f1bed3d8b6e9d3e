"""Position interpolation (later-methods.md 2.6, test 6): with factor s the cos/sin at position p
equal the original ones at p / s; YaRN through transformers; the model is rebuilt the same way as from
an edited config; bad lengths refused."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit.long.positions import extend_context, original_window, rope_of
from lorakit.models import tiny_llama


def _cos_sin(model: torch.nn.Module, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, positions.shape[-1], model.config.hidden_size)
    return model.model.rotary_emb(x, positions[None])


def test_linear_interpolation_maps_p_to_p_over_s() -> None:
    plain, model = tiny_llama(), tiny_llama()
    window = original_window(model.config)
    assert extend_context(model, 3 * window + 1) == 4.0  # rounded up to a whole factor
    positions = torch.arange(0, 4 * window, 4)
    torch.testing.assert_close(_cos_sin(model, positions)[0], _cos_sin(plain, positions // 4)[0])
    torch.testing.assert_close(_cos_sin(model, positions)[1], _cos_sin(plain, positions // 4)[1])
    assert model.config.max_position_embeddings == 4 * window and original_window(model.config) == window
    assert model.config.rope_parameters == {"rope_theta": 10000.0, "rope_type": "linear", "factor": 4.0}


def test_the_same_as_a_model_built_from_the_edited_config() -> None:
    model = tiny_llama()
    extend_context(model, 2048, "yarn")
    rebuilt = type(model)(copy.deepcopy(model.config))
    rebuilt.load_state_dict(model.state_dict())
    ids = torch.randint(3, 200, (1, 40))
    torch.testing.assert_close(model(ids).logits, rebuilt(ids).logits)
    assert rope_of(model.config)["rope_parameters"]["rope_type"] == "yarn"
    assert rope_of(model.config)["rope_parameters"]["original_max_position_embeddings"] == 512
    plain = tiny_llama()
    assert (model(ids).logits - plain(ids).logits).abs().max() > 1e-4  # positions did change


def test_bad_requests_are_refused() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="not beyond the model's window of 512 tokens"):
        extend_context(model, 512)
    with pytest.raises(ValueError, match="must be one of linear, yarn"):
        extend_context(model, 2048, "ntk")
    extend_context(model, 1024)
    with pytest.raises(ValueError, match="not beyond the model's window of 512"):
        extend_context(model, 400)  # the window is the original one, not the extended


def test_passkey_prompts_have_the_length_and_depth_asked_for() -> None:
    from lorakit.long.passkey import QUESTION, key_sentence, passkey_items, passkey_prompt
    from lorakit.models import tiny_tokenizer

    tok = tiny_tokenizer()  # byte-level: a token per character
    for depth in (0.0, 0.5, 1.0):
        prompt = passkey_prompt(tok, 2000, depth, 12345)
        n = len(tok(prompt, add_special_tokens=False)["input_ids"])
        assert abs(n - 2000) <= 50 and prompt.endswith(QUESTION)
        at = prompt.index(key_sentence(12345)) / (len(prompt) - len(key_sentence(12345)) - len(QUESTION))
        assert abs(at - depth) < 0.05
    items = passkey_items(tok, 1000, [0.25, 0.75], per_depth=3, seed=1)
    assert len(items) == 6 and all(i.reference.isdigit() and len(i.reference) == 5 for i in items)
    assert all(i.reference in i.messages[0]["content"] for i in items)
    assert [i.reference for i in items] == [i.reference for i in passkey_items(tok, 1000, [0.25, 0.75], 3, 1)]
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tok, 1000, 1.5, 1)
    with pytest.raises(ValueError, match="room for any filler"):
        passkey_prompt(tok, 20, 0.5, 1)
