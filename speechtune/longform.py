"""Transcription of audio of any length with an exported model (``speechtune.export.load_asr``):
files no longer than the model's window in batches of similar duration, longer ones cut into
pieces decoded in batches (``tools/transcribe.py``; docs/longform.md).

- Whisper (``WhisperASR``): the file is cut into chunks of at most the model's own window (the
  export's ``window_seconds``: 30 s for OpenAI's models, shorter where a recipe cut the encoder's
  positions). Each cut is at the quietest point near the window's end: the centre of the 0.2 s
  stretch of lowest mean energy among those centred in the last quarter of the window (the
  latest one on a tie, e.g. digital silence), so words are rarely split. Each chunk is decoded
  alone with the export's searcher; the file's text is the chunks' texts joined by spaces.
  SpeechBrain's ``WhisperASR.transcribe_file`` chunks too, but at fixed whole seconds (through
  words), one chunk at a time.
- CTC (``EncoderASR``, greedy): overlapping windows (the model's window for Whisper's encoder,
  ``CTC_WINDOW_SECONDS`` for SSL encoders) starting on encoder frame boundaries. Each window
  keeps the argmax of its middle frames: the boundary between two windows is the frame nearest
  the middle of their overlap, so a frame kept lies about half the overlap or more from a
  window's edge (except at the file's ends). The kept frames, in order, are collapsed as
  SpeechBrain's greedy decoder does (``filter_ctc_output``). Only the argmax ids are kept (one
  integer per 20 ms frame of the file), and the model sees ``batch_size`` windows at a time.

Segments (``--timestamps``): ``{start, end, text}`` in seconds. Whisper: one per chunk. CTC: one
per window, its kept frames' span; a word belongs to the window holding its first character.
"""

import functools
import math
from dataclasses import asdict, dataclass

import soundfile as sf
import torch
from speechbrain.decoders.ctc import filter_ctc_output
from speechbrain.inference.ASR import EncoderASR, WhisperASR
from tqdm import tqdm

from speechtune.data import load_audio

CTC_WINDOW_SECONDS = 30.0  # SSL encoders take any length: attention memory grows with its square
CUT_SEARCH = 0.25          # Whisper: a cut is sought in the last quarter of the window
QUIET_SECONDS = 0.2        # the stretch whose mean energy ranks cut points
QUIET_HOP_SECONDS = 0.01   # cut points are 10 ms apart


@dataclass
class Segment:
    """A piece of a file's transcript, times in seconds from the file's start."""

    start: float
    end: float
    text: str


# ---------------------------------------------------------------------------- the model
def is_whisper(asr):
    """Whether ``asr`` is an encoder-decoder Whisper (chunks) rather than CTC (windows)."""
    if isinstance(asr, WhisperASR):
        return True
    if isinstance(asr, EncoderASR):
        return False
    raise TypeError(f"{type(asr).__name__}: long-form decoding knows WhisperASR and EncoderASR "
                    "(what speechtune.export.load_asr returns)")


def _ctc_encoder(asr):
    """The CTC export's encoder wrapper (``SSLEncoder``, ``WhisperEncoder``): the ``ssl`` of
    its ``encoder`` sequence."""
    return getattr(asr.mods.encoder, "ssl", asr.mods.encoder)


def model_window(asr):
    """The model's own input window in samples, or None where it takes any length (SSL)."""
    wrapper = asr.mods.whisper if is_whisper(asr) else _ctc_encoder(asr)
    seconds = getattr(wrapper, "window_seconds", None)
    return None if seconds is None else int(round(seconds * asr.hparams.sample_rate))


def window_samples(asr, seconds=None):
    """The longest piece decoded in one pass, in samples: ``seconds`` if given (at most the
    model's window), else the model's window (``CTC_WINDOW_SECONDS`` for SSL encoders)."""
    own = model_window(asr)
    if seconds is None:
        return own if own is not None else int(CTC_WINDOW_SECONDS * asr.hparams.sample_rate)
    wanted = int(round(seconds * asr.hparams.sample_rate))
    if wanted <= 0 or (own is not None and wanted > own):
        limit = f"at most the model's {own / asr.hparams.sample_rate:g} s" if own else "above 0"
        raise ValueError(f"window of {seconds} s: it must be {limit}")
    return wanted


def overlap_samples(asr, window, seconds=None):
    """CTC windows' overlap in samples: ``seconds``, else a quarter of ``window`` (at most 2 s:
    enough context for the frames kept, little encoded twice)."""
    rate = asr.hparams.sample_rate
    overlap = min(window // 4, 2 * rate) if seconds is None else int(round(seconds * rate))
    if not 0 <= overlap < window:
        raise ValueError(f"overlap of {seconds} s: it must be at least 0 and under the "
                         f"window's {window / rate:g} s")
    return overlap


def frame_samples(asr):
    """Input samples per output frame of a CTC encoder (320 = 20 ms at 16 kHz)."""
    encoder = _ctc_encoder(asr)
    if hasattr(encoder, "frame_samples"):  # WhisperEncoder: mel hop x conv stride
        return int(encoder.frame_samples)
    return math.prod(encoder.model.config.conv_stride)  # the SSL models' CNN strides


def output_frames(asr, num_samples):
    """Frames a CTC encoder returns for ``num_samples`` samples of audio (the model's own
    count; a padded batch returns more, which are the padding's)."""
    encoder = _ctc_encoder(asr)
    if hasattr(encoder, "output_frames"):  # WhisperEncoder: one per started 20 ms
        return int(encoder.output_frames(num_samples))
    return int(encoder.model._get_feat_extract_output_lengths(torch.tensor(num_samples)))


def _blank_index(asr):
    """The greedy decoder's blank id (exports write it in ``decoding_function``)."""
    decode = asr.hparams.decoding_function
    if not isinstance(decode, functools.partial) or "blank_id" not in decode.keywords:
        raise ValueError("long-form CTC merges greedy frame decisions: the export's "
                         "decoding_function must be ctc_greedy_decode with its blank_id")
    blank = decode.keywords["blank_id"]
    return blank if blank >= 0 else len(asr.tokenizer.lab2ind) + blank


# ---------------------------------------------------------------------------- cutting
def whisper_cuts(sig, window, sample_rate):
    """``[(start, end), ...]`` sample ranges of at most ``window`` covering ``sig``, each cut at
    the quietest point of the last ``CUT_SEARCH`` of the window (module docstring)."""
    total = sig.shape[0]
    span = max(1, int(QUIET_SECONDS * sample_rate))
    hop = max(1, int(QUIET_HOP_SECONDS * sample_rate))
    energy = None
    if total > window:  # mean energy of each stretch starting at k * hop
        power = torch.nn.functional.pad(sig.float() ** 2, (0, span))
        energy = torch.nn.functional.avg_pool1d(power[None, None], span, hop)[0, 0]
        centres = torch.arange(len(energy)) * hop + span // 2
    cuts, start = [], 0
    while total - start > window:
        lo = start + window - int(CUT_SEARCH * window)
        candidates = ((centres > max(lo, start)) & (centres <= start + window)).nonzero()[:, 0]
        if len(candidates) == 0:  # a window shorter than the 10 ms grid: cut at its end
            end = start + window
        else:
            quiet = energy[candidates]
            latest = (quiet == quiet.min()).nonzero()[-1, 0]
            end = int(centres[candidates[latest]])
        cuts.append((start, end))
        start = end
    cuts.append((start, total))
    return cuts


def ctc_windows(total, window, overlap, stride):
    """``[(start, end, keep_from, keep_to), ...]``: windows of at most ``window`` samples
    covering ``total``, starting on multiples of ``stride``, ``overlap`` samples apart from the
    next (more for the last, which ends at the file's end); each keeps the global frames
    ``[keep_from, keep_to)`` (``keep_to`` None: to its end). The boundary between two windows is
    the frame nearest the middle of their overlap."""
    if not 0 <= overlap < window:
        raise ValueError(f"overlap {overlap} samples: it must be at least 0 and under the "
                         f"window's {window}")
    hop = max(stride, (window - overlap) // stride * stride)
    starts = [0]
    while starts[-1] + window < total:
        following = starts[-1] + hop
        if following + window >= total:  # the last window: as long as the grid allows
            following = max(starts[-1] + stride, -(-(total - window) // stride) * stride)
        starts.append(following)
    bounds = [round((starts[i + 1] + starts[i] + window) / 2 / stride)
              for i in range(len(starts) - 1)]
    return [(s, min(s + window, total), ([0] + bounds)[i], (bounds + [None])[i])
            for i, s in enumerate(starts)]


# ---------------------------------------------------------------------------- decoding
def _batches(items, size):
    return [items[i:i + size] for i in range(0, len(items), size)]


def padded(pieces):
    """``(wavs, relative lengths)`` of 1-D tensors, zero-padded to the longest."""
    longest = max(p.shape[0] for p in pieces)
    wavs = torch.zeros(len(pieces), longest)
    for row, piece in enumerate(pieces):
        wavs[row, :piece.shape[0]] = piece
    return wavs, torch.tensor([p.shape[0] / longest for p in pieces])


def _text(words):
    return words if isinstance(words, str) else " ".join(words)


def transcribe_whisper(asr, sig, window, batch_size):
    """``(text, segments)`` of ``sig`` in chunks of at most ``window`` samples."""
    rate = asr.hparams.sample_rate
    cuts = whisper_cuts(sig, window, rate)
    segments = []
    for batch in _batches(cuts, batch_size):
        wavs, lens = padded([sig[a:b] for a, b in batch])
        words, _ = asr.transcribe_batch(wavs, lens)
        segments += [Segment(a / rate, b / rate, _text(w).strip())
                     for (a, b), w in zip(batch, words, strict=True)]
    return " ".join(s.text for s in segments if s.text), segments


def transcribe_ctc(asr, sig, window, batch_size, overlap):
    """``(text, segments)`` of ``sig`` by greedy CTC over overlapping windows of at most
    ``window`` samples, ``overlap`` samples shared by neighbours."""
    stride, blank = frame_samples(asr), _blank_index(asr)
    windows = ctc_windows(sig.shape[0], window, overlap, stride)
    ids, spans = [], []
    for batch in _batches(windows, batch_size):
        wavs, lens = padded([sig[a:b] for a, b, _, _ in batch])
        with torch.no_grad():
            best = asr.encode_batch(wavs, lens).argmax(dim=-1).cpu()
        for (start, end, keep_from, keep_to), row in zip(batch, best, strict=True):
            valid = min(output_frames(asr, end - start), row.shape[0])
            first = start // stride
            local_to = valid if keep_to is None else keep_to - first
            if not 0 <= keep_from - first <= local_to <= valid:
                raise RuntimeError(f"window at sample {start} has {valid} frames; its kept "
                                   f"frames [{keep_from}, {keep_to}) do not fit in it")
            ids.append(row[keep_from - first:local_to])
            spans.append((keep_from, first + local_to))
    ids = torch.cat(ids).tolist()
    text = "".join(asr.tokenizer.decode_ndim(filter_ctc_output(ids, blank_id=blank)))
    return text, _ctc_segments(asr, ids, blank, spans, stride, sig.shape[0])


def _ctc_segments(asr, ids, blank, spans, stride, total):
    """One segment per window: the words whose first character it emitted."""
    rate = asr.hparams.sample_rate
    words, current = [], None  # [frame of the first character, characters]
    for frame, token in enumerate(ids):
        if token == blank or (frame and ids[frame - 1] == token):
            continue
        char = asr.tokenizer.decode_ndim([token])[0]
        if char.isspace():
            current = None
        elif current is None:
            current = [frame, char]
            words.append(current)
        else:
            current[1] += char
    segments = []
    for i, (first, last) in enumerate(spans):
        text = " ".join(w for f, w in words if first <= f < last)
        end = total if i == len(spans) - 1 else last * stride
        segments.append(Segment(first * stride / rate, end / rate, text))
    return segments


def transcribe_long(asr, sig, batch_size, window=None, overlap=None):
    """``(text, segments)`` of a mono ``sig`` at the model's rate, of any length. ``window`` and
    ``overlap`` are in samples (defaults: ``window_samples``, ``overlap_samples``)."""
    window = window or window_samples(asr)
    if is_whisper(asr):
        return transcribe_whisper(asr, sig, window, batch_size)
    overlap = overlap_samples(asr, window) if overlap is None else overlap
    return transcribe_ctc(asr, sig, window, batch_size, overlap)


def transcribe_files(asr, paths, batch_size, window=None, overlap=None, progress=True):
    """``({path: text}, {path: [segment dicts]}, {path: error})``.

    Files no longer than ``window`` samples (default ``window_samples``) go in batches of
    ``batch_size`` of similar duration (durations from the file headers, audio read one batch
    at a time), one pass each, as the recipes decode; a longer one is read whole and decoded
    piece by piece (``transcribe_long``), ``batch_size`` pieces at a time."""
    rate = asr.hparams.sample_rate
    window = window or window_samples(asr)
    seconds, failed = {}, {}
    for path in paths:
        try:
            info = sf.info(str(path))
            seconds[path] = info.frames / info.samplerate
        except Exception as err:  # noqa: BLE001 - reported by name, the rest still decoded
            failed[path] = f"{type(err).__name__}: {err}"
    short = sorted((p for p in seconds if seconds[p] * rate <= window), key=seconds.get)
    long_ = [p for p in seconds if seconds[p] * rate > window]
    texts, segments = {}, {}
    work = [("short", b) for b in _batches(short, batch_size)] + [("long", [p]) for p in long_]
    for kind, batch in tqdm(work, desc="transcribing", disable=not progress):
        sigs = {}
        for path in batch:
            try:
                sigs[path] = load_audio(str(path), rate)
            except Exception as err:  # noqa: BLE001 - as above
                failed[path] = f"{type(err).__name__}: {err}"
        if not sigs:
            continue
        if kind == "long":
            (path, sig), = sigs.items()
            texts[path], found = transcribe_long(asr, sig, batch_size, window, overlap)
            segments[path] = [asdict(s) for s in found]
            continue
        words, _ = asr.transcribe_batch(*padded(list(sigs.values())))
        for (path, sig), text in zip(sigs.items(), words, strict=True):
            texts[path] = _text(text)
            segments[path] = [asdict(Segment(0.0, sig.shape[0] / rate, texts[path].strip()))]
    return texts, segments, failed
