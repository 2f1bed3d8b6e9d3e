"""Quantum-PEFT against a dense reference written here (Kronecker products of 2x2 rotations), the
identities of later-methods.md section 3.7 (numbered in the test names), and the LoRA export
through Hugging Face PEFT."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lorakit as lk
from lorakit.methods.quantum import angles_per_factor, circuit_columns, orthonormal_rows, qubits
from lorakit.models import tiny_llama

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18]])


def _ry(t: float) -> torch.Tensor:
    c, s = math.cos(t / 2), math.sin(t / 2)
    return torch.tensor([[c, -s], [s, c]], dtype=torch.float64)


def _kron(*ms: torch.Tensor) -> torch.Tensor:
    out = ms[0]
    for m in ms[1:]:
        out = torch.kron(out, m)
    return out


def _dense(first: torch.Tensor, ladder: torch.Tensor) -> torch.Tensor:
    """The whole 2^q x 2^q circuit, qubit 0 the most significant bit."""
    q, eye = first.shape[0], torch.eye(2, dtype=torch.float64)
    circuit = _kron(*[_ry(float(t)) for t in first])
    for layer in range(ladder.shape[0]):
        for p in range(q - 1):
            bits = [[(i >> (q - 1 - b)) & 1 for b in range(q)] for i in range(2**q)]
            cz = torch.tensor([-1.0 if b[p] and b[p + 1] else 1.0 for b in bits], dtype=torch.float64)
            circuit = torch.diag(cz) @ circuit
            for qubit, angle in ((p, ladder[layer, p, 0]), (p + 1, ladder[layer, p, 1])):
                gates = [eye] * q
                gates[qubit] = _ry(float(angle))
                circuit = _kron(*gates) @ circuit
    return circuit


def _angles(q: int, layers: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    first = (torch.rand(1, q, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
    ladder = (torch.rand(1, layers, q - 1, 2, generator=gen, dtype=torch.float64) * 2 - 1) * math.pi
    return first, ladder


@pytest.mark.parametrize(("q", "layers", "k"), [(1, 1, 1), (2, 1, 2), (3, 2, 3), (4, 2, 5), (5, 3, 4)])
def test_1_the_circuit_equals_the_dense_kronecker_product(q, layers, k) -> None:
    first, ladder = _angles(q, layers)
    ours = circuit_columns(first, ladder, k)[0]
    torch.testing.assert_close(ours, _dense(first[0], ladder[0])[:, :k], rtol=0, atol=1e-12)


def test_2_the_factors_are_orthonormal() -> None:
    first, ladder = _angles(6, 2)
    columns = circuit_columns(first, ladder, 8)
    eye = torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(columns[0].T @ columns[0], eye, rtol=0, atol=1e-12)  # 64 = 2^6: exact
    qr = orthonormal_rows(columns, 48, "qr")[0]
    torch.testing.assert_close(qr.T @ qr, eye, rtol=0, atol=1e-12)  # 48 rows of 64, re-orthonormalised
    truncated = orthonormal_rows(columns, 48, "truncate")[0]
    assert (truncated.T @ truncated - eye).abs().max() > 1e-3  # documented: not orthonormal


def test_3_the_parameter_count_is_the_formula() -> None:
    model = lk.apply(tiny_llama(), lk.QuantumPEFTConfig(rank=4, layers=3))
    expected = 0
    for _, module in model.named_modules():
        if isinstance(module, lk.AdaptedLayer):
            expected += (
                angles_per_factor(module.out_features, 3) + angles_per_factor(module.in_features, 3) + 4
            )
    assert lk.trainable_parameters(model)[0] == expected
    assert (
        angles_per_factor(576, 2) == 46 and angles_per_factor(1536, 1) == 31 and qubits(192) == 8
    )  # the table


def test_4_base_at_init_and_the_first_gradients_reach_only_lambda() -> None:
    model = tiny_llama()
    with torch.no_grad():
        base = model(input_ids=IDS).logits
    lk.apply(model, lk.QuantumPEFTConfig(rank=4, layers=2))
    out = model(input_ids=IDS).logits
    torch.testing.assert_close(out, base, rtol=0, atol=0)
    out.float().pow(2).mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            moved = float(p.grad.abs().max()) if p.grad is not None else 0.0
            assert (moved > 0) == name.endswith("lam"), name
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("lam"):
                p.fill_(0.3)
    model.zero_grad()
    model(input_ids=IDS).logits.float().pow(2).mean().backward()
    assert all(float(p.grad.abs().max()) > 0 for p in model.parameters() if p.requires_grad)


def _trained(config: lk.QuantumPEFTConfig | None = None) -> torch.nn.Module:
    model = lk.apply(tiny_llama(bias=True), config or lk.QuantumPEFTConfig(rank=4, layers=2, alpha=2.0))
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model.eval()


def test_5_merge_equals_unmerged_and_unmerge_restores() -> None:
    model = _trained()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = model(input_ids=IDS).logits
        lk.merge(model)
        torch.testing.assert_close(model(input_ids=IDS).logits, unmerged, rtol=1e-5, atol=1e-5)
        lk.unmerge(model)
    for name, p in model.named_parameters():
        if name in weights:
            torch.testing.assert_close(p, weights[name], rtol=0, atol=1e-6)


def test_5_the_layer_is_the_formula() -> None:
    model = _trained()
    layer = model.model.layers[1].mlp.down_proj
    delta = layer.adapters["default"]
    u, v = delta.factors()
    x = torch.randn(3, layer.in_features)
    expected = layer.base_layer(x) + delta.scale * ((x @ v) * delta.lam) @ u.T
    with torch.no_grad():
        model(input_ids=IDS)  # a decoder call sets the context the layer reads
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_6_the_batched_build_equals_each_layer_alone_and_checkpointing_keeps_gradients(
    checkpointing_grads,
) -> None:
    from lorakit.core.context import holder_of

    model = _trained()
    with torch.no_grad():
        model(input_ids=IDS)
    built = holder_of(model).current.values["default"]
    for module in model.modules():
        if isinstance(module, lk.AdaptedLayer):
            delta = module.adapters["default"]
            for ours, alone in zip(built[id(delta)], delta.factors(), strict=True):
                torch.testing.assert_close(ours, alone, rtol=0, atol=0)
    plain, checkpointed = checkpointing_grads(_trained, IDS)
    for a, b in zip(plain, checkpointed, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_7_periodicity_of_the_angles() -> None:
    first, ladder = _angles(4, 2)
    base = circuit_columns(first, ladder, 3)
    torch.testing.assert_close(circuit_columns(first + 4 * math.pi, ladder, 3), base, rtol=0, atol=1e-12)
    shifted = first.clone()
    shifted[0, 0] += 2 * math.pi  # one rotation's sign flips: the whole factor flips
    torch.testing.assert_close(circuit_columns(shifted, ladder, 3), -base, rtol=0, atol=1e-12)
    model = _trained()
    layer = model.model.layers[0].self_attn.q_proj
    delta = layer.adapters["default"]
    before = delta.delta_weight()
    with torch.no_grad():
        delta.theta_u_first[0] += 2 * math.pi
        delta.theta_v_first[0] += 2 * math.pi
    torch.testing.assert_close(delta.delta_weight(), before, rtol=0, atol=1e-6)  # both flip: dW unchanged


def test_eval_factors_are_cached_until_an_angle_changes(monkeypatch) -> None:
    from lorakit.methods import quantum

    model = _trained()
    calls = {"n": 0}
    real = quantum.circuit_columns

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(quantum, "circuit_columns", counting)
    with torch.no_grad():
        first = model(input_ids=IDS).logits
        built = calls["n"]
        assert built > 0
        again = model(input_ids=IDS).logits
        assert calls["n"] == built  # cached
        model.model.layers[0].self_attn.q_proj.adapters["default"].theta_u_first[0] += 0.5
        changed = model(input_ids=IDS).logits
        assert calls["n"] > built  # rebuilt
    torch.testing.assert_close(again, first, rtol=0, atol=0)
    assert not torch.allclose(changed, first)


def test_save_and_load_rebuild_the_identical_factors(tmp_path) -> None:
    model = _trained(lk.QuantumPEFTConfig(rank=4, layers=2, alpha=2.0, nonpow2="truncate", seed=3))
    lk.save_adapter(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "QUANTUM_PEFT" and saved["ansatz"] == "ry_cz_ladder"
    assert saved["circuit_layers"] == 2 and saved["nonpow2"] == "truncate"
    other = tiny_llama(bias=True)
    config = lk.load_adapter(other, tmp_path)
    assert (config.rank, config.layers, config.alpha, config.nonpow2, config.seed) == (
        4,
        2,
        2.0,
        "truncate",
        3,
    )
    with torch.no_grad():
        torch.testing.assert_close(other(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=0)


def test_the_lora_export_gives_peft_our_outputs(tmp_path, peft_logits) -> None:
    model = _trained()
    lk.export_lora(model, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == saved["lora_alpha"] == 4
    with torch.no_grad():
        ours = model(input_ids=IDS).logits
    theirs = peft_logits(lambda: tiny_llama(bias=True), tmp_path, IDS)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    lora = tiny_llama(bias=True)
    lk.load_adapter(lora, tmp_path)  # and lorakit reads the export as a plain LoRA
    with torch.no_grad():
        torch.testing.assert_close(lora(input_ids=IDS).logits, ours, rtol=1e-4, atol=1e-5)


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="rank K=40 is larger than .*smaller dimension"):
        lk.apply(tiny_llama(), lk.QuantumPEFTConfig(rank=40))
    with pytest.raises(ValueError, match="layers \\(L\\) must be at least 1"):
        lk.QuantumPEFTConfig(layers=0)
    with pytest.raises(ValueError, match="nonpow2 must be one of"):
        lk.QuantumPEFTConfig(nonpow2="pad")


def test_train_and_export_on_the_command_line(tmp_path, peft_logits) -> None:
    from lorakit.cli import main
    from lorakit.models import tiny_tokenizer

    folder = tmp_path / "model"
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}?", "completion": f"a{i}"}) + "\n" for i in range(6)))
    main(["train", "--model", str(folder), "--method", "quantum", "--rank", "4", "--circuit-layers", "1",
          "--data", str(data), "--steps", "3", "--batch-size", "2", "--micro-batch-size", "2", "--skip-eval",
          "--no-progress-bar", "--output-dir", str(tmp_path / "run")])  # fmt: skip
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (saved["r"], saved["circuit_layers"], saved["alpha"]) == (
        4,
        1,
        1.0,
    )  # alpha: Quantum-PEFT's default
    main(
        [
            "export",
            "--model",
            str(folder),
            "--adapter",
            str(tmp_path / "run" / "adapter"),
            "--out",
            str(tmp_path / "lora"),
        ]
    )
    trained = tiny_llama()
    lk.load_adapter(trained, tmp_path / "run" / "adapter")
    with torch.no_grad():
        ours = trained(input_ids=IDS).logits
    assert not torch.allclose(ours, tiny_llama()(input_ids=IDS).logits)  # it trained
    torch.testing.assert_close(peft_logits(tiny_llama, tmp_path / "lora", IDS), ours, rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit, match="--use-rslora does not apply to --method quantum"):
        main(["train", "--method", "quantum", "--use-rslora"])
