"""The architectures users bring, beyond Llama and GPT-2: tiny random Qwen2, Qwen3, Mistral,
Gemma 2 (soft-capped logits and attention), Gemma 3 and Phi-3 (fused qkv and gate/up projections),
each through the chunked loss, the fast training kernels, LoRA training, merge, save and PEFT."""

from __future__ import annotations

import pytest
import torch
import transformers as tf

import lorakit as lk
from lorakit.models import tiny_tokenizer
from lorakit.run import set_attention
from lorakit.train.fast import prepare_for_training
from lorakit.train.loss import chunked_causal_lm_loss

VOCAB = 96
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
    tie_word_embeddings=False,
)
ARCHITECTURES = {
    "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, {}),
    "qwen3": (tf.Qwen3Config, tf.Qwen3ForCausalLM, {"head_dim": 8}),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, {"sliding_window": 6}),
    "gemma2": (
        tf.Gemma2Config,
        tf.Gemma2ForCausalLM,
        {"head_dim": 8, "final_logit_softcapping": 3.0, "attn_logit_softcapping": 5.0, "sliding_window": 6},
    ),
    "gemma3": (tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, {"head_dim": 8, "sliding_window": 6}),
    "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM, {}),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    config_cls, model_cls, extra = ARCHITECTURES[name]
    config = config_cls(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random weights large enough that soft-caps and windows matter
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
    return model


def batch(length: int = 12) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : length // 2] = -100  # loss on the second half only, as an answer
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def reference_loss(model: torch.nn.Module, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's own logits (soft-capped where it soft-caps), mean CE over the loss tokens."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten())


@pytest.fixture(params=list(ARCHITECTURES))
def arch(request) -> str:
    return request.param


def test_chunked_loss_equals_the_models_own_loss(arch) -> None:
    model, b = build(arch), batch()
    for verify in (True, False):
        total, count = chunked_causal_lm_loss(
            model, b["input_ids"], b["attention_mask"], b["labels"], chunk_size=5, verify_head=verify
        )
        torch.testing.assert_close(total / count, reference_loss(model, b), atol=1e-5, rtol=1e-5)


def test_gemma2_soft_cap_is_applied_not_refused() -> None:
    """Without the cap the chunked loss would differ from the model's (the cap is small here)."""
    model, b = build("gemma2"), batch()
    capped = reference_loss(model, b)
    model.config.final_logit_softcapping = None
    assert not torch.allclose(reference_loss(model, b), capped, atol=1e-3)


def test_fast_kernels_and_lora_training_keep_the_models_gradients(arch) -> None:
    """One LoRA training step with lorakit's kernels (its attention, fp32) gives the gradients
    plain transformers gives, then a few steps lower the loss."""
    b = batch()
    grads = []
    for fast in (False, True):
        model = lk.apply(build(arch), lk.LoRAConfig(rank=4, alpha=8, target_modules="all-linear"))
        model.train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name or ".B" in name:
                    p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(2))
        if fast:  # what `lorakit train` does: its attention kernel ("auto" on a CPU), then the rest
            set_attention(model, "lorakit")
            prepare_for_training(model, None, compile="off")
        total, count = chunked_causal_lm_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
        (total / count).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        total, count = chunked_causal_lm_loss(model, b["input_ids"], b["attention_mask"], b["labels"])
        (total / count).backward()
        optimizer.step()
        losses.append(float(total / count))
    assert losses[-1] < losses[0]


def test_merge_save_and_peft_load_agree(arch, tmp_path, peft_logits) -> None:
    model = lk.apply(build(arch), lk.LoRAConfig(rank=4, alpha=12, target_modules="all-linear"))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(3))
    ids = batch()["input_ids"]
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        lk.merge(model)
        torch.testing.assert_close(model(input_ids=ids).logits, unmerged, atol=1e-4, rtol=1e-4)
        lk.unmerge(model)
    lk.save_adapter(model, tmp_path / "adapter")
    reloaded = build(arch)
    lk.load_adapter(reloaded, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, unmerged, atol=1e-5, rtol=1e-5)
        theirs = peft_logits(lambda: build(arch), tmp_path / "adapter", ids)
    torch.testing.assert_close(theirs, unmerged, atol=1e-4, rtol=1e-4)


def test_generation_with_an_adapter_runs(arch) -> None:
    model = lk.apply(build(arch), lk.LoRAConfig(rank=2, target_modules="all-linear"))
    tokenizer = tiny_tokenizer()
    ids = torch.tensor([[5, 6, 7, 8]])
    out = model.generate(
        input_ids=ids, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    assert out.shape[1] >= 5
