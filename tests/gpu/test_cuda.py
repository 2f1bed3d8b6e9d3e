"""The CUDA path (issue 27): the same library on a GPU, checked against its own CPU results, against
reference math, and against bitsandbytes' CUDA kernels. Every test here is marked `gpu` and skips
cleanly where torch sees no CUDA device (CI); `make test-gpu` runs them on a GPU machine.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import lorakit as lk
from lorakit.models import tiny_llama
from lorakit.quant import dequantize_nf4, quantize_nf4
from lorakit.quant.nf4 import NF4_VALUES
from lorakit.train import TrainConfig, Trainer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
CUDA = torch.device("cuda")


def _samples(n: int, seed: int = 0, vocab: int = 61) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 16, (1,), generator=g))
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        answer = int(torch.randint(1, 5, (1,), generator=g))
        out.append({"input_ids": ids, "labels": [-100] * (length - answer) + ids[length - answer :]})
    return out


def _moved_lora(model: torch.nn.Module, config) -> torch.nn.Module:
    """The adapter applied on the CPU from a fixed seed (A is drawn from the global generator, which
    differs between devices and advances with every draw), its B moved off zero, so the adapter path
    computes something."""
    torch.manual_seed(0)
    lk.apply(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


@pytest.mark.parametrize(
    "config", [lk.LoRAConfig(rank=4, alpha=8), lk.DoRAConfig(rank=4, alpha=8)], ids=["lora", "dora"]
)
def test_adapter_forward_and_gradients_on_cuda_equal_the_cpu_ones(config) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    ids = torch.randint(3, 61, (2, 12), generator=torch.Generator().manual_seed(0))
    grads, logits = {}, {}
    for device in ("cpu", "cuda"):
        model = _moved_lora(tiny_llama(0, vocab_size=61), config).to(device)
        out = model(input_ids=ids.to(device), labels=ids.to(device))
        out.loss.backward()
        logits[device] = out.logits.detach().cpu()
        grads[device] = {n: p.grad.cpu() for n, p in model.named_parameters() if p.requires_grad}
    torch.testing.assert_close(logits["cuda"], logits["cpu"], atol=2e-5, rtol=1e-4)
    assert grads["cpu"] and grads["cuda"].keys() == grads["cpu"].keys()
    for name in grads["cpu"]:
        torch.testing.assert_close(grads["cuda"][name], grads["cpu"][name], atol=1e-5, rtol=1e-3, msg=name)


def test_nf4_on_cuda_is_bit_exact_with_the_cpu_and_with_bitsandbytes_cuda_kernels() -> None:
    weight = torch.randn(768, 512, generator=torch.Generator().manual_seed(0)) * 0.02
    cpu = quantize_nf4(weight, blocksize=64, double_quant=True)
    gpu = quantize_nf4(weight.to(CUDA), blocksize=64, double_quant=True)
    # the 4-bit codes are the same bytes. The double quantization subtracts the mean of the block
    # scales, a sum whose order differs by device (seen on an H200: an ulp apart), so a scale lying
    # on the edge between two 8-bit codes may take the neighbouring one: a step at most, rarely
    assert torch.equal(gpu.packed.cpu(), cpu.packed)
    torch.testing.assert_close(gpu.absmax_offset.cpu(), cpu.absmax_offset, rtol=1e-6, atol=0)
    differ = gpu.absmax.cpu().long() - cpu.absmax.long()
    assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 0.01
    back = dequantize_nf4(gpu, torch.float32)
    same = (differ == 0).repeat_interleave(64)  # values of blocks whose scale code is the same
    torch.testing.assert_close(
        back.cpu().view(-1)[same], dequantize_nf4(cpu, torch.float32).view(-1)[same], rtol=1e-6, atol=0
    )
    # reference math: each value is an NF4 table entry times its block's scale c1, the entry nearest
    # to the weight over its block's absmax
    c1 = gpu.block_scales().cpu()[:, None]
    table = torch.tensor(NF4_VALUES)
    codes = (back.cpu().view(-1, 64) / c1).unsqueeze(-1)
    assert (codes - table).abs().min(-1).values.max() < 1e-6
    blocks = weight.view(-1, 64)
    nearest = ((blocks / blocks.abs().amax(1, keepdim=True)).unsqueeze(-1) - table).abs().argmin(-1)
    assert torch.equal((codes - table).abs().argmin(-1), nearest)

    bnb_f = pytest.importorskip("bitsandbytes.functional")
    from lorakit.quant.nf4 import NF4Tensor

    packed, state = bnb_f.quantize_4bit(
        weight.to(CUDA), blocksize=64, compress_statistics=True, quant_type="nf4"
    )
    assert torch.equal(packed.view(-1), gpu.packed)
    assert torch.equal(state.offset, gpu.absmax_offset) and torch.equal(state.state2.absmax, gpu.absmax_scale)
    # bitsandbytes' state decoded by our code: bitsandbytes' own dequantized values, bit for bit
    theirs = NF4Tensor(
        packed.view(-1), state.absmax, weight.shape, torch.float32, 64, state.state2.absmax, state.offset
    )
    assert torch.equal(dequantize_nf4(theirs), bnb_f.dequantize_4bit(packed, state))
    differ = gpu.absmax.long() - state.absmax.long()  # the 8-bit codes of the block scales
    assert differ.abs().max() <= 1 and (differ != 0).float().mean() < 0.01
    print(f"8-bit scale codes equal to bitsandbytes' CUDA kernel: {(differ == 0).float().mean():.4%}")


def test_qlora_matmul_on_cuda_against_reference_math_and_bitsandbytes() -> None:
    from lorakit.quant.linear import Linear4bit

    torch.manual_seed(0)
    linear = torch.nn.Linear(512, 384, bias=False).to(CUDA)
    layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16)
    x = torch.randn(64, 512, device=CUDA, dtype=torch.bfloat16, requires_grad=True)
    y = layer(x)
    y.float().square().sum().backward()
    weight = layer.dequantize(torch.bfloat16)
    ref_x = x.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x, weight)
    ref.float().square().sum().backward()
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(x.grad, ref_x.grad)
    pytest.importorskip("bitsandbytes")
    bnb_layer = Linear4bit.from_linear(linear, compute_dtype=torch.bfloat16, kernel="bitsandbytes")
    torch.testing.assert_close(bnb_layer(x.detach()), y.detach(), atol=1e-2, rtol=1e-2)


def test_fused_adamw_on_cuda() -> None:
    from lorakit.train.optim import build_optimizer

    p = torch.nn.Parameter(torch.zeros(4, device=CUDA))
    optimizer = build_optimizer([{"params": [p]}], TrainConfig(lr=1e-3), CUDA)
    assert optimizer.defaults.get("fused") is True


@pytest.mark.parametrize(("method", "rel"), [("lora", 1e-4), ("qlora", 2e-2)])
def test_the_trainer_on_cuda_follows_the_cpu_run(tmp_path, method, rel) -> None:
    """Four fp32 optimizer steps on the same samples: the same loss and adapter on both devices.
    QLoRA's NF4 base is the same bytes on both, but its matmuls run in bf16, whose accumulation
    order differs between the CPU and the GPU: a looser bound, and its adapter is not compared."""
    torch.backends.cuda.matmul.allow_tf32 = False
    samples = _samples(16)
    results = {}
    for device in ("cpu", "cuda"):
        model = tiny_llama(0, vocab_size=61)
        config = lk.QLoRAConfig(rank=4, alpha=8) if method == "qlora" else lk.LoRAConfig(rank=4, alpha=8)
        torch.manual_seed(0)  # the same A on both: drawn on the CPU, then moved with the model
        lk.apply(model, config)
        model.to(device)
        cfg = TrainConfig(
            steps=4, batch_size=4, micro_batch_size=2, lr=1e-2, precision="fp32", checkpoint_every=0,
            progress_bar=False, output_dir=str(tmp_path / f"{device}-{len(results)}"),
        )  # fmt: skip
        result = Trainer(model, samples, cfg).train()
        params = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        results[device] = (result.final_loss, params)
    assert results["cuda"][0] == pytest.approx(results["cpu"][0], rel=rel)
    for name, value in results["cpu"][1].items() if method == "lora" else ():
        torch.testing.assert_close(results["cuda"][1][name], value, atol=1e-4, rtol=1e-3, msg=name)


def test_bf16_autocast_is_chosen_on_the_gpu_and_trains(tmp_path) -> None:
    model = tiny_llama(0, vocab_size=61).to(CUDA)
    lk.apply(model, lk.LoRAConfig(rank=4, alpha=8))
    cfg = TrainConfig(steps=3, batch_size=4, micro_batch_size=4, lr=1e-2, checkpoint_every=0,
                      progress_bar=False, output_dir=str(tmp_path / "run"))  # fmt: skip
    trainer = Trainer(model, _samples(8), cfg)
    assert trainer.amp_dtype == torch.bfloat16
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.final_loss))


def test_lorakit_train_runs_on_the_gpu_and_says_so(tiny_run_files, tmp_path) -> None:
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_run_files / "base"), "--data", str(tiny_run_files / "train.jsonl"),
            "--device", "cuda", "--steps", "4", "--batch-size", "2", "--micro-batch-size", "2",
            "--eval-limit", "2", "--general-tokens", "256", "--kl-prompts", "1", "--general-questions", "0",
            "--replay", "none", "--no-progress-bar", "--no-base-eval-cache", "--output-dir", str(out)]  # fmt: skip
    run = subprocess.run(
        [sys.executable, "-m", "lorakit", *args], capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "device: cuda:0" in run.stdout
    assert "precision: bf16 autocast (this GPU computes bf16 natively)" in run.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["device"] == "cuda" and metrics["train"]["steps"] == 4
    # the adapter written on the GPU loads onto the base on the CPU and changes its outputs
    base, _ = lk.load_model(str(tiny_run_files / "base"))
    ids = torch.tensor([[5, 6, 7, 8]])
    before = base(input_ids=ids).logits
    lk.load_adapter(base, out / "adapter")
    after = base(input_ids=ids).logits
    assert after.device.type == "cpu" and not torch.equal(before, after)


def test_bench_cases_on_cuda_synchronise_and_report_the_gpu_memory(tmp_path) -> None:
    from lorakit.bench import run_bench

    cases = ["lora_bf16", "peft_lora_bf16", "qlora_bf16", "nf4", "bnb_nf4", "nf4_matmul", "bnb_nf4_matmul"]
    report = run_bench(suite="all", model="tiny", out_dir=tmp_path, steps=2, warmup=1, cases=cases,
                       verbose=False, device="cuda")  # fmt: skip
    assert not report["failed"], report["failed"]
    train = report["suites"]["train"]
    lora = train["cases"]["lora_bf16"]
    assert lora["device"].startswith("cuda:0") and lora["step_peak_gpu_mb"] > 0
    assert (
        "lora_bf16/peft_lora_bf16" in train["ratios"]
        and "step_peak_gpu" in train["ratios"]["lora_bf16/peft_lora_bf16"]
    )
    assert train["checks"]["lora_bf16 vs peft_lora_bf16"]["first_loss_abs_diff"] < 1e-2
    quant = report["suites"]["quant"]
    # the same 4-bit codes; a block scale's 8-bit code may sit one step from bitsandbytes' (see above)
    assert quant["checks"]["nf4 vs bnb_nf4"]["dequantized_head_max_abs_diff"] < 1e-3
    assert "matmul" in quant["cases"]["nf4_matmul"]
    assert report["machine"]["gpu"]
