"""WER and CER per group (dialect, gender, age, voice, ...) with bootstrap confidence intervals;
the per-utterance files of a test split; the paired bootstrap of two runs' WER difference.

A test split's per-utterance scores (SpeechBrain's ``ErrorRateStats.scores``: edits and
reference tokens per utterance) are pooled per value of every group column of the manifest. Each
group's WER is corpus-level (edits / reference words of the group). Its 95% interval is a
percentile bootstrap over the group's utterances: ``resamples`` draws of as many utterances
with replacement, the WER of each draw, the 2.5th and 97.5th percentiles. The draws are seeded,
so a table is reproducible; a group of one utterance gets no interval.

Each tested split leaves ``wer_<split>.txt`` (SpeechBrain's alignments of the normalised texts)
and ``hyps_<split>.tsv`` (the raw texts, ``write_test_files``), which ``tools/compare.py`` reads
to compare two runs with ``paired_bootstrap`` under several text normalisers.
"""

import csv
import math
import os
import re
from pathlib import Path

import numpy as np
import scipy.stats
from speechbrain.utils.edit_distance import wer_details_for_batch

#: the first columns of ``hyps_<split>.tsv``; the manifest's group columns follow
HYPOTHESES_COLUMNS = ("ID", "language", "reference", "hypothesis")
# an utterance's header line in SpeechBrain's alignments: "<id>, %WER 12.50 [ 1 / 8, 0 ins, ..."
_ALIGNMENT_HEADER = re.compile(r"^(.*), %WER \S+ \[ (\d+) / (\d+), \d+ ins, \d+ del, \d+ sub \]$")


def bootstrap_interval(edits, totals, resamples, seed, level=0.95):
    """Percentile bootstrap interval (in %) of ``sum(edits) / sum(totals)`` over utterances,
    or ``(nan, nan)`` when there are fewer than two utterances."""
    edits, totals = np.asarray(edits, dtype=float), np.asarray(totals, dtype=float)
    if len(edits) < 2 or resamples < 1:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(edits), size=(resamples, len(edits)))
    denominators = totals[draws].sum(axis=1)
    rates = 100.0 * edits[draws].sum(axis=1) / np.maximum(denominators, 1.0)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(rates, [tail, 100.0 - tail])
    return float(low), float(high)


def group_rows(wer_scores, cer_scores, groups, resamples=1000, seed=0):
    """One row per (column, value): utterances, reference words, WER and CER with intervals.

    ``wer_scores`` / ``cer_scores``: ``ErrorRateStats.scores`` (dicts with ``key``,
    ``num_edits``, ``num_ref_tokens``); ``groups``: ``{utterance id: {column: value}}``.
    Utterances missing from ``groups`` (or a column) are counted under the value ``""``.
    """
    wer_by_id = {s["key"]: s for s in wer_scores}
    cer_by_id = {s["key"]: s for s in cer_scores}
    columns = sorted({c for values in groups.values() for c in values})
    rows = []
    for column in columns:
        members = {}
        for score in wer_scores:
            value = str(groups.get(score["key"], {}).get(column, ""))
            members.setdefault(value, []).append(score["key"])
        for value, ids in sorted(members.items()):
            row = {"column": column, "value": value, "utterances": len(ids)}
            for name, by_id in (("WER", wer_by_id), ("CER", cer_by_id)):
                edits = [by_id[i]["num_edits"] for i in ids]
                totals = [by_id[i]["num_ref_tokens"] for i in ids]
                if name == "WER":
                    row["words"] = int(sum(totals))
                row[name] = 100.0 * sum(edits) / max(sum(totals), 1)
                # one seed per table cell: a group's interval does not change when other groups
                # (or the order of columns) do
                cell_seed = [seed, len(column), *map(ord, f"{column}={value}:{name}")]
                row[f"{name}_low"], row[f"{name}_high"] = bootstrap_interval(
                    edits, totals, resamples, cell_seed)
            rows.append(row)
    return rows


def markdown(rows, split, resamples):
    """The rows as a Markdown table with a one-line explanation."""
    def interval(row, name):
        low, high = row[f"{name}_low"], row[f"{name}_high"]
        return "-" if np.isnan(low) else f"{low:.1f}-{high:.1f}"

    lines = [f"{split}: WER and CER (%) per group, 95% bootstrap intervals over utterances "
             f"({resamples} seeded resamples)", "",
             "| group | value | utt. | words | WER | 95% CI | CER | 95% CI |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['column']} | {r['value'] or '(none)'} | {r['utterances']} | "
                     f"{r['words']} | {r['WER']:.2f} | {interval(r, 'WER')} | {r['CER']:.2f} | "
                     f"{interval(r, 'CER')} |")
    return "\n".join(lines) + "\n"


def write_group_report(rows, split, resamples, md_path, csv_path):
    """Write the table as Markdown and CSV; return the Markdown."""
    text = markdown(rows, split, resamples)
    with open(md_path, "w", encoding="utf-8") as f:
        f.write(text)
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        fields = ["column", "value", "utterances", "words", "WER", "WER_low", "WER_high", "CER",
                  "CER_low", "CER_high"]
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return text


# ---------------------------------------------------------------------- per-utterance test files
def _write_atomically(path, fill):
    """``fill(text file)`` into ``path`` through a temporary file: never a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        fill(f)
    os.replace(tmp, path)


def write_test_files(brain):
    """A tested split's per-utterance files in the run's output folder (``brain``: a
    ``speechtune.brain.FineTuneBrain`` at the end of its test stage; main process only):

    - ``wer_<name>.txt``: SpeechBrain's alignments of the normalised reference and hypothesis;
    - ``hyps_<name>.tsv``: one row per scored utterance, by ID: ``ID``, ``language`` (the
      split's), ``reference`` (the manifest's ``wrd`` after the event-tag policy, before the
      scoring normaliser), ``hypothesis`` (as decoded, before the scoring normaliser; a CTC
      hypothesis is its words joined by spaces), then the manifest's group columns.

    ``<name>`` is the split's test name (``test``, ``test_zero_shot``, ...)."""
    folder, name, scored = brain.hparams.output_folder, brain.test_name, brain.wer_metric
    _write_atomically(f"{folder}/wer_{name}.txt", scored.write_stats)
    groups = (brain.groups or {}).get(brain.test_split, {})
    columns = sorted({c for values in groups.values() for c in values})
    language = brain.split_languages.get(brain.test_split, brain.hparams.language)

    def fill(f):
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow([*HYPOTHESES_COLUMNS, *columns])
        for utt in sorted(score["key"] for score in scored.scores):
            writer.writerow([utt, language, *brain.hypotheses[utt],
                             *(groups.get(utt, {}).get(c, "") for c in columns)])

    _write_atomically(f"{folder}/hyps_{name}.tsv", fill)


def read_hypotheses(path):
    """``hyps_<split>.tsv`` (``write_test_files``) as ``(language, {id: (reference,
    hypothesis)}, {id: {group column: value}})``; language is None for an empty file."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if not rows or tuple(rows[0][:len(HYPOTHESES_COLUMNS)]) != HYPOTHESES_COLUMNS:
        raise ValueError(f"{path} does not start with the columns {HYPOTHESES_COLUMNS}: it was "
                         "not written by speechtune's test stage")
    columns, rows = rows[0][len(HYPOTHESES_COLUMNS):], rows[1:]
    texts = {r[0]: (r[2], r[3]) for r in rows}
    groups = {r[0]: dict(zip(columns, r[len(HYPOTHESES_COLUMNS):], strict=True)) for r in rows}
    return (rows[0][1] if rows else None), texts, groups


def read_alignments(path):
    """SpeechBrain's ``wer_<split>.txt`` as ``{id: (edits, reference words, reference
    tokens)}``: the counts from each utterance's header line, the tokens from the line below."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    found = {}
    for i, line in enumerate(lines[1:-1], start=1):
        match = _ALIGNMENT_HEADER.match(line) if lines[i - 1] == "=" * 80 else None
        if match:
            tokens = (t.strip() for t in lines[i + 1].split(" ; "))
            found[match[1]] = (int(match[2]), int(match[3]),
                               tuple(t for t in tokens if t and t != "<eps>"))
    return found


# ---------------------------------------------------------------------- paired comparison
def utterance_errors(references, hypotheses):
    """``(edits, reference words)`` arrays of word lists, utterance by utterance, by
    SpeechBrain's edit distance (the one ``ErrorRateStats`` scores a run with)."""
    details = wer_details_for_batch(range(len(references)), references, hypotheses)
    return (np.array([d["num_edits"] for d in details], dtype=float),
            np.array([d["num_ref_tokens"] for d in details], dtype=float))


def _wer_difference(edits_a, words_a, edits_b, words_b, axis=-1):
    """Corpus WER of B minus that of A, in points (a resample per row)."""
    wer_a = edits_a.sum(axis) / np.maximum(words_a.sum(axis), 1.0)
    return 100.0 * (edits_b.sum(axis) / np.maximum(words_b.sum(axis), 1.0) - wer_a)


def paired_bootstrap(errors_a, errors_b, resamples=1000, seed=0, level=0.95):
    """Paired percentile bootstrap of ``WER B - WER A`` (in points) over utterances.

    ``errors_a`` / ``errors_b``: ``(edits, reference words)`` per utterance (as
    ``utterance_errors`` gives them), the same utterances in the same order. Each of
    ``resamples`` seeded draws picks as many utterances with replacement, the same ones for A
    and B (scipy's ``bootstrap``, ``paired=True``), and takes both corpus-level WERs on them
    (edits / reference words). Returns ``utterances``, ``WER_A``, ``WER_B``, ``delta`` (B - A
    on every utterance), ``low`` / ``high`` (the ``level`` percentile interval of the draws'
    differences), ``p_a_better`` (the share of draws where A's WER is lower) and ``p_tie`` (the
    share where they are equal: a tie is neither's win); fewer than two utterances give nan
    for those four."""
    edits_a, words_a = (np.asarray(x, dtype=float) for x in errors_a)
    edits_b, words_b = (np.asarray(x, dtype=float) for x in errors_b)
    n = len(edits_a)
    row = {"utterances": n, "WER_A": float(100.0 * edits_a.sum() / max(words_a.sum(), 1.0)),
           "WER_B": float(100.0 * edits_b.sum() / max(words_b.sum(), 1.0)),
           "delta": float(_wer_difference(edits_a, words_a, edits_b, words_b))}
    if n < 2 or resamples < 1:
        return {**row, **dict.fromkeys(("low", "high", "p_a_better", "p_tie"), math.nan)}
    result = scipy.stats.bootstrap(
        (edits_a, words_a, edits_b, words_b), _wer_difference, n_resamples=resamples,
        batch=max(1, 2 ** 20 // n), vectorized=True, paired=True, confidence_level=level,
        method="percentile", rng=np.random.default_rng(seed))
    draws = result.bootstrap_distribution
    return {**row, "low": float(result.confidence_interval.low),
            "high": float(result.confidence_interval.high),
            "p_a_better": float(np.mean(draws > 0)), "p_tie": float(np.mean(draws == 0))}
