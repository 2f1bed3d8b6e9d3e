"""The contract every layer method must keep. A later method joins by adding one Case to CASES."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.core.contract import AdaptedLayer
from lorakit.methods.dora import DoRAConfig
from lorakit.models import tiny_gpt2, tiny_llama
from lorakit.quant.linear import quantize_model


class EmbedMLP(nn.Module):
    """A plain torch model: an embedding and biased linear layers, no transformers involved."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(50, 16)
        self.up = nn.Linear(16, 24)
        self.down = nn.Linear(24, 16)
        self.head = nn.Linear(16, 50)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(self.embed(ids)))))


@dataclass
class Case:
    id: str
    make_model: Callable[[], nn.Module]
    make_config: Callable[[], Any]
    init_atol: float = 1e-6  # PiSSA re-splits the weight, so "equals the base" is up to rounding
    mergeable: bool = True  # False: merge raises NotMergeableError and changes nothing
    starts_at_base: bool = True  # prompt/prefix tuning change the output from the first step
    unload_restores: bool = True  # in-place methods (BitFit, norm tuning) keep their change on unload


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out


CASES = [
    Case("lora-llama-bias", lambda: tiny_llama(bias=True), lambda: lk.LoRAConfig(rank=4, alpha=6)),
    Case(
        "lora-gpt2-conv1d-rslora",
        tiny_gpt2,
        lambda: lk.LoRAConfig(rank=4, alpha=3, use_rslora=True, init="gaussian"),
    ),
    Case(
        "lora-plain-embedding",
        EmbedMLP,
        lambda: lk.LoRAConfig(rank=3, alpha=5, target_modules=["embed", "up", "down"]),
    ),
    Case(
        "lora-pissa-llama",
        lambda: tiny_llama(bias=True),
        lambda: lk.LoRAConfig(rank=4, alpha=8, init="pissa"),
        2e-5,
    ),
    Case(
        "dora-llama-bias",
        lambda: tiny_llama(bias=True),
        lambda: DoRAConfig(rank=4, alpha=6),
    ),
    Case("dora-gpt2-conv1d", tiny_gpt2, lambda: DoRAConfig(rank=4, alpha=3, use_rslora=True)),
    Case(
        "adapter-houlsby-llama-bias",
        lambda: tiny_llama(bias=True),
        lambda: lk.AdapterConfig(size=6, activation="tanh"),
        mergeable=False,
    ),
    Case(
        "adapter-pfeiffer-gpt2",
        tiny_gpt2,
        lambda: lk.AdapterConfig(size=5, placement="pfeiffer", activation="gelu"),
        mergeable=False,
    ),
    Case(
        "prompt-llama",
        tiny_llama,
        lambda: lk.PromptTuningConfig(num_virtual_tokens=3),
        mergeable=False,
        starts_at_base=False,
    ),
    Case(
        "prefix-mlp-gpt2",
        tiny_gpt2,
        lambda: lk.PrefixTuningConfig(num_virtual_tokens=3, projection_size=8),
        mergeable=False,
        starts_at_base=False,
    ),
    Case("bitfit-gpt2", tiny_gpt2, lk.BitFitConfig, mergeable=False, unload_restores=False),
    Case("norm-llama", tiny_llama, lk.NormTuningConfig, mergeable=False, unload_restores=False),
    Case(
        "dora-pissa-llama",
        lambda: tiny_llama(bias=True),
        lambda: DoRAConfig(rank=4, alpha=8, init="pissa"),
        2e-5,
    ),
    Case(
        "adalora-llama-bias",
        lambda: tiny_llama(bias=True),
        lambda: lk.AdaLoRAConfig(target_rank=2, init_rank=4, alpha=32),
    ),
    Case("adalora-gpt2-conv1d", tiny_gpt2, lambda: lk.AdaLoRAConfig(target_rank=3, alpha=48)),
    Case(
        "quantum-llama-bias",
        lambda: tiny_llama(bias=True),
        lambda: lk.QuantumPEFTConfig(rank=4, layers=2, alpha=2.0),
    ),
    # aLoRA on every linear: the battery's ids hold its invocation (199) twice in row 0 (the last one
    # starts it) and not at all in row 1 (the base model's output, with one warning)
    Case(
        "alora-llama-bias",
        lambda: tiny_llama(bias=True),
        lambda: lk.ALoRAConfig(rank=4, alpha=6, invocation_tokens=[199]),
        mergeable=False,
    ),
    Case(
        "mopeft-lora-adapter-llama-bias",
        lambda: tiny_llama(bias=True),
        lambda: lk.MoPEFTConfig(experts="lora,adapter", rank=4, alpha=6, size=5, activation="tanh"),
        mergeable=False,
    ),
    # the gated prefix expert: an attention branch whose tensors sit on o_proj (methods/gated_prefix.py)
    Case(
        "mopeft-lora-prefix-llama",
        tiny_llama,
        lambda: lk.MoPEFTConfig(experts="lora,prefix", gate="softmax", rank=4, alpha=6, num_virtual_tokens=3),
        mergeable=False,
    ),
    # dense gates: top-k leaves an expert no token may get, so no gradient (tests/methods/test_mopeft.py)
    Case(
        "mopeft-dora-softmax-gpt2",
        tiny_gpt2,
        lambda: lk.MoPEFTConfig(
            experts="dora,adapter", gate="softmax", rank=3, alpha=3, size=4, activation="gelu"
        ),
        mergeable=False,
    ),
    # whole modules trained beside LoRA (core/copies.py); tied embeddings, so the head moves too
    Case(
        "lora-modules-to-save-llama-tied",
        lambda: tiny_llama(tie_word_embeddings=True),
        lambda: lk.LoRAConfig(
            rank=4, alpha=6, target_modules=["q_proj", "v_proj"], modules_to_save=["embed_tokens", "norm"]
        ),
    ),
    # LongLoRA at the model's own window (position interpolation changes the base function on
    # purpose: tests/methods/test_longlora.py) and dense attention (S2 needs whole groups of tokens)
    Case("longlora-llama-bias", lambda: tiny_llama(bias=True), lambda: lk.LongLoRAConfig(s2_ratio=0)),
    # QLoRA's base is the 4-bit model (so the model is quantized before the battery's "base" is
    # taken); merging swaps in full precision and unmerge restores the 4-bit layer exactly.
    Case(
        "qlora-llama-bias",
        lambda: _quantized(tiny_llama(bias=True)),
        lambda: lk.QLoRAConfig(rank=4, alpha=6, compute_dtype="float32"),
    ),
    Case(
        "qlora-gpt2-conv1d",
        lambda: _quantized(tiny_gpt2()),
        lambda: lk.QLoRAConfig(rank=4, alpha=3, compute_dtype="float32", blocksize=32),
    ),
]


def _quantized(model: nn.Module) -> nn.Module:
    quantize_model(model, compute_dtype=torch.float32, blocksize=32)
    return model


@pytest.fixture(params=CASES, ids=lambda c: c.id)
def case(request: pytest.FixtureRequest) -> Case:
    return request.param


def _ids(model: nn.Module) -> torch.Tensor:
    vocab = model.config.vocab_size if hasattr(model, "config") else 50
    return torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(1))


def _train_a_little(model: nn.Module) -> None:
    """Move every trainable tensor so deltas are non-zero (as after training)."""
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _declared(model: nn.Module) -> set[int]:
    """Parameters the methods declare by role (deltas and model-level adapters)."""
    return {
        id(p)
        for m in model.modules()
        if isinstance(m, (lk.Delta, lk.ModelAdapter))
        for ps in m.role_parameters().values()
        for p in ps
    }


def _refuses_merge(case: Case, model: nn.Module) -> bool:
    """For a method that cannot merge: merge raises NotMergeableError and changes nothing."""
    if case.mergeable:
        return False
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lk.NotMergeableError, match="merge"):
        lk.merge(model)
    if case.unload_restores:  # unload would drop the adapter, so merge_and_unload refuses too
        with pytest.raises(lk.NotMergeableError):
            lk.merge_and_unload(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    return True


def test_output_equals_base_at_init(case: Case) -> None:
    if not case.starts_at_base:
        pytest.skip("virtual tokens change the output from the start")
    model = case.make_model().eval()
    ids = _ids(model)
    base = _logits(model, ids)
    lk.apply(model, case.make_config())
    torch.testing.assert_close(_logits(model, ids), base, atol=case.init_atol, rtol=0)


def test_merged_equals_unmerged_and_unmerge_restores_weights(case: Case) -> None:
    model = case.make_model().eval()
    ids = _ids(model)
    lk.apply(model, case.make_config())
    _train_a_little(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    unmerged = _logits(model, ids)
    assert (unmerged - _logits_base(model, ids)).abs().max() > 1e-3, "the adapter should change the output"
    if _refuses_merge(case, model):
        torch.testing.assert_close(_logits(model, ids), unmerged, atol=0, rtol=0)
        return
    lk.merge(model)
    torch.testing.assert_close(_logits(model, ids), unmerged, atol=1e-5, rtol=0)
    with pytest.raises(RuntimeError, match="already merged"):
        lk.merge(model)
    lk.unmerge(model)
    for name, p in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(p.detach(), weights[name], atol=1e-6, rtol=0)
    with pytest.raises(RuntimeError, match="nothing to unmerge"):
        lk.unmerge(model)


def _logits_base(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with lk.disable_adapters(model):
        return _logits(model, ids)


def test_disabled_adapters_give_the_base_output(case: Case) -> None:
    model = case.make_model().eval()
    ids = _ids(model)
    base = _logits(model, ids)
    lk.apply(model, case.make_config())
    _train_a_little(model)
    torch.testing.assert_close(_logits_base(model, ids), base, atol=case.init_atol, rtol=0)
    if not case.mergeable:
        tuned = _logits(model, ids)
        assert (tuned - base).abs().max() > 1e-3
        torch.testing.assert_close(_logits(model, ids), tuned, atol=0, rtol=0)  # enabled again on exit
        return
    lk.merge(model)
    merged = _logits(model, ids)
    torch.testing.assert_close(_logits_base(model, ids), base, atol=1e-5, rtol=0)
    torch.testing.assert_close(_logits(model, ids), merged, atol=1e-5, rtol=0)  # merged back on exit


def test_only_declared_parameters_get_gradients(case: Case) -> None:
    model = case.make_model().train()
    lk.apply(model, case.make_config())
    _train_a_little(model)
    _logits(model, _ids(model)).square().mean().backward()
    declared = _declared(model)
    for name, p in model.named_parameters():
        if id(p) in declared:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    groups = lk.param_groups(model, lr=1e-3)
    flat = [id(p) for g in groups for p in g["params"]]
    assert len(flat) == len(set(flat)) and set(flat) == declared  # each in one group: AdamW refuses twice
    deltas = [m for m in model.modules() if isinstance(m, (lk.Delta, lk.ModelAdapter))]
    assert {g["role"] for g in groups} == {role.value for d in deltas for role in d.role_parameters()}


def test_save_then_load_reproduces_outputs(case: Case, tmp_path) -> None:
    model = case.make_model().eval()
    ids = _ids(model)
    lk.apply(model, case.make_config())
    _train_a_little(model)
    expected = _logits(model, ids)
    lk.save_adapter(model, tmp_path)
    fresh = case.make_model().eval()
    lk.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(_logits(fresh, ids), expected, atol=1e-5, rtol=0)


def test_unload_restores_the_original_model(case: Case) -> None:
    model = case.make_model().eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lk.apply(model, case.make_config())
    _train_a_little(model)
    if case.mergeable:
        lk.merge(model)
        lk.unmerge(model)
    if not case.unload_restores:  # the change is in the weights: delete_adapter gives the base back
        lk.delete_adapter(model, "default")
    plain = lk.unload(model)
    assert not any(isinstance(m, (AdaptedLayer, lk.Delta)) for m in plain.modules())
    assert plain.state_dict().keys() == original.keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)


def test_merge_then_unload_keeps_the_adapter_folded_in(case: Case) -> None:
    if not case.mergeable and case.unload_restores:  # in-place methods run it: unload keeps their change
        pytest.skip("not mergeable; merge_and_unload's refusal is checked with merge")
    model = case.make_model().eval()
    ids = _ids(model)
    lk.apply(model, case.make_config())
    _train_a_little(model)
    expected = _logits(model, ids)
    plain = lk.merge_and_unload(model)
    assert not any(isinstance(m, AdaptedLayer) for m in plain.modules())
    torch.testing.assert_close(_logits(plain, ids), expected, atol=1e-5, rtol=0)


def test_merge_refuses_nan_and_changes_nothing(case: Case) -> None:
    if not case.mergeable:
        pytest.skip("not mergeable")
    model = case.make_model().eval()
    lk.apply(model, case.make_config())
    _train_a_little(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scaled = [
        m
        for m in model.modules()
        if isinstance(m, lk.Delta) and {lk.Role.B, lk.Role.SINGULAR} & set(m.role_parameters())
    ]
    last = scaled[-1]  # not a module copy (modules_to_save): a low-rank delta
    with torch.no_grad():
        roles = last.role_parameters()  # poison the factor that scales the update: B, or lambda
        poisoned = next(iter(roles.get(lk.Role.B) or roles[lk.Role.SINGULAR]))
        poisoned.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or Inf"):
        lk.merge(model)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) or value.data_ptr() == poisoned.data_ptr(), key
    assert all(not m.merged for m in model.modules() if isinstance(m, AdaptedLayer))
