"""One training process of tests/train/test_distributed.py: run alone (1 process) or under torchrun.

    python ddp_worker.py OUT METHOD [--steps N] [--batch B] [--micro M] [--resume] [--stop-after K]
    [--checkpointing] [--fsdp] [--eval-every K] [--compile]

Trains a tiny Llama with METHOD (a key of CONFIGS) on fixed samples and writes, per rank,
OUT/params-<rank>.pt (the trainable tensors at the end) and, at exit, OUT/left-<rank>.txt: whether
the process group was already destroyed when the interpreter began to shut down. `--stop-after K` raises after step K (an
interruption), after the checkpoint of that step. `--eval-every K` evaluates the loss of 4 fixed
samples every K steps (rank 0 alone, as the trainer does); the values land in OUT/log.jsonl."""

from __future__ import annotations

import argparse
import atexit
import os
import random

import torch

import lorakit as lk
from lorakit.models import tiny_llama
from lorakit.train import TrainConfig, Trainer

VOCAB = 64


def samples(n: int) -> list[dict]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        length = rng.randint(5, 16)
        answer = rng.randint(1, min(8, length - 1))
        ids = [rng.randrange(3, VOCAB) for _ in range(length)]
        out.append({"input_ids": ids, "labels": [-100] * (length - answer) + ids[length - answer :]})
    return out


def held_out(model) -> float:  # noqa: ANN001
    ids = torch.tensor([s["input_ids"][:5] for s in samples(36)[32:]])
    return float(model(input_ids=ids, labels=ids).loss)


class Stop:
    def __init__(self, after: int) -> None:
        self.after = after

    def on_step_end(self, model, step, total_steps):  # noqa: ANN001, ANN201
        if step + 1 == self.after:
            raise KeyboardInterrupt(f"stopped after step {self.after}")


CONFIGS = {
    "lora": lambda: lk.LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": lambda: lk.DoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "adapter": lambda: lk.AdapterConfig(size=8),
    "mopeft": lambda: lk.MoPEFTConfig(experts="lora,adapter", gate="topk", top_k=1, rank=4, alpha=8, size=8),
    "qlora": lambda: lk.QLoRAConfig(rank=4, alpha=8, compute_dtype="float32", blocksize=32),
    "longlora": lambda: lk.LongLoRAConfig(rank=4, s2_ratio=0),  # LoRA q/k/v/o + embedding and norms whole
    "adalora": lambda: lk.AdaLoRAConfig(
        target_rank=2, init_rank=4, alpha=8, target_modules=["q_proj", "v_proj"]
    ),
    "alora": lambda: lk.ALoRAConfig(
        rank=4, alpha=8, target_modules=["q_proj", "v_proj"], invocation_tokens=[5]
    ),
    "quantum": lambda: lk.QuantumPEFTConfig(rank=4, target_modules=["q_proj", "v_proj"]),
    "prompt": lambda: lk.PromptTuningConfig(num_virtual_tokens=4),
    "prefix": lambda: lk.PrefixTuningConfig(num_virtual_tokens=4),
    "norm": lambda: lk.NormTuningConfig(),
    "full": lambda: lk.FullFinetuneConfig(),
}


def _record_exit(out: str, rank: int) -> None:
    with open(os.path.join(out, f"left-{rank}.txt"), "w") as f:
        f.write("joined" if torch.distributed.is_initialized() else "left")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("method", choices=sorted(CONFIGS))
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-after", type=int, default=0)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--fsdp", action="store_true")
    parser.add_argument(
        "--compile", action="store_true", help="compiled decoder layers (lorakit's fast path)"
    )
    parser.add_argument("--eval-every", type=int, default=0)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    atexit.register(_record_exit, args.out, rank)  # registered first, so it runs after lorakit's
    torch.manual_seed(0)
    model = tiny_llama(0, vocab_size=VOCAB)
    lk.apply(model, CONFIGS[args.method]())
    config = TrainConfig(
        steps=args.steps, batch_size=args.batch, micro_batch_size=args.micro, lr=1e-2, precision="fp32",
        output_dir=args.out, checkpoint_every=2, keep_checkpoints=0, progress_bar=False, seed=0,
        resume=args.resume, gradient_checkpointing=args.checkpointing, fast_kernels=args.compile, fsdp=args.fsdp, compile="on" if args.compile else "off",
        eval_every=args.eval_every,
    )  # fmt: skip
    hooks = lk.training_hooks(model) + ([Stop(args.stop_after)] if args.stop_after else [])
    try:
        Trainer(
            model, samples(32), config, hooks=hooks, eval_fn=held_out if args.eval_every else None
        ).train()
    except KeyboardInterrupt:
        return  # interrupted: the checkpoint is what counts (under FSDP2 the model is left sharded)
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if any(hasattr(p, "full_tensor") for p in trained.values()):
        raise SystemExit("the trained model is still sharded after train()")
    torch.save(trained, os.path.join(args.out, f"params-{rank}.pt"))


if __name__ == "__main__":
    main()
