"""English sentences for calibrating text models offline: prose from Python's own documentation.

Every CPython ships `pydoc_data.topics` (the text `help()` shows: the language reference's
chapters, about 465,000 characters). Its prose paragraphs are cut into sentences and filtered
to plain English: code blocks, lists and tables are dropped, and so is any sentence with code
characters (`=`, `_`, brackets, backquotes, `...`, version numbers), fewer than 5 or more than 45
words, or less than 98% letters and ordinary punctuation. What is left (about 660 distinct
sentences, some 14,000 WordPiece tokens with the MiniLM tokenizer) is technical but real prose:
enough rows for onnxprune's least-squares recovery (4 per input of the widest layer: 6,144
tokens for a 1536-wide FFN down projection), which the 64 hand-written sentences of
calibration_data.py are not.

The same CPython version gives the same sentences; the order is the topics' sorted order.
"""
from __future__ import annotations

import re

CODE = re.compile(r"[=_{}\[\]<>*`|\\#@~^/]|\d\.\d|\.\.\.|\(\)")
SENTENCE_END = re.compile(r"(?<=[.?!])\s+(?=[A-Z])")
QUOTES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u201c": '"', "\u201d": '"'})
PLAIN = set(" ,.'-?!;:()\"")


def prose_sentences(text: str, min_words: int = 5, max_words: int = 45) -> list[str]:
    """Plain-English sentences of `text`'s prose paragraphs, in order, duplicates removed."""
    found = []
    for paragraph in re.split(r"\n\s*\n", text):
        lines = paragraph.split("\n")
        if any(line.startswith("   ") or line.lstrip().startswith((">>>", "*", "-", "+", "|", "=")) for line in lines):
            continue  # code, lists, tables
        joined = " ".join(line.strip() for line in lines).translate(QUOTES)
        for sentence in SENTENCE_END.split(joined):
            sentence = sentence.strip()
            if not (min_words <= len(sentence.split()) <= max_words):
                continue
            if not sentence[0].isupper() or sentence[-1] not in ".?!" or CODE.search(sentence):
                continue
            if sum(c.isalpha() or c in PLAIN for c in sentence) / len(sentence) < 0.98:
                continue
            found.append(sentence)
    return list(dict.fromkeys(found))


def pydoc_sentences() -> list[str]:
    """The plain-English sentences of the Python documentation shipped with this interpreter."""
    from pydoc_data.topics import topics

    return prose_sentences("\n\n".join(topics[key] for key in sorted(topics)))
