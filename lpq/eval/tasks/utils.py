"""Functions the lpq task YAMLs name with `!function utils.<name>` (lm-eval loads this file by path)."""
from __future__ import annotations

import random
import re

from lpq.eval.answers import extract_gsm8k, extract_math, gsm8k_target, math_equal, numbers_equal

_ARTICLE_TITLE = re.compile(r"^ ?= [^=].* = ?$")
CHUNK_CHARS = 2000   # about 500 tokens of English: the same scale as the 512-token PTQ windows


def wikitext_chunks(dataset):
    """Documents of consecutive lines of at least CHUNK_CHARS characters, never across two articles.

    Whole articles (thousands of tokens each, 62 in the test set) would make a --limit coarse and
    expensive; chunks of about 500 tokens give a few hundred items for the paired bootstrap, and
    the full set still covers every line once.
    """
    import datasets

    articles: list[list[str]] = []
    for line in dataset["text"]:
        line = line.rstrip("\n")
        if _ARTICLE_TITLE.match(line) or not articles:
            articles.append([])
        if line.strip():
            articles[-1].append(line.strip())
    chunks: list[str] = []
    for lines in articles:
        current: list[str] = []
        for line in lines:
            current.append(line)
            if sum(len(x) + 1 for x in current) >= CHUNK_CHARS:
                chunks.append("\n".join(current))
                current = []
        if current:
            tail = "\n".join(current)
            # A short article end joins the previous chunk of the same article.
            if chunks and len(tail) < CHUNK_CHARS // 2 and len(lines) > len(current):
                chunks[-1] += "\n" + tail
            else:
                chunks.append(tail)
    return datasets.Dataset.from_dict({"text": chunks})


def _gpqa_option(text) -> str:
    if text is None:
        return " "
    return text.strip().replace(" [title]", ". ").replace("  ", " ")


def gpqa_process_docs(dataset):
    """Shuffle the four options per question with a seed taken from the question text.

    lm-eval's own GPQA shuffles with Python's global RNG, so the option order depends on what ran
    before; a per-question seed makes it identical for the baseline and the candidate run.
    """
    def one(doc):
        options = [_gpqa_option(doc[k]) for k in ("Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2",
                                                 "Incorrect Answer 3")]
        order = [0, 1, 2, 3]
        random.Random(doc["Question"]).shuffle(order)
        shuffled = [options[i] for i in order]
        return {"choice1": shuffled[0], "choice2": shuffled[1], "choice3": shuffled[2], "choice4": shuffled[3],
                "answer": f"({'ABCD'[order.index(0)]})"}

    return dataset.map(one)


def gsm8k_process_results(doc, results):
    return {"exact_match": int(numbers_equal(extract_gsm8k(results[0]), gsm8k_target(doc["answer"])))}


def math_process_results(doc, results):
    return {"exact_match": int(math_equal(extract_math(results[0]), doc["answer"]))}
