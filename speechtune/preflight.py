"""Pre-flight validation: find the data problems that silently ruin a run before any training step.

The seed report lost a whole run to lower-case transcripts against an upper-case vocabulary (every
character became ``<unk>``, WER stuck at 1.0). ``run_preflight`` checks every split for

- audio files that are missing or unreadable (training from shards: utterances missing from the
  shard index, ``speechtune.shards.check``),
- manifest durations that disagree with the audio,
- labels that cannot fit the model: training utterances with more CTC labels than encoder
  frames (the loss would be infinite; valid/test utterances are scored whatever their length);
  for Whisper, audio longer than the encoder window (any split) or targets longer than the
  decoder's positions,
- text with characters outside the vocabulary, above a small threshold,
- leakage between splits (``speechtune.corpus_checks``): the same ID, file or samples in train
  and valid/test (or in valid and test); a transcript shared with training is a warning,
- degenerate training audio: near-silent, clipped, or a constant tone (given the decoded
  files' statistics, ``corpus_checks.collect_stats``),

and stops with a message naming examples and the fix (``mode="error"``, the default). With
``mode="skip"`` offending *training* utterances are dropped and listed in the report; problems in
valid/test always stop the run, since dropping them would score an easier subset.
"""

import logging
import re
from collections import Counter
from dataclasses import dataclass, field

import soundfile as sf

from speechtune.corpus_checks import DegenerateLimits, degenerate, leakage, shared_transcripts
from speechtune.prepare.custom import AUDIO_FIXES, describe_missing_audio, path_problem_kind

logger = logging.getLogger(__name__)
PARENTHESISED = re.compile(r"\(\w[^()]{0,58}\)")  # "(inaudible)": reported, not a tag by default


class PreflightError(ValueError):
    """The data failed pre-flight validation; the message says what and how to fix it."""


@dataclass
class Problem:
    split: str
    utt_id: str
    kind: str
    detail: str


@dataclass
class Report:
    problems: list[Problem] = field(default_factory=list)
    oov: dict[str, Counter] = field(default_factory=dict)  # split -> Counter of OOV characters
    oov_rate: dict[str, float] = field(default_factory=dict)

    def write(self, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write("split\tID\tproblem\tdetail\n")
            for p in self.problems:
                f.write(f"{p.split}\t{p.utt_id}\t{p.kind}\t{p.detail}\n")
            for split, counter in self.oov.items():
                f.write(f"# {split}: out-of-vocabulary characters {dict(counter)} "
                        f"({self.oov_rate[split]:.2%} of characters)\n")


FIXES = {
    "not_in_shards": "run local/make_shards.py on this training manifest (it resumes), or point "
                     "train_shards at the shards made from it",
    "missing_audio": "check the manifest's audio path (the `wav` column; `audio` in a manifest "
                     "for speechtune/prepare/custom.py, relative to its folder) and data_folder "
                     "(the yaml key $data_root stands for)",
    "unreadable_audio": "re-encode the file (16 kHz mono FLAC/WAV) or remove the row",
    "not_an_audio_file": "name an audio file (the path is a folder, a pipe or a device)",
    "broken_symlink": "repair the link (ln -sf TARGET LINK), or name the audio file itself",
    "audio_name_form": AUDIO_FIXES["is not there as spelled"],
    "audio_permission": "give the user who trains read access to the file and the folders on "
                        "its way (chmod), or copy the audio where it can",
    "duration_mismatch": "correct the manifest's duration column, or delete it (speechtune/"
                         "prepare/custom.py then reads durations from the audio); a bundled "
                         "corpus: re-run its preparation in local/",
    "too_many_labels": "check that the transcript belongs to this audio, or drop the utterance; "
                       "CTC needs one encoder frame per label (two for a repeated character)",
    "audio_too_long": "cut the recording into shorter utterances, or lower max_duration to drop "
                      "long training utterances (the encoder sees one fixed window)",
    "too_many_tokens": "cut the utterance, or drop it with --preflight=skip (the decoder has a "
                       "fixed number of positions)",
    "beyond_window": "raise window_seconds above the longest valid/test utterance (the first "
                     "example; at most the model's own window) or cut those recordings: a "
                     "shortened window would score them from their first seconds only",
    "empty_audio": "the file holds no samples: re-export it or remove the row",
    "empty_text": "the transcript is empty after the language's normaliser (blank, only "
                  "punctuation, or only event tags, which event_tags: drop removes): fix the "
                  "transcript or remove the row",
    "shared_id": "the same ID in two splits: if it is one recording, keep it in one split "
                 "(split by speaker or recording, not by row); if not, make the IDs distinct",
    "shared_audio": "one audio file in two splits scores the model on what it trained on (or "
                    "picks the checkpoint on the test set): keep it in one split",
    "same_audio": "a copy of one recording in two splits (same samples, another file): keep it "
                  "in one split",
    "silent_audio": "the file is (near) silence under a transcript: check that the file belongs "
                    "to the row; for a quiet corpus lower preflight_min_level_dbfs",
    "clipped_audio": "heavily clipped audio: re-record or drop it; if the whole corpus is "
                     "clipped like this, raise preflight_max_clipped",
    "tonal_audio": "a constant tone, not speech: check that the file belongs to the row; lower "
                   "preflight_min_flatness_db to keep such files",
}
# reported in the log and the report, never fatal, never dropped
WARNINGS = {
    "audio_cut": "valid/test utterance(s) longer than the encoder window, scored against the "
                 "full transcript from the first window only",
    "outside_duration_limits": "training utterance(s) outside min_duration / max_duration, "
                               "left out of training",
    "shared_transcript": "valid/test utterance(s) with the transcript of a training utterance "
                         "(a sentence the model may have memorised; fine if other speakers read "
                         "it on purpose)",
}


def ctc_min_frames(labels) -> int:
    """Frames CTC needs for a label sequence: one per label plus a blank between repeats."""
    return len(labels) + sum(a == b for a, b in zip(labels, labels[1:], strict=False))


def check_audio(split, rows, duration_tolerance):
    """Missing/unreadable files and manifest-vs-audio duration disagreements."""
    problems = []
    for row in rows:
        path = row["wav"]
        why = describe_missing_audio(path)  # what the path is: missing, a folder, a loop, ...
        if why is not None:
            kind = path_problem_kind(why)
            problems.append(Problem(split, row["ID"], kind, f"{path} {why}"))
            continue
        try:
            info = sf.info(path)
        except Exception as err:  # soundfile raises several types for broken files
            problems.append(Problem(split, row["ID"], "unreadable_audio", f"{path}: {err}"))
            continue
        if info.frames == 0:
            problems.append(Problem(split, row["ID"], "empty_audio", path))
            continue
        declared, actual = float(row["duration"]), info.frames / info.samplerate
        if abs(declared - actual) > max(duration_tolerance, 0.02 * actual):
            problems.append(Problem(split, row["ID"], "duration_mismatch",
                                    f"manifest {declared:.3f} s, audio {actual:.3f} s"))
    return problems


def speed_length_factors(speeds):
    """``(shortest, longest)`` length factors of SpeechBrain's speed perturbation with
    ``speeds`` (percent): speed ``s`` makes audio ``100 / s`` as long (105 shortens, 95
    lengthens)."""
    return 100 / max(speeds), 100 / min(speeds)


def ctc_label_check(frames_for_seconds, speed_factor=1.0):
    """CTC: a training utterance needs at least ``ctc_min_frames`` encoder frames.

    ``speed_factor`` is the length factor of the most shortening training augmentation
    (SpeechBrain's speed 110 gives 100/110). Valid/test utterances are scored whatever their
    length.
    """

    def check(split, row, text):
        if split != "train":
            return None
        needed = ctc_min_frames(list(text))
        frames = frames_for_seconds(float(row["duration"]) * speed_factor)
        if needed > frames:
            return "too_many_labels", f"{needed} labels needed, {frames} frames"
        return None

    return check


def seq2seq_label_check(window_seconds, max_tokens, count_tokens, speed_factor=1.0,
                        model_window_seconds=None):
    """Whisper-style encoder-decoder: audio must fit the encoder window, tokens the decoder.

    A training utterance longer than ``window_seconds`` (at ``speed_factor``, the length factor of
    the most *lengthening* augmentation) would be cut and trained on a transcript it no longer
    matches; one whose target needs more than ``max_tokens`` decoder positions
    (``count_tokens(text)``: prefix included) cannot be trained on. A valid/test
    utterance longer than the model's own window (``model_window_seconds``, default
    ``window_seconds``) is decoded from its first ``window_seconds`` and scored against its full
    transcript (the missing words count as deletions): reported, not fatal (LibriSpeech's
    dev/test sets hold a few such utterances). One that fits the model's window but not a
    shortened ``window_seconds`` is fatal: the shortened window, not the data, would cut it.
    """
    model_window = window_seconds if model_window_seconds is None else model_window_seconds

    def check(split, row, text):
        seconds = float(row["duration"])
        if split != "train":
            if seconds > model_window:
                return "audio_cut", f"{seconds:.2f} s > {window_seconds:g} s window"
            if seconds > window_seconds:
                return "beyond_window", (f"{seconds:.2f} s > window_seconds={window_seconds:g}; "
                                         f"the model's own window is {model_window:g} s")
            return None
        if seconds * speed_factor > window_seconds:
            return "audio_too_long", (f"{seconds * speed_factor:.2f} s (with speed perturbation) "
                                      f"> {window_seconds:g} s window")
        if count_tokens(text) > max_tokens:
            return "too_many_tokens", f"{count_tokens(text)} tokens > {max_tokens} positions"
        return None

    return check


def oov_characters(texts, vocab):
    """Counter of out-of-vocabulary characters and their fraction of all characters."""
    counter, total = Counter(), 0
    for text in texts:
        total += len(text)
        counter.update(c for c in text if c not in vocab)
    return counter, (sum(counter.values()) / total if total else 0.0)


def case_hint(oov, vocab):
    """A line naming a case mismatch when most out-of-vocabulary characters are in the vocabulary
    in the other case (lower-case text against wav2vec2-large-960h's upper-case letters)."""
    counts = sum(oov.values(), Counter())
    lower = sum(n for c, n in counts.items() if c.islower() and c.upper() in vocab)
    upper = sum(n for c, n in counts.items() if c.isupper() and c.lower() in vocab)
    if lower + upper <= 0.5 * sum(counts.values()):
        return ""
    text_case, vocab_case = ("lower", "upper") if lower >= upper else ("upper", "lower")
    return (f"Case mismatch: the text is {text_case} case, the vocabulary {vocab_case} case: set "
            f"target_case: {vocab_case} (the CTC recipes' key).\n")


def run_preflight(splits, vocab, label_check, mode="error", max_oov_rate=0.005,
                  duration_tolerance=0.1, report_path=None, excluded=(), audio_stats=None,
                  limits=None, train_audio=None):
    """Validate manifests before training; return ``{split: set of IDs to drop}``.

    Parameters
    ----------
    splits : dict
        ``{split_name: rows}``: lists of manifest rows (``ID``, ``duration``, ``wav``) with
        ``target``, the text the model is trained to output (normalised once, by the family).
    vocab : set of str or None
        Characters the model can output (a CTC vocabulary without blank/unk); None for
        tokenizers that cover every character (Whisper's byte-level BPE): no OOV check.
    label_check : callable
        ``label_check(split, row, target_text)`` returns ``(problem kind, detail)`` or None
        (``ctc_label_check``, ``seq2seq_label_check``).
    mode : "error" or "skip"
        ``error`` raises ``PreflightError``; ``skip`` drops offending training utterances and
        reports them (valid/test problems raise in both modes).
    max_oov_rate : float
        Largest tolerated fraction of a split's characters outside the vocabulary.
    duration_tolerance : float
        Seconds by which a manifest duration may differ from the audio (or 2%, the larger).
    report_path : path, optional
        Where to write the report (always written when given).
    excluded : iterable of Problem
        Utterances the recipe left out before the checks (kinds in ``WARNINGS``, e.g. training
        durations outside the limits): reported and logged, not checked.
    audio_stats : dict, optional
        ``{wav: corpus_checks.AudioStats}`` of the decoded files: enables the leakage check by
        content and the degenerate-audio check of training utterances (against ``limits``, a
        ``corpus_checks.DegenerateLimits``; default its defaults).
        IDs and resolved paths are checked for leakage either way.
    train_audio : list of Problem, optional
        The training audio's problems found without opening its files (``speechtune.shards.
        check``: against the shard index); given, the training files are not checked.

    Returns
    -------
    dict mapping split name to the set of utterance IDs to drop (only train can be non-empty).
    """
    limits = limits or DegenerateLimits()
    if mode not in ("error", "skip"):
        raise ValueError(f"preflight mode must be 'error' or 'skip', got {mode!r}")
    report = Report(problems=list(excluded))
    for split, rows in splits.items():
        if not rows:
            raise PreflightError(f"Split '{split}' is empty: check its manifest and the "
                                 "min/max duration filters.")
        report.problems += (train_audio if split == "train" and train_audio is not None
                            else check_audio(split, rows, duration_tolerance))
        texts = [row["target"] for row in rows]
        for row, text in zip(rows, texts, strict=True):
            if not str(row.get("words", text)).strip():
                tags = row.get("event_tags")  # set by apply_event_tags
                report.problems.append(Problem(split, row["ID"], "empty_text", repr(
                    row.get("wrd", text)) + (f" after dropping event tags {tags}" if tags else "")))
                continue
            found = label_check(split, row, text)
            if found is not None:
                report.problems.append(Problem(split, row["ID"], *found))
        if vocab is not None:  # train too: a reloaded vocabulary may not cover changed data
            report.oov[split], report.oov_rate[split] = oov_characters(texts, vocab)
        if split == "train" and audio_stats is not None:
            for row in rows:
                found = row["wav"] in audio_stats and degenerate(audio_stats[row["wav"]], limits)
                if found:
                    report.problems.append(Problem(split, row["ID"], *found))
    content = None if audio_stats is None else {w: s.content for w, s in audio_stats.items()}
    report.problems += [Problem(*found) for found in leakage(splits, content)]
    report.problems += [Problem(split, utt_id, "shared_transcript", detail)
                        for split, utt_id, detail in shared_transcripts(splits)]
    if report_path is not None:
        report.write(report_path)

    oov_failures = {s: r for s, r in report.oov_rate.items() if r > max_oov_rate}
    if oov_failures:  # a systematic mismatch (case, script, normaliser): never skippable
        lines = [f"  {s}: {r:.1%} of characters are not in the vocabulary, e.g. "
                 f"{[c for c, _ in report.oov[s].most_common(8)]}" for s, r in oov_failures.items()]
        raise PreflightError(
            "Text does not match the model vocabulary:\n" + "\n".join(lines)
            + f"\nVocabulary: {''.join(sorted(vocab))!r}\n" + case_hint(report.oov, vocab)
            + "Fix: normalise transcripts the way the "
            "vocabulary expects (case, script, `language` normaliser), or rebuild the vocabulary "
            "from training text that covers these characters. Tolerated: "
            f"{max_oov_rate:.1%} (preflight_max_oov_rate)."
        )
    for kind, detail in WARNINGS.items():
        cut = [p for p in report.problems if p.kind == kind]
        if cut:
            logger.warning("pre-flight: %d %s, e.g. %s (see %s)", len(cut), detail,
                           ", ".join(f"{p.split}/{p.utt_id}" for p in cut[:3]), report_path)
    problems = [p for p in report.problems if p.kind not in WARNINGS]
    fatal = [p for p in problems if mode == "error" or p.split != "train"]
    seconds = {(split, row["ID"]): float(row["duration"])
               for split, rows in splits.items() for row in rows}
    if fatal:
        kinds = Counter(p.kind for p in fatal)
        lines = []
        for kind, n in kinds.items():
            found = [p for p in fatal if p.kind == kind]
            if kind == "beyond_window":  # the longest first: the fix names it
                found.sort(key=lambda p: -seconds[p.split, p.utt_id])
            examples = [f"{p.split}/{p.utt_id} ({p.detail})" for p in found][:3]
            lines.append(f"  {kind}: {n} utterance(s), e.g. {'; '.join(examples)}\n"
                         f"    fix: {FIXES[kind]}")
        raise PreflightError(
            "Pre-flight validation failed:\n" + "\n".join(lines)
            + ("\nOr pass --preflight=skip to drop these training utterances (listed in the "
               f"report {report_path or ''})." if mode == "error" and
               all(p.split == "train" for p in fatal) else
               "\nValid/test utterances are never skipped: fix or remove them in the manifest.")
        )
    for kind, n in Counter(p.kind for p in problems).items():
        logger.warning("pre-flight: skipping %d utterance(s) with %s (see %s)", n, kind,
                       report_path)
    return {split: {p.utt_id for p in problems if p.split == split} for split in splits}


def apply_event_tags(tags, rows, languages):
    """Drop, keep or map the event tags of every transcript (``tags``: a
    ``speechtune.text.EventTags`` from the yaml's ``event_tags`` keys) before the family
    normalises it, and log what was found: a count and examples of tags, and of parenthesised
    text when parentheses are not tag brackets."""
    for language in set(languages.values()):
        tags.check_token(language)
    found, examples, emptied, parenthesised = Counter(), {}, [], []
    for split, split_rows in rows.items():
        for utt_id, row in split_rows.items():
            seen = tags.find(row["wrd"])
            if seen:
                row["event_tags"] = seen
                found.update(seen)
                examples.setdefault(f"{split}/{utt_id}", row["wrd"])
                row["wrd"] = tags.apply(row["wrd"])
                emptied += [f"{split}/{utt_id}"] if not row["wrd"].strip() else []
            if "(" not in tags.brackets and PARENTHESISED.search(row["wrd"]):
                parenthesised.append((f"{split}/{utt_id}", PARENTHESISED.search(row["wrd"])[0]))
    if found:
        done = {"drop": "dropped", "keep": "kept as text",
                "map": f"mapped to {tags.token!r}"}[tags.policy]
        first = next(iter(examples.items()))
        logger.warning(
            "pre-flight: %d event tag(s) in %d transcript(s) %s (event_tags: %s); most common: "
            "%s; e.g. %s: %r%s", sum(found.values()), len(examples), done, tags.policy,
            ", ".join(f"{t} x{n}" for t, n in found.most_common(5)), *first,
            f"; {len(emptied)} transcript(s) held only tags, e.g. {emptied[0]} (empty_text "
            "below)" if emptied else "")
    if parenthesised:
        logger.warning("pre-flight: %d transcript(s) hold parenthesised text, kept as words, "
                       "e.g. %s: %r; if these are event tags, add \"()\" to "
                       "event_tag_brackets", len(parenthesised), *parenthesised[0])
