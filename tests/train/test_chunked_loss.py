"""The chunked loss against a plain cross-entropy over full logits: values and gradients."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.train import chunked_causal_lm_loss
from lorakit.train.batching import default_collate


def reference_loss(model: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        targets.reshape(-1),
        ignore_index=-100,
        reduction="sum",
    )
    return loss, int((targets != -100).sum())


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("chunk_size", [3, 1024])
def test_matches_full_logits_cross_entropy(tiny, arch: str, chunk_size: int) -> None:
    model = tiny.llama() if arch == "llama" else tiny.gpt2(dropout=0.0)
    batch = default_collate(tiny.samples(5, seed=1), pad_id=0)

    ref, ref_count = reference_loss(model, batch)
    ref.backward()
    ref_grads = grads(model)

    ours, count = chunked_causal_lm_loss(model, **batch, chunk_size=chunk_size, verify_head=True)
    ours.backward()
    our_grads = grads(model)

    assert count == ref_count
    assert chunk_size == 1024 or count > 2 * chunk_size  # several chunks, one partial
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert our_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(our_grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_last_hidden_state_is_after_the_final_norm(tiny, arch: str) -> None:
    """The loss relies on this: lm_head(hidden_states[-1]) must be the model's logits."""
    model = tiny.llama() if arch == "llama" else tiny.gpt2(dropout=0.0)
    ids = torch.randint(3, tiny.VOCAB, (2, 9))
    out = model(input_ids=ids, output_hidden_states=True)
    head = model.get_output_embeddings()
    torch.testing.assert_close(head(out.hidden_states[-1]), out.logits)


def test_no_loss_tokens_gives_zero_not_nan(tiny) -> None:
    model = tiny.llama()
    batch = default_collate([{"input_ids": [5, 6, 7], "labels": [5, -100, -100]}], pad_id=0)
    loss, count = chunked_causal_lm_loss(model, **batch)
    assert count == 0 and float(loss) == 0.0


def test_bf16_autocast_loss_is_close_to_fp32(tiny) -> None:
    model = tiny.llama()
    batch = default_collate(tiny.samples(4, seed=2), pad_id=0)
    with torch.no_grad():
        fp32, _ = chunked_causal_lm_loss(model, **batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16, _ = chunked_causal_lm_loss(model, **batch)
    assert bf16.dtype == torch.float32  # the CE itself runs in fp32
    torch.testing.assert_close(bf16, fp32, rtol=2e-2, atol=0.0)


class SoftCappedLM(nn.Module):
    """A model that changes logits after its head, which the chunked loss cannot reproduce."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def get_output_embeddings(self) -> nn.Module:
        return self.head

    def forward(self, input_ids, attention_mask, output_hidden_states, logits_to_keep, use_cache):
        hidden = self.embed(input_ids)
        logits = 30.0 * torch.tanh(self.head(hidden[:, -logits_to_keep:]) / 30.0) + 1.0
        return SimpleNamespace(hidden_states=(hidden,), logits=logits)


def test_verify_head_refuses_models_that_change_logits_after_the_head(tiny) -> None:
    batch = default_collate(tiny.samples(2), pad_id=0)
    with pytest.raises(ValueError, match="does not reproduce the model's logits"):
        chunked_causal_lm_loss(SoftCappedLM(tiny.VOCAB), **batch, verify_head=True)
