"""DoRA against a reference written here in plain torch, its eval-mode norm cache, and PEFT interop."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.methods import METHODS, config_from_peft
from lorakit.methods.dora import DoRAConfig, DoRADelta
from lorakit.models import tiny_gpt2, tiny_llama


class OneLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(12, 10)
        self.embed = nn.Embedding(20, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _adapted(dropout: float = 0.0) -> tuple[nn.Module, DoRADelta]:
    model = OneLinear()
    lk.apply(model, DoRAConfig(rank=3, alpha=5, dropout=dropout, target_modules=["proj"]))
    delta = model.proj.adapters["default"]
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in delta.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model, delta


def _reference(model: nn.Module, delta: DoRADelta, x: torch.Tensor, detach_norm: bool) -> torch.Tensor:
    """y = m * (W0 + s B A) / ||W0 + s B A||_row x + b, straight from the paper."""
    base = model.proj.base_layer
    V = base.weight + (5 / 3) * delta.lora_B @ delta.lora_A  # (out, in)
    norm = V.norm(dim=1, keepdim=True)  # (out, 1)
    W = delta.magnitude[:, None] * V / (norm.detach() if detach_norm else norm)
    return x @ W.T + base.bias


def test_forward_matches_the_plain_torch_reference() -> None:
    model, delta = _adapted()
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x), _reference(model, delta, x, True), atol=1e-6, rtol=0)


def test_magnitude_starts_at_the_row_norm_of_w0_and_output_equals_base() -> None:
    model = OneLinear()
    x = torch.randn(4, 12)
    before = model(x)
    lk.apply(model, DoRAConfig(rank=3, target_modules=["proj"]))
    delta = model.proj.adapters["default"]
    torch.testing.assert_close(delta.magnitude, model.proj.base_layer.weight.norm(dim=1))
    torch.testing.assert_close(model(x), before, atol=1e-6, rtol=0)


def test_norm_is_detached_in_the_gradient() -> None:
    model, delta = _adapted()
    model.train()
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    params = [delta.lora_A, delta.lora_B, delta.magnitude]
    ours = torch.autograd.grad(model(x).square().sum(), params)
    detached = torch.autograd.grad(_reference(model, delta, x, True).square().sum(), params)
    full = torch.autograd.grad(_reference(model, delta, x, False).square().sum(), params)
    for g, ref in zip(ours, detached, strict=True):
        torch.testing.assert_close(g, ref, atol=1e-5, rtol=1e-5)
    assert (ours[0] - full[0]).abs().max() > 1e-3, "the norm's own gradient should be missing"


def test_training_with_dropout_rescales_the_dropped_input_like_peft() -> None:
    model, delta = _adapted(dropout=0.3)
    model.train()
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(5)
    out = model(x)
    torch.manual_seed(5)
    xd = nn.functional.dropout(x, 0.3)
    base = model.proj.base_layer
    g = delta.magnitude / (base.weight + (5 / 3) * delta.lora_B @ delta.lora_A).norm(dim=1)
    expected = base(x) + (g - 1) * (xd @ base.weight.T) + g * (5 / 3) * (xd @ delta.lora_A.T @ delta.lora_B.T)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)


def _count_norms(delta: DoRADelta, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls = [0]
    original = delta._factored_norm

    def counted(layer: lk.AdaptedLayer) -> torch.Tensor:
        calls[0] += 1
        return original(layer)

    monkeypatch.setattr(delta, "_factored_norm", counted)
    return calls


def test_eval_mode_caches_the_norm_until_a_weight_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    model, delta = _adapted()
    model.eval()
    calls = _count_norms(delta, monkeypatch)
    x = torch.randn(4, 12)
    first = model(x)
    torch.testing.assert_close(model(x), first, atol=0, rtol=0)
    assert calls[0] == 1
    for tensor in (delta.lora_A, delta.lora_B, model.proj.base_layer.weight):
        with torch.no_grad():
            tensor.mul_(1.1)
        torch.testing.assert_close(model(x), _reference(model, delta, x, True), atol=1e-6, rtol=0)
    assert calls[0] == 4
    with torch.no_grad():
        delta.magnitude.mul_(0.9)  # g's numerator is read every call; the norm does not depend on it
    torch.testing.assert_close(model(x), _reference(model, delta, x, True), atol=1e-6, rtol=0)
    assert calls[0] == 4


def test_without_autograd_the_gains_are_cached_until_any_input_changes(monkeypatch) -> None:
    model, delta = _adapted()
    model.eval()
    calls = _count_norms(delta, monkeypatch)
    x = torch.randn(4, 12)
    with torch.no_grad():
        model(x)
        cached = delta.gains(model.proj)
        assert delta.gains(model.proj)[0] is cached[0] and calls[0] == 1  # reused, not rebuilt
        for tensor in (delta.magnitude, delta.lora_A, delta.lora_B, model.proj.base_layer.weight):
            tensor.mul_(1.1)
            torch.testing.assert_close(model(x), _reference(model, delta, x, True), atol=1e-6, rtol=0)
    assert calls[0] == 4  # m changes the gains but not the norm
    y = model(x)  # eval mode with autograd on: m still gets its gradient
    y.sum().backward()
    assert delta.magnitude.grad is not None and delta.magnitude.grad.abs().sum() > 0


def test_factored_norm_equals_the_direct_norm_and_caches_w0() -> None:
    model, delta = _adapted()
    layer = model.proj
    direct = (layer.base_layer.weight + (5 / 3) * delta.lora_B @ delta.lora_A).norm(dim=1)
    torch.testing.assert_close(delta._factored_norm(layer), direct.detach(), rtol=1e-6, atol=0)
    first = delta._w0_cache[1]
    delta._factored_norm(layer)
    assert delta._w0_cache[1] is first  # W0 unchanged: ||W0||^2 reused
    with torch.no_grad():
        layer.base_layer.weight.mul_(2.0)
    direct = (layer.base_layer.weight + (5 / 3) * delta.lora_B @ delta.lora_A).norm(dim=1)
    torch.testing.assert_close(delta._factored_norm(layer), direct.detach(), rtol=1e-6, atol=0)


def test_training_mode_recomputes_the_norm_every_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    model, delta = _adapted()
    model.train()
    calls = _count_norms(delta, monkeypatch)
    x = torch.randn(4, 12)
    model(x), model(x)
    assert calls[0] == 2


def test_merge_keeps_the_bias_and_unmerge_restores_w0() -> None:
    model, delta = _adapted()
    model.eval()
    base = model.proj.base_layer
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    x = torch.randn(4, 12)
    unmerged = model(x)
    lk.merge(model)
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)
    assert torch.equal(base.bias, b0)
    lk.unmerge(model)
    torch.testing.assert_close(base.weight.detach(), w0, atol=1e-6, rtol=0)
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=0)


def test_refuses_embeddings_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="DoRA on embeddings is not supported"):
        lk.apply(OneLinear(), DoRAConfig(target_modules=["embed"]))


def test_config_table_and_peft_dict() -> None:
    assert METHODS["dora"] is DoRAConfig
    d = DoRAConfig(rank=4, alpha=8, target_modules=["q_proj"]).to_peft_dict()
    assert d["use_dora"] is True and d["r"] == 4
    back = config_from_peft(d)
    assert isinstance(back, DoRAConfig) and (back.rank, back.alpha) == (4, 8)


# --- against Hugging Face PEFT ---------------------------------------------------------------


MODELS = {
    "llama": (lambda: tiny_llama(bias=True), ["q_proj", "v_proj", "down_proj"]),
    "gpt2": (tiny_gpt2, ["c_attn", "c_fc", "c_proj"]),
}


def _ids(model: nn.Module) -> torch.Tensor:
    return torch.randint(0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", MODELS)
def test_peft_dora_folder_loads_into_lorakit_with_peft_logits(arch, tmp_path) -> None:
    peft = pytest.importorskip("peft")
    make, targets = MODELS[arch]
    config = peft.LoraConfig(
        r=4, lora_alpha=6, target_modules=targets, use_dora=True, init_lora_weights=False
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it switches fan_in_fan_out on for Conv1D
        reference = peft.get_peft_model(make(), config).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            if "lora_magnitude_vector" in name:  # so that g != 1: PEFT's init makes W' = W0 + s B A
                p.mul_(1 + 0.2 * torch.randn(p.shape, generator=gen))
    ids = _ids(reference)
    expected = reference(ids).logits
    reference.save_pretrained(tmp_path)
    model = make().eval()
    assert isinstance(lk.load_adapter(model, tmp_path), DoRAConfig)
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("init", ["kaiming", "pissa"])
def test_lorakit_dora_folder_loads_in_peft_without_warnings(arch, init, tmp_path, peft_logits) -> None:
    make, targets = MODELS[arch]
    model = make().eval()
    lk.apply(model, DoRAConfig(rank=4, alpha=6, target_modules=targets, init=init))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    ids = _ids(model)
    expected = model(ids).logits
    lk.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["use_dora"] is True
    torch.testing.assert_close(peft_logits(make, tmp_path, ids), expected, atol=1e-5, rtol=0)
