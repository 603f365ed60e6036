"""WER and CER per group (dialect, gender, age, voice, ...) with bootstrap confidence intervals.

A test split's per-utterance scores (SpeechBrain's ``ErrorRateStats.scores``: edits and
reference tokens per utterance) are pooled per value of every group column of the manifest. Each
group's WER is corpus-level (edits / reference words of the group). Its 95% interval is a
percentile bootstrap over the group's utterances: ``resamples`` draws of as many utterances
with replacement, the WER of each draw, the 2.5th and 97.5th percentiles. The draws are seeded,
so a table is reproducible; a group of one utterance gets no interval.
"""

import csv

import numpy as np


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
