"""Is run B better or worse than run A? A paired bootstrap of their WER difference on the same
test utterances, per text normaliser and per group.

    python tools/compare.py RUN_A RUN_B                  # every split both runs tested
    python tools/compare.py RUN_A RUN_B --split test --out compare.md
    python tools/compare.py RUN_A RUN_B --json           # the same rows as JSON

``RUN_A`` and ``RUN_B`` are run output folders (e.g. ``recipes/Synthetic/CTC/results/...``).
Utterances are matched by ID; when the runs scored different sets, the comparison uses the
utterances both scored and says how many of each run's it left out. The difference is
``WER B - WER A`` in WER points: positive when A makes fewer errors. Its 95% interval is the
percentile interval over ``--resamples`` seeded draws of the utterances with replacement, the
same utterances for A and B in each draw (``speechtune.metrics.paired_bootstrap``); a group is
resampled within itself. ``P(A better)`` is the share of draws where A's WER is lower; a tie
counts for neither. The same seed gives the same table.

Normalisers, side by side, each applied to both runs' raw reference and hypothesis of
``hyps_<split>.tsv`` (written by the test stage): Whisper's English normaliser (transformers'
``EnglishTextNormalizer``, with the British-to-American spelling map of a Whisper run's
tokenizer when a run has one), ``speechtune.text.basic_normalize`` and the language registry's
normaliser of the split's language. ``as scored`` is each run's own ``wer_<split>.txt``, the
WER the run reported. Runs tested before ``hyps_<split>.tsv`` existed have only the latter:
their comparison is ``as scored`` alone, overall, and the output says so. Groups are the
manifest's group columns, as in ``wer_<split>_groups.md``.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from transformers.models.whisper.english_normalizer import EnglishTextNormalizer

from speechtune.metrics import (
    paired_bootstrap,
    read_alignments,
    read_hypotheses,
    utterance_errors,
)
from speechtune.text import basic_normalize, get_normalizer

SCORED = "as scored"


def tested_splits(run):
    """The names a run tested: ``wer_<name>.txt`` in its output folder."""
    return {p.name[len("wer_"):-len(".txt")] for p in Path(run).glob("wer_*.txt")}


def load_split(run, split):
    """``{"scored": {id: (edits, words, reference tokens)}, "texts": {id: (reference,
    hypothesis)} or None, "groups": {id: {column: value}}, "language": code or None, "why":
    why texts is None}``."""
    run = Path(run)
    found = {"scored": read_alignments(run / f"wer_{split}.txt"), "texts": None, "groups": {},
             "language": None, "why": f"no hyps_{split}.tsv (tested before the test stage "
                                      "wrote it)"}
    if (run / f"hyps_{split}.tsv").is_file():
        language, texts, groups = read_hypotheses(run / f"hyps_{split}.tsv")
        if set(texts) == set(found["scored"]):
            found.update(language=language, texts=texts, groups=groups, why=None)
        else:
            found["why"] = (f"hyps_{split}.tsv holds other utterances than wer_{split}.txt "
                            "(left by another test?), so it is not used")
    return found


def spelling_map(runs):
    """The British-to-American map a Whisper run's tokenizer saved (``save/model_files/
    normalizer.json``), from the first run that has one; ``({}, None)`` if none does."""
    for run in runs:
        path = Path(run) / "save" / "model_files" / "normalizer.json"
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8")), path
    return {}, None


def normalizers(language, spelling):
    """``{name: text -> text}``: the normalisers compared on raw texts."""
    found = {"Whisper English": EnglishTextNormalizer(spelling), "basic": basic_normalize}
    if language:
        found[f"registry ({language})"] = get_normalizer(language)
    return found


def verdict(row):
    """One line on the row's interval."""
    if np.isnan(row["low"]):
        return "too few utterances for an interval"
    if row["low"] > 0:
        return "A better (CI excludes 0)"
    if row["high"] < 0:
        return "B better (CI excludes 0)"
    return "no significant difference"


def compare_split(a, b, split, resamples, seed, spelling):
    """Rows (one per normaliser and group) and notes for one split of runs ``a`` and ``b``
    (``load_split``)."""
    ids = sorted(set(a["scored"]) & set(b["scored"]))
    only_a, only_b = len(a["scored"]) - len(ids), len(b["scored"]) - len(ids)
    if not ids:
        raise SystemExit(
            f"{split}: the runs scored no utterance in common (A: {len(a['scored'])}, e.g. "
            f"{next(iter(a['scored']), '-')}; B: {len(b['scored'])}, e.g. "
            f"{next(iter(b['scored']), '-')}): were they tested on the same test set?")
    notes = [f"{len(ids)} utterances scored by both runs; left out: {only_a} of run A's, "
             f"{only_b} of run B's (not scored by the other run)."]
    errors = {SCORED: tuple(
        tuple(np.array([run["scored"][i][k] for i in ids], dtype=float) for k in (0, 1))
        for run in (a, b))}
    differ = sum(a["scored"][i][2] != b["scored"][i][2] for i in ids)
    if differ:
        notes.append(f"{SCORED}: the runs' normalised references differ on {differ} "
                     "utterances (different scoring normalisers?): that row mixes the "
                     "normaliser into the difference.")
    texts = a["texts"] is not None and b["texts"] is not None
    if texts:
        if a["language"] != b["language"]:
            notes.append(f"the runs tested this split as {a['language']} (A) and "
                         f"{b['language']} (B): the registry normaliser is A's.")
        for name, normalize in normalizers(a["language"], spelling).items():
            errors[name] = tuple(utterance_errors(
                [normalize(run["texts"][i][0]).split() for i in ids],
                [normalize(run["texts"][i][1]).split() for i in ids]) for run in (a, b))
        differ = sum(a["texts"][i][0] != b["texts"][i][0] for i in ids)
        notes.append(f"normalisers applied to the raw texts of hyps_{split}.tsv; {SCORED}: "
                     f"each run's own wer_{split}.txt." + (
                         f" The raw references differ on {differ} utterances." if differ
                         else ""))
    else:
        why = "; ".join(f"run {n}: {r['why']}" for n, r in (("A", a), ("B", b)) if r["why"])
        notes.append(f"{why}. Only each run's own scoring ({SCORED}, wer_{split}.txt) can be "
                     "compared, and without groups.")
    groups = {i: {**b["groups"].get(i, {}), **a["groups"].get(i, {})} for i in ids} \
        if texts else {}
    cells = [("", "", np.arange(len(ids)))]
    for column in sorted({c for values in groups.values() for c in values}):
        values = np.array([groups[i].get(column, "") for i in ids])
        cells += [(column, str(value), np.flatnonzero(values == value))
                  for value in sorted(set(values))]
    rows = []
    for column, value, members in cells:
        # one seed per cell: every normaliser sees the same draws, a group the same whatever
        # the other groups are
        cell_seed = [seed, *f"{split}|{column}={value}".encode()]
        for name, ((edits_a, words_a), (edits_b, words_b)) in errors.items():
            result = paired_bootstrap((edits_a[members], words_a[members]),
                                      (edits_b[members], words_b[members]), resamples,
                                      cell_seed)
            rows.append({"split": split, "normalizer": name, "column": column,
                         "value": value, **result, "verdict": verdict(result)})
    return rows, notes


def signed(x):
    return "-" if np.isnan(x) else f"{x:+.2f}"


def markdown(report):
    """The report as Markdown: how to read it, then per split its notes and table."""
    lines = [
        "# Run A against run B", "",
        f"- A: `{report['run_a']}`", f"- B: `{report['run_b']}`",
        "- Δ = WER B − WER A, in WER points (%): positive when A makes fewer errors.",
        f"- 95% CI: percentile interval of Δ over {report['resamples']} draws of the "
        f"utterances with replacement (seed {report['seed']}), A and B scored on the same "
        "utterances in each draw (paired); a group is resampled within itself.",
        "- P(A better): share of draws where A's WER is lower than B's; ties count for "
        "neither.", f"- Whisper English: {report['spelling']}.", ""]
    for split, notes in report["notes"].items():
        lines += [f"## {split}", "", *(f"- {n}" for n in notes), "",
                  "| normaliser | group | utt. | WER A | WER B | Δ (B−A) | 95% CI | P(A better) "
                  "| verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in report["rows"] if r["split"] == split):
            group = f"{r['column']}={r['value'] or '(none)'}" if r["column"] else "all"
            ci = "-" if np.isnan(r["low"]) else f"[{signed(r['low'])}, {signed(r['high'])}]"
            chance = "-" if np.isnan(r["p_a_better"]) else f"{r['p_a_better']:.3f}"
            lines.append(f"| {r['normalizer']} | {group} | {r['utterances']} | "
                         f"{r['WER_A']:.2f} | {r['WER_B']:.2f} | {signed(r['delta'])} | {ci} | "
                         f"{chance} | {r['verdict']} |")
        lines.append("")
    return "\n".join(lines)


def compare(run_a, run_b, splits=None, resamples=1000, seed=0):
    """The report: ``run_a``, ``run_b``, settings, ``notes`` per split and ``rows``."""
    for run in (run_a, run_b):
        if not tested_splits(run):
            raise SystemExit(f"no wer_<split>.txt in {run}: give a tested run's output folder")
    both = tested_splits(run_a) & tested_splits(run_b)
    splits = splits or sorted(both)
    missing = [s for s in splits if s not in both]
    if missing or not splits:
        raise SystemExit(f"split(s) {missing or '(any)'} not tested by both runs; A tested "
                         f"{sorted(tested_splits(run_a))}, B {sorted(tested_splits(run_b))}")
    spelling, source = spelling_map((run_a, run_b))
    report = {"run_a": str(run_a), "run_b": str(run_b), "difference": "WER B - WER A (points)",
              "resamples": resamples, "seed": seed, "level": 0.95,
              "spelling": f"with the {len(spelling)}-entry spelling map of {source}" if source
              else "without a spelling map (neither run has save/model_files/normalizer.json)",
              "notes": {}, "rows": []}
    for split in splits:
        rows, notes = compare_split(load_split(run_a, split), load_split(run_b, split), split,
                                    resamples, seed, spelling)
        report["notes"][split] = notes
        report["rows"] += rows
    return report


def nan_to_null(report):
    """The report with every nan (no interval) as None: JSON has no NaN."""
    return {**report, "rows": [{k: None if isinstance(v, float) and np.isnan(v) else v
                                for k, v in row.items()} for row in report["rows"]]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", type=Path, help="run A's output folder")
    parser.add_argument("run_b", type=Path, help="run B's output folder")
    parser.add_argument("--split", action="append", help="a split to compare (repeatable; "
                        "default: every split both runs tested)")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap draws")
    parser.add_argument("--seed", type=int, default=0, help="seed of the draws")
    parser.add_argument("--json", action="store_true", help="print JSON, not Markdown")
    parser.add_argument("--out", type=Path, help="also write the output to this file")
    args = parser.parse_args(argv)
    report = compare(args.run_a, args.run_b, args.split, args.resamples, args.seed)
    text = json.dumps(nan_to_null(report), indent=1) if args.json else markdown(report)
    if args.out:
        args.out.write_text(text + "\n", encoding="utf-8")
    print(text)


if __name__ == "__main__":
    sys.exit(main())
