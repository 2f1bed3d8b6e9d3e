"""Long-document runs (lorakit.long): the Wikipedia corpus, packing, long perplexity against reference
math, and `lorakit train --method longlora --context N` end to end on a tiny model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lorakit.cli import main
from lorakit.long import documents
from lorakit.long.documents import Document, pack, split, strip_wiki_markup
from lorakit.long.evaluate import long_perplexity, token_nlls
from lorakit.models import tiny_llama, tiny_tokenizer

WIKI = """Intro with '''bold''' and ''italic'' and a [[Link target|label]] and [[Plain]].<ref>cite</ref>
{{Infobox person|name={{nested|x}}|born=1900}}
== History ==
Text with <!-- hidden --> a [[File:x.jpg|thumb|A caption with [[inner]] link]] file and [http://e.org site].
{| class="wikitable"
| cell
|}
* listed item &amp; more
[[Category:Things]]
[[de:Ding]]
[[Wikt:word|a word]] here."""


def test_markup_is_stripped_to_prose() -> None:
    text = strip_wiki_markup(WIKI)
    assert text == (
        "Intro with bold and italic and a label and Plain.\n\nHistory\nText with  a  file and site.\n\n"
        "listed item & more\n\na word here."
    )


def test_packing_makes_whole_rows_of_labels() -> None:
    rows = pack(list(range(23)), 5)
    assert [r.input_ids for r in rows] == [list(range(i, i + 5)) for i in range(0, 20, 5)]
    assert all(r.labels == r.input_ids for r in rows)
    with pytest.raises(ValueError, match="fewer than one row of 30"):
        pack(list(range(23)), 30)


def test_split_is_disjoint_and_deterministic() -> None:
    docs = [Document(f"t{i:02d}", "x") for i in range(24)]
    train, held = split(docs)
    assert len(held) == 3 and not set(held) & set(train) and len(train) + len(held) == 24
    assert split(docs) == (train, held)


needs_wiki = pytest.mark.skipif(
    not documents.wiki_path_exists(), reason=f"gensim's Wikipedia test dump is missing: {documents.INSTALL}"
)


@needs_wiki
def test_the_wikipedia_corpus() -> None:
    docs = documents.wiki_articles()
    assert len(docs) >= 90 and [d.title for d in docs] == sorted(d.title for d in docs)
    assert sum(len(d.text) for d in docs) > 2_500_000
    assert not any("[[" in d.text or "{{" in d.text or "<ref" in d.text for d in docs)
    aristotle = next(d for d in docs if d.title == "Aristotle")
    assert "Greek philosopher" in aristotle.text[:400]


def test_long_perplexity_is_the_reference_mean_nll() -> None:
    model = tiny_llama().eval()
    ids = torch.randint(
        0, model.config.vocab_size, (64,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    nll = token_nlls(model, torch.tensor(ids[:32]))
    logits = model(torch.tensor([ids[:32]])).logits[0, :-1]
    reference = F.cross_entropy(logits, torch.tensor(ids[1:32]), reduction="none")
    torch.testing.assert_close(nll, reference, atol=1e-5, rtol=0)
    result = long_perplexity(model, ids, [16, 32], window=16, budget=64)
    rows = torch.stack([token_nlls(model, torch.tensor(ids[i : i + 32])) for i in (0, 32)])
    assert result["32"]["rows"] == 2 and result["16"]["rows"] == 4
    assert math.isclose(result["32"]["ppl"], math.exp(rows.mean().item()), rel_tol=1e-6)
    assert math.isclose(result["32"]["ppl_past_window"], math.exp(rows[:, 15:].mean().item()), rel_tol=1e-6)
    assert math.isclose(result["32"]["ppl_last_quarter"], math.exp(rows[:, -8:].mean().item()), rel_tol=1e-6)
    assert "ppl_past_window" not in result["16"]


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


@needs_wiki
def test_longlora_run_end_to_end(base_dir, tmp_path) -> None:
    out = tmp_path / "run"
    main(
        [
            "train",
            "--model",
            str(base_dir),
            "--method",
            "longlora",
            "--context",
            "1024",
            "--steps",
            "2",
            "--long-eval-tokens",
            "1024",
            "--output-dir",
            str(out),
            "--no-progress-bar",
        ]
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["window"] == {"original": 512, "trained": 1024, "now": 1024}
    assert set(metrics["after"]["perplexity"]) == {"512", "1024"}
    assert set(metrics["after"]["passkey"]["1024"]["by_depth"]) == {"0.1", "0.5", "0.9"}
    assert metrics["train"]["steps"] == 2 and metrics["run"]["task"] == "wiki"
    record = json.loads((out / "adapter" / "context.json").read_text())
    assert record["rope_parameters"]["factor"] == 2.0
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(line.get("step") == 2 for line in log)


def test_bad_context_refused_before_anything_is_written(base_dir, tmp_path) -> None:
    with pytest.raises(
        SystemExit, match="--context 1030 does not split into whole S2-Attn groups .* multiple of 8"
    ):
        main(
            [
                "train",
                "--model",
                str(base_dir),
                "--method",
                "longlora",
                "--context",
                "1030",
                "--output-dir",
                str(tmp_path / "r"),
            ]
        )
    assert not (tmp_path / "r").exists()
