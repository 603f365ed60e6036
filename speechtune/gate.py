"""The robustness gate: does the fine-tuned model write words where there are none, or loop?

With ``robustness_gate: True`` (or ``tools/checkpoints.py check RUN``) a run decodes, with the
checkpoint it tests and with the model as loaded (its base):

- non-speech clips made offline (``make_clips``): digital silence, white, pink and brown noise,
  mains hum with harmonics, and a music-like clip (chords of harmonic tones with note onsets),
  ``gate_clip_seconds`` each, at the model's sample rate;
- the test splits (their hypotheses from the test stage's ``hyps_<split>.tsv``; the base
  model's from ``hyps_<split>_zero_shot.tsv`` when the run tested zero-shot);
- a long recording (``make_long_recording``): the first test split's utterances in manifest
  order, seeded pauses of 0.3-1.5 s of digital silence between them, until
  ``gate_long_seconds``; cut into chunks of at most the model's window at its quietest points
  (``speechtune.longform.whisper_cuts``, what ``tools/transcribe.py`` does for Whisper; a CTC
  model without a window gets ``longform.CTC_WINDOW_SECONDS``), the chunks decoded with the
  run's test decoding and their words joined.

It reports words written per minute of non-speech (``insertions_per_minute``: each is an
insertion, the reference is empty) and the share of test hypotheses caught in a loop
(``loop_rate``, in %: an n-gram of 1 to 4 words repeated ``LOOP_REPEATS`` times in a row, the
way a decoder that lost its place repeats itself; the clips in a loop are counted too), for
both models, and on the long recording the share of its reference words deleted
(``long_deletion_rate``, %: a model trained on short utterances may stop after the first
sentence of a chunk) and its WER, in ``gate.md`` / ``gate.json`` and the log. The clips and the
long recording of the base model are decoded before training (in ``gate_base.json``).
``gate_max_insertions_rise`` (words per minute), ``gate_max_loop_rise`` and
``gate_max_deletion_rise`` (points) turn a regression against the base model into a failure
(``GateError``) that names the numbers; the test results are written before it. null: report
only.
"""

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import jiwer
import numpy as np
import soundfile as sf
import torch
from speechbrain.utils.distributed import if_main_process, run_on_main

from speechtune import data, longform
from speechtune.metrics import read_hypotheses

logger = logging.getLogger(__name__)
LOOP_REPEATS = 3
MAX_NGRAM = 4
SPLIT = "gate_nonspeech"
LONG_SPLIT = "gate_long"
PAUSE_SECONDS = (0.3, 1.5)  # the long recording's pauses between utterances, drawn uniformly
CLIPS = ("silence", "white_noise", "pink_noise", "brown_noise", "hum", "music")


class GateError(RuntimeError):
    """The fine-tuned model regressed against its base on the robustness gate."""


def _pink(rng, n, exponent):
    """Noise with a 1/f**exponent power spectrum (1: pink, 2: brown), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.maximum(np.fft.rfftfreq(n), 1.0 / n)
    shaped = np.fft.irfft(spectrum / freqs ** (exponent / 2), n)
    return shaped / np.sqrt(np.mean(shaped ** 2))


def _music(rng, n, rate):
    """Chords of three harmonic tones (a I-IV-V-I progression), a note every half second with a
    decaying envelope, over faint noise: tonal, rhythmic, not speech."""
    t = np.arange(n) / rate
    roots = [220.0, 293.66, 329.63, 220.0]
    out = np.zeros(n)
    note = int(0.5 * rate)
    for start in range(0, n, note):
        root = roots[(start // note) % len(roots)]
        seg = slice(start, min(n, start + note))
        envelope = np.exp(-3.0 * (t[seg] - t[start]))
        for ratio in (1.0, 1.25, 1.5):
            for harmonic in (1, 2, 3):
                out[seg] += envelope * np.sin(2 * np.pi * root * ratio * harmonic * t[seg]) \
                    / harmonic
    out += 0.01 * rng.standard_normal(n)
    return out / np.max(np.abs(out))


def make_clips(folder, sample_rate, seconds, seed=0):
    """The non-speech clips as 16-bit WAV files in ``folder``: ``{name: path}`` (seeded: the
    same clips every time)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = int(seconds * sample_rate)
    t = np.arange(n) / sample_rate
    level = 10 ** (-30 / 20)  # -30 dBFS RMS: a quiet room or a recording's noise floor
    signals = {
        "silence": np.zeros(n),
        "white_noise": level * rng.standard_normal(n),
        "pink_noise": level * _pink(rng, n, 1.0),
        "brown_noise": level * _pink(rng, n, 2.0),
        "hum": 0.1 * sum(np.sin(2 * np.pi * 50 * k * t) / k for k in range(1, 8)),
        "music": 0.3 * _music(rng, n, sample_rate),
    }
    paths = {}
    for name in CLIPS:
        paths[name] = folder / f"{name}.wav"
        sf.write(paths[name], np.clip(signals[name], -1, 1).astype("float32"), sample_rate,
                 subtype="PCM_16")
    return paths


def make_long_recording(folder, rows, sample_rate, seconds, window_seconds, seed=0):
    """``long.wav`` in ``folder``: ``rows`` (``{id: manifest row}`` with a scoring reference
    ``words``) in order, a seeded pause after each, until at least ``seconds`` of audio; its
    chunks ``long_<k>.wav`` of at most ``window_seconds`` cut at the quietest points; and
    ``long.json`` with the reference (the utterances' ``words`` joined) and the chunk bounds."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    pieces, words, total = [], [], 0
    for row in rows.values():
        if total >= seconds * sample_rate:
            break
        sig = data.load_audio(row["wav"], sample_rate).numpy()
        pause = np.zeros(int(rng.uniform(*PAUSE_SECONDS) * sample_rate), dtype=sig.dtype)
        pieces += [sig, pause]
        words.append(row["words"])
        total += len(sig) + len(pause)
    if not any(words):
        raise ValueError("gate_long_seconds > 0 needs a first test split with transcribed "
                         "utterances; set --gate_long_seconds=0 to leave the long recording out")
    long = np.concatenate(pieces)
    sf.write(folder / "long.wav", long, sample_rate, subtype="PCM_16")
    cuts = longform.whisper_cuts(torch.from_numpy(long), int(window_seconds * sample_rate),
                                 sample_rate)
    for k, (start, end) in enumerate(cuts):
        sf.write(folder / f"long_{k:03d}.wav", long[start:end], sample_rate, subtype="PCM_16")
    info = {"reference": " ".join(w for w in words if w), "seconds": len(long) / sample_rate,
            "utterances": len(words), "chunks": [[a / sample_rate, b / sample_rate]
                                                 for a, b in cuts]}
    (folder / "long.json").write_text(json.dumps(info, indent=1, ensure_ascii=False),
                                      encoding="utf-8")
    return info


def tokens(text):
    """The runs of letters and digits of ``text``, lower-cased: "j'j'j'" is three tokens (a
    normaliser that keeps in-word apostrophes would see one word and no loop)."""
    return re.findall(r"\w+", text.lower())


def has_loop(words, repeats=LOOP_REPEATS, max_n=MAX_NGRAM):
    """Whether an n-gram of ``1..max_n`` words occurs ``repeats`` times in a row."""
    for n in range(1, max_n + 1):
        for start in range(len(words) - n * repeats + 1):
            gram = words[start:start + n]
            if all(words[start + k * n:start + (k + 1) * n] == gram for k in range(1, repeats)):
                return True
    return False


@dataclass
class GateNumbers:
    """One model's numbers: words per minute on the non-speech clips, test hypotheses in a
    loop (None: no test hypotheses of this model, e.g. a base model not tested zero-shot)."""

    insertions_per_minute: float
    loop_rate: float | None  # % of the test hypotheses
    words: dict  # clip -> words written
    looped: list  # IDs of the test hypotheses in a loop
    hypotheses: int  # test hypotheses checked
    clips_looped: list  # the clips whose hypothesis loops
    long_deletion_rate: float | None = None  # % of the long recording's reference words
    long_wer: float | None = None  # % on the long recording (None: no long recording)


def numbers(clip_texts, clip_seconds, test_texts, long=None):
    """``GateNumbers`` from the clips' hypotheses (``{clip: text}``) and the test hypotheses
    (``{id: raw text}``; None: none), loops looked for in their ``tokens``; ``long``:
    ``(reference, hypothesis)`` of the long recording, normalised (None: none)."""
    words = {clip: len(text.split()) for clip, text in clip_texts.items()}
    minutes = clip_seconds * len(clip_texts) / 60.0
    looped = [] if test_texts is None else sorted(
        i for i, text in test_texts.items() if has_loop(tokens(text)))
    rate = None if not test_texts else 100.0 * len(looped) / len(test_texts)
    clips_looped = sorted(c for c, text in clip_texts.items() if has_loop(tokens(text)))
    deleted = wer = None
    if long is not None:
        reference, hypothesis = long
        # jiwer refuses an empty hypothesis: a model that wrote nothing deleted every word
        counts = jiwer.process_words(reference, hypothesis or "\u2205")
        n = len(reference.split())
        deleted = 100.0 * (counts.deletions + (not hypothesis)) / n
        wer = 100.0 * counts.wer
    return GateNumbers(sum(words.values()) / minutes, rate, words, looped,
                       len(test_texts or {}), clips_looped, deleted, wer)


def _rise(what, base, tuned, limit, key, unit="", points="", detail=""):
    """``[failure]`` when ``tuned`` exceeds ``base`` by more than ``limit``, else ``[]`` (also
    when the limit is None or either value is missing)."""
    if limit is None or None in (base, tuned) or tuned - base <= limit:
        return []
    return [f"{what} {base:.1f}{unit} -> {tuned:.1f}{unit} (+{tuned - base:.1f}{points}; "
            f"{key}={limit:g}){detail}"]


def verdict(base, tuned, max_insertions_rise, max_loop_rise, max_deletion_rise=None):
    """The failures of ``tuned`` against ``base`` under the limits (None: not checked)."""
    return (_rise("words per minute of non-speech", base.insertions_per_minute,
                  tuned.insertions_per_minute, max_insertions_rise, "gate_max_insertions_rise",
                  detail=f"; per clip {tuned.words}")
            + _rise("test hypotheses in a loop", base.loop_rate, tuned.loop_rate, max_loop_rise,
                    "gate_max_loop_rise", "%", " points", f", e.g. {', '.join(tuned.looped[:3])}")
            + _rise("words deleted on the long recording", base.long_deletion_rate,
                    tuned.long_deletion_rate, max_deletion_rise, "gate_max_deletion_rise", "%",
                    " points"))


def report(base, tuned, path_stem):
    """``gate.md`` (a table: base, tested, change) and ``gate.json``, written by the main
    process; returns the Markdown."""
    def cell(value, model):
        if value is None:
            return "- (no zero-shot test)" if model is base else "-"
        return f"{value:.1f}" + (f" ({len(model.looped)} of {model.hypotheses})"
                                 if value is model.loop_rate else "")

    rows = [("words per minute of non-speech", "insertions_per_minute"),
            ("test hypotheses in a loop (%)", "loop_rate"),
            ("long recording: words deleted (%)", "long_deletion_rate"),
            ("long recording: WER (%)", "long_wer")]
    lines = ["| gate | base model | tested checkpoint | change |", "|---|---|---|---|"]
    for name, key in rows if base.long_wer is not None else rows[:2]:
        b, t = getattr(base, key), getattr(tuned, key)
        change = "-" if None in (b, t) else f"{t - b:+.1f}"
        lines.append(f"| {name} | {cell(b, base)} | {cell(t, tuned)} | {change} |")
    clips = sorted(set(base.words) | set(tuned.words))
    lines.append(f"| non-speech clips in a loop | {len(base.clips_looped)} of {len(base.words)} "
                 f"| {len(tuned.clips_looped)} of {len(tuned.words)} | "
                 f"{len(tuned.clips_looped) - len(base.clips_looped):+d} |")
    lines += ["", "| clip | words (base) | words (tested) |", "|---|---|---|"]
    lines += [f"| {c} | {base.words.get(c, 0)}{' (loop)' * (c in base.clips_looped)} | "
              f"{tuned.words.get(c, 0)}{' (loop)' * (c in tuned.clips_looped)} |" for c in clips]
    text = "\n".join(lines) + "\n"
    if if_main_process():
        Path(f"{path_stem}.md").write_text(text, encoding="utf-8")
        Path(f"{path_stem}.json").write_text(json.dumps(
            {"base": base.__dict__, "tested": tuned.__dict__}, indent=1), encoding="utf-8")
    return text


def _decode(experiment, rows, split, zero_shot):
    """``{id: normalised hypothesis}`` of ``rows`` (no reference) through the run's test
    decoding; the test stage writes their ``wer_<split>``/``hyps_<split>`` files."""
    dataset = data.make_dataset(rows, sort_by_duration=False)
    experiment.family.add_pipelines([dataset])
    brain = experiment.brain
    brain.evaluate(dataset, split=split, zero_shot=zero_shot,
                   test_loader_kwargs={"batch_size": len(rows), "num_workers": 0})
    return {s["key"]: " ".join(s["hyp_tokens"]) for s in brain.wer_metric.scores}


def _unscored(row_id, path, seconds, hparams):
    # the reference holds no word (every word written is an insertion); its one word
    # separator only gives the loss a label to pad: the loss is not used
    return {"ID": row_id, "duration": seconds, "wav": str(path), "spk_id": "none", "wrd": "",
            "words": " ", "target": " ", "utt_language": hparams["language"]}


def decode_long(experiment, hparams, zero_shot):
    """The long recording (made once in ``<output_folder>/gate/``) decoded chunk by chunk as
    ``decode_clips`` decodes the clips: ``(reference, hypothesis)``, both normalised; None when
    ``gate_long_seconds`` is 0."""
    seconds = float(hparams["gate_long_seconds"])
    if seconds <= 0:
        return None
    folder = Path(hparams["output_folder"]) / "gate"
    split = next(iter(experiment.tests))
    rows = experiment.tests[split].data  # {id: row}, manifest order, with ``words``
    window = experiment.family.window_seconds() or longform.CTC_WINDOW_SECONDS
    run_on_main(make_long_recording, args=[folder, rows, hparams["sample_rate"], seconds,
                                           window, hparams["seed"]])
    info = json.loads((folder / "long.json").read_text(encoding="utf-8"))
    chunks = {f"long_{k:03d}": _unscored(f"long_{k:03d}", folder / f"long_{k:03d}.wav", b - a,
                                         hparams)
              for k, (a, b) in enumerate(info["chunks"])}
    texts = _decode(experiment, chunks, LONG_SPLIT, zero_shot)
    return info["reference"], " ".join(texts[k] for k in chunks if texts[k].strip()).strip()


def decode_clips(experiment, hparams, zero_shot):
    """Decode the clips with the run's test decoding (``zero_shot``: the model as loaded,
    else the checkpoint the run tests): ``{clip: normalised hypothesis}``. The clips are made
    in ``<output_folder>/gate/``; the test stage writes their ``wer_``/``hyps_`` files."""
    seconds = float(hparams["gate_clip_seconds"])
    folder = Path(hparams["output_folder"]) / "gate"
    # written once (the main process under DDP), then read by every process
    run_on_main(make_clips, args=[folder, hparams["sample_rate"], seconds, hparams["seed"]])
    rows = {f"gate_{name}": _unscored(f"gate_{name}", folder / f"{name}.wav", seconds, hparams)
            for name in CLIPS}
    return {key.removeprefix("gate_"): text
            for key, text in _decode(experiment, rows, SPLIT, zero_shot).items()}


def test_hypotheses(output_folder, splits, suffix=""):
    """``{split/id: raw hypothesis}`` of the test splits' ``hyps_<split><suffix>.tsv``; None if
    one is missing (a base model not tested zero-shot)."""
    found = {}
    for split in splits:
        path = Path(output_folder) / f"hyps_{split}{suffix}.tsv"
        if not path.is_file():
            return None
        found.update({f"{split}/{i}": hyp for i, (_, hyp) in read_hypotheses(path)[1].items()})
    return found


def base_numbers(experiment, hparams):
    """The base model's gate numbers. Its clip and long-recording hypotheses are decoded once,
    before training, and kept in ``gate_base.json`` (a resumed run holds trained weights by
    then); its test hypotheses are those of the zero-shot test, if the run made one."""
    path = Path(hparams["output_folder"]) / "gate_base.json"
    saved = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    long_wanted = float(hparams["gate_long_seconds"]) > 0
    if "clips" not in saved or (long_wanted and "long" not in saved):  # none yet, or another
        saved = {"clips": decode_clips(experiment, hparams, zero_shot=True),  # layout
                 "long": decode_long(experiment, hparams, zero_shot=True)}
        if if_main_process():  # under DDP every process decoded the same audio
            path.write_text(json.dumps(saved, indent=1, ensure_ascii=False), encoding="utf-8")
    return numbers(saved["clips"], float(hparams["gate_clip_seconds"]),
                   test_hypotheses(hparams["output_folder"], experiment.tests, "_zero_shot"),
                   saved["long"] if long_wanted else None)


def check(experiment, hparams, base):
    """The tested checkpoint's gate numbers against ``base``: ``gate.md`` / ``gate.json``, the
    table in the log; ``GateError`` naming the numbers when a limit is passed."""
    tuned = numbers(decode_clips(experiment, hparams, zero_shot=False),
                    float(hparams["gate_clip_seconds"]),
                    test_hypotheses(hparams["output_folder"], experiment.tests),
                    decode_long(experiment, hparams, zero_shot=False))
    text = report(base, tuned, Path(hparams["output_folder"]) / "gate")
    logger.info("robustness gate (gate.md):\n%s", text)
    failures = verdict(base, tuned, hparams["gate_max_insertions_rise"],
                       hparams["gate_max_loop_rise"], hparams["gate_max_deletion_rise"])
    if failures:
        raise GateError("The robustness gate failed against the base model:\n  "
                        + "\n  ".join(failures) + "\nThe test results are written; the "
                        "table is in gate.md. Fix: fewer steps or a lower LR, retain sets "
                        "(retain_max_rise, replay_fraction), or raise the gate's limits.")
    return base, tuned, text
