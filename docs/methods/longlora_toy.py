"""The toy model of docs/methods/longlora.md's extension study: a small Llama pretrained from scratch
at a 256-token window on the Wikipedia training articles, which the study's arms then extend 4x.

    .venv/bin/python docs/methods/longlora_toy.py OUT [--steps 1200]

writes OUT/toy-256 (a model folder with its own 4,096-token BPE tokenizer, trained on the same
articles: the default model's 49k-token head would cost more than the whole toy body) and
OUT/toy-256-pi4 (the same weights with linear position interpolation x4 in its config: the base of
the full fine-tuning arm, whose method has no --context of its own). Held-out articles are never seen.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import lorakit as lk
from lorakit.data import collate
from lorakit.long.documents import document_ids, pack, split, wiki_articles
from lorakit.long.positions import extend_context
from lorakit.train import TrainConfig, Trainer

WINDOW = 256
EOS = "<|endoftext|>"


def train_tokenizer(texts: list[str], size: int = 4096) -> PreTrainedTokenizerFast:
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    from tokenizers import decoders

    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=size, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, pad_token=EOS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    torch.manual_seed(0)
    train_docs, _ = split(wiki_articles())
    tokenizer = train_tokenizer([d.title + "\n\n" + d.text for d in train_docs])
    rows = pack(document_ids(tokenizer, train_docs), WINDOW)
    print(f"tokenizer: {len(tokenizer)} tokens; {len(rows)} rows of {WINDOW} ({len(rows) * WINDOW:,} tokens)")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=WINDOW,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config)
    lk.apply(model, lk.FullFinetuneConfig())
    train_cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch,
        micro_batch_size=args.batch,
        lr=args.lr,
        warmup_ratio=0.05,
        output_dir=str(args.out / "pretrain"),
        checkpoint_every=0,
        progress_bar=False,
        log_every=50,
    )
    started = time.perf_counter()
    result = Trainer(model, rows, train_cfg, collate, tokenizer.pad_token_id, log=print).train()
    model = lk.unload(model)
    print(
        f"pretrained {result.steps} steps in {time.perf_counter() - started:.0f} s, final loss {result.final_loss:.3f}"
    )
    folder = args.out / "toy-256"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    extend_context(model, 4 * WINDOW, "linear")
    model.save_pretrained(args.out / "toy-256-pi4")
    tokenizer.save_pretrained(args.out / "toy-256-pi4")
    record = {
        "steps": result.steps,
        "final_loss": result.final_loss,
        "seconds": round(time.perf_counter() - started),
    }
    (args.out / "pretrain.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
