"""The opt-in NF4 embedding table: row lookups against reference math, the tied head sharing its
codes, the whole-model weight ratio, QLoRA training and round trips through dequantize_model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.models import tiny_llama
from lorakit.quant import dequantize_nf4, quantize_nf4
from lorakit.quant.embedding import Embedding4bit, quantize_embeddings
from lorakit.quant.linear import Linear4bit, dequantize_model, weight_memory
from lorakit.train.batching import default_collate
from lorakit.train.loss import chunked_causal_lm_loss


@pytest.mark.parametrize("dim", [128, 40])  # rows on block boundaries (row gather), and not (fallback)
@pytest.mark.parametrize("double_quant", [True, False])
def test_lookup_equals_embedding_of_the_dequantized_table(dim: int, double_quant: bool) -> None:
    table = nn.Embedding(300, dim)
    q = quantize_nf4(table.weight.detach(), 64, double_quant)
    layer = Embedding4bit(q)
    ids = torch.randint(0, 300, (4, 7), generator=torch.Generator().manual_seed(0))
    expected = F.embedding(ids, dequantize_nf4(q))
    assert torch.equal(layer(ids), expected)
    assert layer(ids).dtype == torch.float32  # the table's dtype: the fp32 residual stream starts here


def _tied_llama() -> nn.Module:
    return tiny_llama(hidden_size=64, tie_word_embeddings=True)


def test_tied_head_shares_the_tables_codes_and_computes_its_logits() -> None:
    model = _tied_llama()
    table = model.get_input_embeddings().weight.detach().clone()
    assert quantize_embeddings(model) == ["model.embed_tokens", "lm_head"]
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(embed, Embedding4bit) and isinstance(head, Linear4bit)
    assert head.packed.data_ptr() == embed.packed.data_ptr()  # one copy of the codes
    h = torch.randn(3, 64)
    torch.testing.assert_close(
        head(h), (h.bfloat16() @ dequantize_nf4(quantize_nf4(table), torch.bfloat16).T).float()
    )


def test_whole_model_weight_ratio_counts_the_shared_table_once() -> None:
    model = _tied_llama()
    lk.apply(model, lk.QLoRAConfig(rank=4, target_modules="all-linear", quantize_embeddings=True))
    w = weight_memory(model)
    assert w["model_ratio"] <= 0.30  # every weight in NF4 (norms are a rounding error)
    plain = _tied_llama()
    lk.apply(plain, lk.QLoRAConfig(rank=4, target_modules="all-linear"))
    assert weight_memory(plain)["model_ratio"] > w["model_ratio"] + 0.1


def test_qlora_with_a_4bit_embedding_trains_and_its_loss_matches_the_dequantized_model() -> None:
    model = _tied_llama()
    lk.apply(model, lk.QLoRAConfig(rank=4, target_modules="all-linear", quantize_embeddings=True))
    ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(1))
    batch = default_collate([{"input_ids": r.tolist(), "labels": r.tolist()} for r in ids], pad_id=0)
    loss, count = chunked_causal_lm_loss(model, **batch)
    loss.backward()
    assert count > 0 and torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    # the same numbers from a model holding the dequantized tables in full precision
    dequantize_model(model)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied again
    with torch.no_grad():
        again, _ = chunked_causal_lm_loss(model, **batch)
    torch.testing.assert_close(again, loss.detach(), rtol=2e-2, atol=0.0)  # bf16 head vs fp32 head


def test_quantization_record_rebuilds_the_same_4bit_embedding(tmp_path) -> None:
    from lorakit.methods.qlora import quantize_as_trained

    model = _tied_llama()
    lk.apply(model, lk.QLoRAConfig(rank=4, target_modules="all-linear", quantize_embeddings=True))
    lk.save_adapter(model, tmp_path)
    rebuilt = _tied_llama()
    record = quantize_as_trained(rebuilt, tmp_path)
    assert record["quantize_embeddings"] is True
    assert torch.equal(rebuilt.get_input_embeddings().packed, model.get_input_embeddings().packed)
