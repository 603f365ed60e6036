"""Word n-gram language models for CTC beam search: text -> ARPA (and a KenLM binary).

KenLM's ``lmplz`` is used when it is on PATH; otherwise this module writes the same kind of model
itself: interpolated modified Kneser-Ney (Chen & Goodman 1998, the smoothing ``lmplz`` uses),
with ``lmplz``'s fallback discounts (0.5, 1, 1.5) where a small corpus makes the closed-form
discounts undefined, and optional count pruning. Every context's distribution over the
vocabulary (``</s>`` and ``<unk>`` included) sums to 1 (tested). KenLM's ``build_binary``, when on
PATH, also writes the binary format, which loads much faster than the ARPA text.

Loading and querying the model is KenLM's job (the ``kenlm`` module, through SpeechBrain's CTC
searchers); nothing here decodes.
"""

import csv
import logging
import math
import shutil
import subprocess
from collections import Counter, defaultdict
from pathlib import Path

from speechtune.text import get_normalizer

logger = logging.getLogger(__name__)

BOS, EOS, UNK = "<s>", "</s>", "<unk>"
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # lmplz --discount_fallback's defaults


def read_sentences(paths, language):
    """Normalised word lists, one per non-empty line of a text file or per row of a manifest CSV
    (its ``wrd`` column), normalised as the recipes normalise references (``language``)."""
    normalize = get_normalizer(language)
    paths, sentences = [Path(path) for path in paths], []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            if path.suffix == ".csv":
                reader = csv.DictReader(f)
                if "wrd" not in (reader.fieldnames or []):
                    raise ValueError(f"{path}: a manifest needs a 'wrd' column (the transcript); "
                                     "for plain text, one sentence per line, use a .txt file")
                texts = [row["wrd"] for row in reader]
            else:
                texts = f.read().splitlines()
        sentences += [words for words in (normalize(t).split() for t in texts) if words]
    if not sentences:
        raise ValueError(f"no text to build the language model from in {[str(p) for p in paths]}"
                         " (empty files, or nothing left after normalisation)")
    return sentences


def check_prune(prune, order):
    """``prune``: one raw-count threshold per order (n-grams with count <= it are dropped);
    shorter lists repeat their last value. Unigrams are never pruned and thresholds may not
    decrease with the order (so every kept n-gram keeps its context)."""
    if order < 2:
        raise ValueError(f"order {order}: KenLM (and so the CTC searchers) needs at least a "
                         "bigram model; use --order 2 or more (3 is usual)")
    prune = list(prune) or [0]
    if len(prune) > order:
        raise ValueError(f"prune thresholds {prune}: {len(prune)} values for an order-{order} "
                         f"model; give at most {order}")
    prune += [prune[-1]] * (order - len(prune))
    if prune[0] != 0 or any(b < a for a, b in zip(prune, prune[1:], strict=False)):
        raise ValueError(f"prune thresholds {prune}: the first (unigrams) must be 0 and the "
                         "others non-decreasing, e.g. --prune 0 0 1 (lmplz's convention)")
    return prune


def count_ngrams(sentences, order):
    """Raw counts ``counts[k-1][(w1, .., wk)]`` of the n-grams up to ``order`` of
    ``<s> words </s>``."""
    counts = [Counter() for _ in range(order)]
    for words in sentences:
        tokens = (BOS, *words, EOS)
        for k in range(1, order + 1):
            counts[k - 1].update(tokens[i:i + k] for i in range(len(tokens) - k + 1))
    return counts


def adjusted_counts(counts):
    """Kneser-Ney counts: raw at the highest order and for n-grams starting with ``<s>``;
    otherwise the number of distinct words seen before the n-gram (continuation counts)."""
    adjusted = list(counts)
    for k in range(len(counts) - 1, 0, -1):
        left = Counter(gram[1:] for gram in counts[k])
        adjusted[k - 1] = Counter({g: c if g[0] == BOS else left[g]
                                   for g, c in counts[k - 1].items()})
    return adjusted


def discounts(adjusted):
    """Modified Kneser-Ney discounts ``(D1, D2, D3+)`` of one order from its counts of counts;
    ``lmplz``'s fallback where they are undefined or out of range."""
    n = Counter(c for g, c in adjusted.items() if g != (BOS,) and c <= 4)  # n1..n4, exact
    if any(n[i] == 0 for i in (1, 2, 3, 4)):
        return FALLBACK_DISCOUNTS
    y = n[1] / (n[1] + 2 * n[2])
    ds = tuple(i - (i + 1) * y * n[i + 1] / n[i] for i in (1, 2, 3))
    return ds if all(0 < d < i for i, d in zip((1, 2, 3), ds, strict=True)) else FALLBACK_DISCOUNTS


def kneser_ney(counts, prune):
    """Interpolated modified Kneser-Ney with pruning, in ARPA terms.

    Returns ``(probs, backoffs)``: per order, ``{ngram: p}`` for every kept n-gram (already
    interpolated with the lower order, as ARPA lists them) and ``{context: backoff weight}``.
    The weight of context ``h`` is the mass its kept n-grams leave over,
    ``1 - sum_w (c(h,w) - D(c)) / c(h)``, with ``c(h)`` counting pruned n-grams too: with no
    pruning this is Chen & Goodman's gamma, with pruning the dropped mass goes to the lower order.
    """
    adjusted = adjusted_counts(counts)
    vocab = [w for (w,) in counts[0] if w != BOS] + [UNK]
    probs, backoffs = [], []
    for k, grams in enumerate(adjusted, start=1):
        d = discounts(grams)
        totals, kept = defaultdict(float), defaultdict(float)
        for gram, c in grams.items():
            if gram == (BOS,):
                continue
            totals[gram[:-1]] += c
            if counts[k - 1][gram] > prune[k - 1]:
                kept[gram[:-1]] += c - d[min(c, 3) - 1]
        gamma = {h: 1.0 - kept[h] / totals[h] for h in totals}
        level = {}
        for gram, c in grams.items():
            if gram == (BOS,) or counts[k - 1][gram] <= prune[k - 1]:
                continue
            lower = 1 / len(vocab) if k == 1 else backoff_prob(probs, backoffs, gram[1:])
            level[gram] = (c - d[min(c, 3) - 1]) / totals[gram[:-1]] + gamma[gram[:-1]] * lower
        if k == 1:
            level[(UNK,)] = gamma[()] / len(vocab)
        probs.append(level)
        backoffs.append(gamma)
    return probs, backoffs


def backoff_prob(probs, backoffs, gram):
    """``p(w | h)`` the way an ARPA reader computes it: the listed value, or the context's
    backoff weight times ``p(w | shorter h)``."""
    k = len(gram)
    if gram in probs[k - 1]:
        return probs[k - 1][gram]
    if k == 1:
        return probs[0][(UNK,)]
    return backoffs[k - 1].get(gram[:-1], 1.0) * backoff_prob(probs, backoffs, gram[1:])


def write_arpa(probs, backoffs, path):
    """Write an ARPA file (log10 values; ``<s>`` gets the conventional -99)."""
    order = len(probs)
    levels = [dict(level) for level in probs]
    levels[0][(BOS,)] = 0.0
    with open(path, "w", encoding="utf-8") as f:
        f.write("\\data\\\n")
        f.writelines(f"ngram {k}={len(level)}\n" for k, level in enumerate(levels, start=1))
        for k, level in enumerate(levels, start=1):
            f.write(f"\n\\{k}-grams:\n")
            for gram in sorted(level):
                logp = -99.0 if gram == (BOS,) else math.log10(level[gram])
                line = f"{logp:.7f}\t{' '.join(gram)}"
                if k < order and gram in backoffs[k]:
                    line += f"\t{math.log10(backoffs[k][gram]):.7f}"
                f.write(line + "\n")
        f.write("\n\\end\\\n")


def build_lm(sentences, order, prune, arpa_path):
    """Build an n-gram LM of normalised ``sentences`` (word lists): ``arpa_path``, plus
    ``<stem>.bin`` when KenLM's ``build_binary`` is on PATH. Returns the paths written."""
    prune = check_prune(prune, order)
    arpa_path = Path(arpa_path)
    arpa_path.parent.mkdir(parents=True, exist_ok=True)
    if not sentences:
        raise ValueError("no text to build the language model from (all lines empty?)")
    if shutil.which("lmplz"):
        text = "".join(" ".join(words) + "\n" for words in sentences)
        cmd = ["lmplz", "-o", str(order), "--discount_fallback", "--prune", *map(str, prune),
               "--arpa", str(arpa_path)]
        logger.info("running %s", " ".join(cmd))
        subprocess.run(cmd, input=text, text=True, check=True)
    else:
        logger.info("lmplz not on PATH: writing interpolated modified Kneser-Ney ARPA")
        write_arpa(*kneser_ney(count_ngrams(sentences, order), prune), arpa_path)
    written = [arpa_path]
    if shutil.which("build_binary"):
        binary = arpa_path.with_suffix(".bin")
        subprocess.run(["build_binary", str(arpa_path), str(binary)], check=True)
        written.append(binary)
    return written
