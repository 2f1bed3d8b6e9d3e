"""Long documents that install offline, and packing them into training rows of N tokens.

The source is the English Wikipedia dump that gensim ships as test data
(`gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2`,
CC BY-SA): 106 real articles (Anarchism, Autism, Alabama, Aristotle, ...), 3.3 M characters of prose
once the wiki markup is stripped, the longest ones over 25,000 tokens of the default model, so
there are documents longer than any window this machine can train. `make install` puts gensim's
wheel in place without its dependencies: lorakit reads the file, it never imports gensim.

Every 8th article by title is held out for evaluation (13 of them), the rest train. Training rows
are the training articles' tokens joined by the end-of-text token and cut into rows of exactly N
tokens (the rest dropped), every token a label, as LongLoRA fine-tunes on long text.
"""

from __future__ import annotations

import bz2
import html
import importlib.util
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..data.chat import Encoded

WIKI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
INSTALL = "pip install --no-deps gensim==4.4.0 (make install does it; lorakit only reads its test data)"
HELD_OUT_EVERY = 8


@dataclass(frozen=True)
class Document:
    title: str
    text: str


def wiki_path() -> Path:
    spec = importlib.util.find_spec("gensim")  # locates the package without importing it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for root in locations:
        path = Path(root) / "test" / "test_data" / WIKI_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"the long-document corpus (gensim's Wikipedia test dump) is not installed: {INSTALL}"
    )


def wiki_path_exists() -> bool:
    try:
        wiki_path()
    except FileNotFoundError:
        return False
    return True


@lru_cache(maxsize=2)
def wiki_articles(path: str | None = None) -> tuple[Document, ...]:
    """The dump's articles (main namespace, no redirects or disambiguation pages), markup stripped,
    sorted by title."""
    source = Path(path) if path else wiki_path()
    docs = []
    with bz2.open(source) as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}page"):
                continue
            title = element.findtext("{*}title") or ""
            text = element.findtext("{*}revision/{*}text") or ""
            namespace = element.findtext("{*}ns")
            element.clear()
            if (
                namespace != "0"
                or text.lstrip().lower().startswith("#redirect")
                or "(disambiguation)" in title
            ):
                continue
            clean = strip_wiki_markup(text)
            if len(clean) >= 2000:
                docs.append(Document(title, clean))
    return tuple(sorted(docs, key=lambda d: d.title))


def split(docs: tuple[Document, ...] | list[Document]) -> tuple[list[Document], list[Document]]:
    """(training, held-out): every HELD_OUT_EVERY-th document by title is held out."""
    held = [d for i, d in enumerate(docs) if i % HELD_OUT_EVERY == HELD_OUT_EVERY // 2]
    return [d for d in docs if d not in held], held


_COMMENT = re.compile(r"<!--.*?-->", re.S)
_REF = re.compile(r"<ref[^>/]*/>|<ref[^>]*>.*?</ref>", re.S | re.I)
_TAG_BLOCK = re.compile(r"<(math|gallery|timeline|source|syntaxhighlight|score)[^>]*>.*?</\1>", re.S | re.I)
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|[^{}]*?\|\}", re.S)
_FILE_LINK = re.compile(r"\[\[(?:File|Image|Category|Media):[^\[\]]*\]\]", re.I)
_INTERWIKI = re.compile(r"\[\[[a-z\-]{2,12}:[^\[\]|]*\]\]")  # [[de:Ding]]: the article in another language
_LINK = re.compile(r"\[\[(?!(?:File|Image|Category|Media):)(?:[^\[\]|]*\|)?([^\[\]]*)\]\]", re.I)
_EXTERNAL = re.compile(r"\[(?:https?|ftp)://[^\s\]]+\s*([^\]]*)\]")
_HEADING = re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M)
_QUOTES = re.compile(r"'{2,}")
_LIST = re.compile(r"^[*#:;]+\s*", re.M)
_BLANKS = re.compile(r"\n{3,}")


def strip_wiki_markup(text: str) -> str:
    """Wikitext to plain prose: comments, references, templates, tables, files and categories go;
    links keep their label; headings keep their text; bold/italic quotes and list marks go."""
    text = _COMMENT.sub("", text)
    text = _REF.sub("", text)
    text = _TAG_BLOCK.sub("", text)
    for _ in range(8):  # templates and tables nest: peel the innermost until none is left
        text, templates = _TEMPLATE.subn("", text)
        text, tables = _TABLE.subn("", text)
        if not templates and not tables:
            break
    text = _INTERWIKI.sub("", text)
    for _ in range(4):  # a file's caption may hold links: labels first, then the file link
        text, links = _LINK.subn(r"\1", text)
        text, files = _FILE_LINK.subn("", text)
        if not links and not files:
            break
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = html.unescape(text)
    text = _HEADING.sub(r"\1", text)
    text = _QUOTES.sub("", text)
    text = _LIST.sub("", text)
    lines = [line.strip() for line in text.splitlines()]
    # what a malformed file link or template left behind: its line goes, stray brackets too
    skip = ("{|", "|", "!", "[[File:", "[[Image:")
    text = "\n".join(line for line in lines if not line.startswith(skip))
    text = text.replace("[[", "").replace("]]", "").replace("{{", "").replace("}}", "")
    return _BLANKS.sub("\n\n", text).strip()


def document_ids(tokenizer: Any, docs: list[Document]) -> list[int]:
    """The documents' tokens, each followed by the end-of-text token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for doc in docs:
        ids += tokenizer(doc.title + "\n\n" + doc.text, add_special_tokens=False)["input_ids"]
        ids.append(eos)
    return ids


def pack(ids: list[int], length: int) -> list[Encoded]:
    """Rows of exactly `length` tokens, every token a label; the remainder is dropped."""
    if length < 2:
        raise ValueError(f"a training row needs at least 2 tokens, got {length}")
    rows = len(ids) // length
    if rows == 0:
        raise ValueError(f"the documents hold {len(ids):,} tokens, fewer than one row of {length:,}")
    return [
        Encoded(ids[i * length : (i + 1) * length], ids[i * length : (i + 1) * length]) for i in range(rows)
    ]
