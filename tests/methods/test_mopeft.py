"""The routed mixture (later-methods.md section 4.5): base at init; forced gates reduce to single
methods; causality, with UniPELT's sequence mean as the negative control; cached decoding equals a
full forward; gate ranges; the balancing loss on hand-made router outputs; save/load; merge refused;
the balancing term reaching the routers through the trainer."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit.core.model import adapter_deltas
from lorakit.methods.mopeft import MixtureDelta, balance_loss, force_gates, gate_means
from lorakit.models import tiny_llama

IDS = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(0))


def _moved(model: torch.nn.Module, seed: int = 1, std: float = 0.2) -> torch.nn.Module:
    """Every trainable tensor moved, as after training (experts and routers non-zero)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(std * torch.randn(p.shape, generator=gen))
    return model


def _mixture(seed: int = 1, **config: object) -> torch.nn.Module:
    torch.manual_seed(seed)  # LoRA's A, the adapters' down-projections and the prefix slots draw from it
    model = tiny_llama().eval()
    settings = {"experts": "lora,adapter,prefix", "activation": "tanh", "num_virtual_tokens": 4, **config}
    lk.apply(model, lk.MoPEFTConfig(**settings))
    return _moved(model, seed)


@pytest.mark.parametrize("gate", ["sigmoid", "softmax", "topk"])
def test_starts_as_the_base_model(gate: str) -> None:
    model = tiny_llama().eval()
    base = model(IDS).logits
    lk.apply(model, lk.MoPEFTConfig(experts="lora,adapter,prefix", gate=gate))
    torch.testing.assert_close(model(IDS).logits, base, rtol=0, atol=0)


def _copy_expert(model: torch.nn.Module, expert: str, into: torch.nn.Module) -> None:
    """The mixture's `expert` tensors into a plain single-method adapter on `into`."""
    state = {
        p: d.experts[expert].export_state()
        for p, _, d in adapter_deltas(model, "default")
        if expert in d.experts
    }
    for path, _, delta in adapter_deltas(into, "default"):
        delta.import_state(state[path])


def test_forced_gates_reduce_to_each_single_method() -> None:
    model = _mixture()
    lora = tiny_llama().eval()
    lk.apply(lora, lk.LoRAConfig(rank=8, alpha=16))
    _copy_expert(model, "lora", lora)
    adapter = tiny_llama().eval()
    lk.apply(adapter, lk.AdapterConfig(size=64, activation="tanh"))
    _copy_expert(model, "adapter", adapter)
    base = tiny_llama().eval()(IDS).logits
    with force_gates(model, {"lora": 1.0, "adapter": 0.0}):
        torch.testing.assert_close(model(IDS).logits, lora(IDS).logits, rtol=0, atol=1e-6)
    with force_gates(model, {"lora": 0.0, "adapter": 1.0}):
        torch.testing.assert_close(model(IDS).logits, adapter(IDS).logits, rtol=0, atol=1e-6)
    with force_gates(model, {"lora": 0.0, "adapter": 0.0, "prefix": 0.0}):
        torch.testing.assert_close(model(IDS).logits, base, rtol=0, atol=1e-6)
    with force_gates(model, {"prefix": 1.0}):  # the prefix expert alone moves the model
        assert (model(IDS).logits - base).abs().max() > 1e-3
    routed = model(IDS).logits  # the gates are back after the block
    assert (routed - base).abs().max() > 1e-3 and (routed - lora(IDS).logits).abs().max() > 1e-3
    with pytest.raises(ValueError, match="no expert named"), force_gates(model, {"ia3": 1.0}):
        pass


@pytest.mark.parametrize("pooling", ["token", "sequence_mean"])
def test_causality_and_the_unipelt_mean_as_negative_control(pooling: str) -> None:
    model = _mixture(pooling=pooling)
    changed = IDS.clone()
    changed[:, 7] = (changed[:, 7] + 5) % 200
    before, after = model(IDS).logits, model(changed).logits
    earlier_moved = (before[:, :7] - after[:, :7]).abs().max()
    if pooling == "token":
        torch.testing.assert_close(after[:, :7], before[:, :7], rtol=0, atol=1e-6)
        assert (before[:, 7:] - after[:, 7:]).abs().max() > 1e-3
    else:  # the mean over the sequence lets token 7 reach positions 0..6
        assert earlier_moved > 1e-4


@pytest.mark.parametrize("gate", ["sigmoid", "topk"])
def test_cached_decoding_equals_a_full_forward(gate: str) -> None:
    model = _mixture(gate=gate, top_k=1)
    full = model(IDS).logits
    out = model(IDS[:, :6], use_cache=True)
    steps, cache = [out.logits], out.past_key_values
    for t in range(6, IDS.shape[1]):
        out = model(IDS[:, t : t + 1], past_key_values=cache, use_cache=True)
        steps.append(out.logits)
        cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)


def test_gate_ranges() -> None:
    for gate, k in (("sigmoid", 1), ("softmax", 1), ("topk", 2)):
        model = _mixture(gate=gate, top_k=k)
        delta = next(d for _, _, d in adapter_deltas(model, "default") if len(d.experts) == 2)
        prefix = next(d for _, _, d in adapter_deltas(model, "default") if d.prefix is not None)
        delta.train()
        prefix.train()
        with torch.enable_grad():
            gates = delta.gates(torch.randn(3, 5, delta.router_weight.shape[1]))
            g = prefix.prefix_gates(prefix.prefix, torch.randn(3, 5, prefix.prefix.router_weight.shape[1]))
        assert gates.shape == (3, 5, 2) and g.shape == (3, 5, 1)
        if gate == "sigmoid":  # independent gates, nothing recorded for a balancing loss
            assert ((gates > 0) & (gates < 1)).all() and ((g > 0) & (g < 1)).all()
            assert delta.record is None and prefix.prefix.record is None
            continue
        probs, kept = delta.record  # 2 experts + the null slot
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 5))
        assert probs.shape[-1] == 3
        if gate == "topk":
            assert ((probs * kept) > 0).sum(-1).eq(2).all() and kept.sum(-1).eq(2).all()
        probs, kept = prefix.prefix.record  # the prefix and its null slot
        assert probs.shape[-1] == 2
        torch.testing.assert_close(probs.sum(-1), torch.ones(3, 5))


def test_balance_loss_on_hand_made_router_outputs() -> None:
    s = 4
    uniform = torch.full((8, s), 1 / s)
    spread = torch.eye(s).repeat(2, 1)  # every slot kept by 2 of 8 tokens
    assert float(balance_loss(uniform, spread, "topk")) == pytest.approx(1.0)  # the minimum
    one_hot = torch.zeros(8, s)
    one_hot[:, 0] = 1
    assert float(balance_loss(one_hot, one_hot, "topk")) == pytest.approx(s)  # all on one slot
    skewed = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)  # f = (1, 0, 0, 0), P = (.7, .1, .1, .1)
    assert float(balance_loss(skewed, one_hot, "topk")) == pytest.approx(s * 0.7)
    assert float(balance_loss(uniform, torch.ones(8, s), "softmax")) == pytest.approx(0.0)
    importance = skewed.sum(0)  # CV^2 of the summed probabilities
    expected = importance.var(unbiased=False) / importance.mean() ** 2
    assert float(balance_loss(skewed, torch.ones(8, s), "softmax")) == pytest.approx(float(expected))


def test_save_load_identical_and_merge_refused(tmp_path) -> None:
    model = _mixture(gate="topk", top_k=2, experts="dora,adapter,prefix")
    expected = model(IDS).logits
    lk.save_adapter(model, tmp_path / "mix")
    config = json.loads((tmp_path / "mix" / "adapter_config.json").read_text())
    assert config["peft_type"] == "MOPEFT" and config["experts"] == ["dora", "adapter", "prefix"]
    assert config["num_virtual_tokens"] == 4
    loaded = tiny_llama().eval()
    lk.load_adapter(loaded, tmp_path / "mix")
    torch.testing.assert_close(loaded(IDS).logits, expected, rtol=0, atol=0)
    with pytest.raises(lk.NotMergeableError, match="not a fixed weight change"):
        lk.merge(loaded)
    torch.testing.assert_close(loaded(IDS).logits, expected, rtol=0, atol=0)


def test_the_balancing_loss_trains_the_routers_through_the_trainer(tmp_path) -> None:
    from lorakit.train import TrainConfig, Trainer

    gen = torch.Generator().manual_seed(0)
    samples = [{"input_ids": torch.randint(3, 200, (9,), generator=gen).tolist()} for _ in range(4)]
    for s in samples:
        s["labels"] = [-100] * 4 + s["input_ids"][4:]
    model = tiny_llama()
    lk.apply(model, lk.MoPEFTConfig(experts="lora,adapter,prefix", gate="topk", top_k=1, balance_weight=0.5))
    _moved(model)
    deltas = list(adapter_deltas(model, "default"))
    prefixes = {p: d.prefix.router_weight.detach().clone() for p, _, d in deltas if d.prefix is not None}
    routers = {p: d.router_weight.detach().clone() for p, _, d in deltas if d.experts}
    config = TrainConfig(
        steps=2, batch_size=4, micro_batch_size=2, lr=1e-2, precision="fp32", checkpoint_every=0,
        progress_bar=False, output_dir=str(tmp_path / "run"),
    )  # fmt: skip
    result = Trainer(model, samples, config, hooks=lk.training_hooks(model)).train()
    record = json.loads(result.log_path.read_text().splitlines()[0])
    assert record["balance"] > 0 and record["loss"] == pytest.approx(record["task_loss"] + record["balance"])
    moved = [
        p
        for p, _, d in adapter_deltas(model, "default")
        if p in routers and not torch.equal(d.router_weight, routers[p])
    ]
    assert len(moved) == len(routers)
    after = {p: d.prefix.router_weight for p, _, d in adapter_deltas(model, "default") if d.prefix}
    assert len(prefixes) == 2 and not any(torch.equal(after[p], prefixes[p]) for p in prefixes)


def test_checkpointing_gives_the_same_gradients(checkpointing_grads) -> None:
    def make() -> torch.nn.Module:
        return _mixture(gate="softmax")

    plain, checkpointed = checkpointing_grads(make, IDS)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_gate_means_per_layer_and_expert() -> None:
    model = _mixture()
    means = gate_means(model, IDS, torch.ones_like(IDS))
    mixed = [p for p, _, d in adapter_deltas(model, "default") if isinstance(d, MixtureDelta)]
    assert set(means) == set(mixed)
    assert set(means["model.layers.0.mlp.down_proj"]) == {"lora", "adapter"}
    assert set(means["model.layers.0.self_attn.o_proj"]) == {"lora", "adapter", "prefix"}
    assert set(means["model.layers.0.self_attn.q_proj"]) == {"lora"}
    assert all(0 < v < 1 for m in means.values() for v in m.values())


def test_bad_configurations_are_refused() -> None:
    for bad, says in (
        ({"experts": "lora,prompt"}, "prompt cannot be a mixture expert"),
        ({"num_virtual_tokens": 0}, "num_virtual_tokens"),
        ({"experts": "lora,dora"}, "pick one of them"),
        ({"experts": "lora,lora"}, "different methods"),
        ({"experts": "lora,ia3"}, "unknown expert 'ia3'"),
        ({"gate": "max"}, "gate must be one of"),
        ({"top_k": 0}, "top_k"),
    ):
        with pytest.raises(ValueError, match=says):
            lk.MoPEFTConfig(**bad)  # type: ignore[arg-type]


def test_the_command_line_builds_it_and_refuses_a_bad_expert_in_one_line() -> None:
    from lorakit.cli import _options, _run_fields, build_parser, main
    from lorakit.options import method_config, split_options

    args = build_parser().parse_args(
        ["train", "--method", "mopeft", "--experts", "dora,adapter", "--gate", "topk", "--top-k", "2"]
    )
    run, _ = split_options(_options(args, _run_fields()))
    config = method_config(run)
    assert config.experts == ("dora", "adapter") and config.gate == "topk" and config.top_k == 2
    assert config.rank == 16 and config.alpha == 32  # `lorakit train`'s LoRA defaults
    with pytest.raises(SystemExit) as stop:
        main(["train", "--method", "mopeft", "--experts", "lora,prompt", "--steps", "1"])
    assert "prompt cannot be a mixture expert" in str(stop.value) and "\n" not in str(stop.value)


def test_targets_outside_the_linear_layers_are_refused_not_dropped() -> None:
    model = tiny_llama()
    with pytest.raises(ValueError, match="embed_tokens is not one of them: remove it from --target-modules"):
        lk.apply(model, lk.MoPEFTConfig(experts="lora", target_modules=["q_proj", "embed_tokens"]))
    assert not lk.core.model.registry(model).configs


def test_the_prefix_branch_is_the_reference_math() -> None:
    """o = attention(q, K, V) + beta * g(v_t) * softmax(q P_K^T / sqrt(d)) P_V, per token and head,
    with grouped key/value heads, through the registered attention function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from lorakit.methods import gated_prefix

    model = _mixture(gate="sigmoid")
    attention = model.model.layers[1].self_attn
    mixture = attention.o_proj.adapters["default"]
    prefix = mixture.prefix
    gen = torch.Generator().manual_seed(3)
    b, heads, kv_heads, n, d = 2, 4, 2, 6, 8
    q, k, v = (torch.randn(b, h, n, d, generator=gen) for h in (heads, kv_heads, kv_heads))
    out, _ = gated_prefix.attention_forward(attention, q, k, v, None, scaling=d**-0.5, is_causal=True)
    base, _ = sdpa_attention_forward(attention, q, k, v, None, scaling=d**-0.5, is_causal=True)
    expected = base.clone()  # (b, n, heads, d)
    for bi in range(b):
        for t in range(n):
            token = v[bi, :, t].reshape(-1)  # the token's value vector, all key/value heads
            g = torch.sigmoid(prefix.router_weight[0] @ token + prefix.router_bias[0])
            for h in range(heads):
                keys, values = prefix.prefix_key[h // 2], prefix.prefix_value[h // 2]
                p = torch.softmax(keys @ q[bi, h, t] / d**0.5, dim=0)
                expected[bi, t, h] += prefix.scale[h] * g * (p @ values)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert (out - base).abs().max() > 1e-3


def test_a_prefix_that_did_not_run_is_an_error_not_a_silent_base() -> None:
    model = _mixture()
    model.set_attn_implementation("sdpa")  # someone switched attention after applying the mixture
    with pytest.raises(RuntimeError, match="prefix expert did not run.*use_gated_prefix_attention"):
        model(IDS)
    from lorakit.methods.gated_prefix import use_gated_prefix_attention

    use_gated_prefix_attention(model)
    model(IDS)


def test_the_trainer_switches_the_wrapped_attention_to_its_cpu_kernel() -> None:
    from lorakit.train.attention import INNER
    from lorakit.train.fast import prepare_for_training

    model = _mixture()
    assert model.config._attn_implementation == "lorakit_mopeft"
    prepare_for_training(model, None, compile="off")
    assert model.config._attn_implementation == "lorakit_mopeft" and getattr(model.config, INNER) == "lorakit"


def test_a_gated_lora_expert_is_its_output_times_the_gate() -> None:
    """LoRA applies the gate to its rank-r activation: the same as scaling its output, in fp32 and
    (to bf16 rounding) under autocast; the default `Delta.gated` scales the output."""
    model = _mixture()
    layer = model.model.layers[0].mlp.down_proj
    lora = layer.adapters["default"].experts["lora"]
    adapter = layer.adapters["default"].experts["adapter"]
    x = torch.randn(2, 5, layer.in_features)
    gate = torch.rand(2, 5, 1)
    base = layer.base_layer(x)
    for expert in (lora, adapter):
        torch.testing.assert_close(expert.gated(x, base, layer, gate), expert(x, base, layer) * gate)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = lora.gated(x, base, layer, gate)
        want = lora(x, base, layer) * gate
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
