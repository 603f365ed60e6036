"""speechtune.longform (tools/transcribe.py on audio of any length): where Whisper chunks are cut,
how CTC windows are laid out and merged, the window read from the model, the CLI's timestamps,
and the acceptance test on the real whisper-base (a concatenation of bundled utterances with
pauses, long-form WER against per-utterance WER)."""

import csv
import functools
import importlib.util
import json
import os
import random
import shutil

import jiwer
import pytest
import soundfile as sf
import torch
from fakes import REPO, SYNTHETIC
from speechbrain.dataio.encoder import CTCTextEncoder
from speechbrain.decoders.ctc import ctc_greedy_decode
from speechbrain.decoders.seq2seq import S2SWhisperGreedySearcher
from speechbrain.inference.ASR import EncoderASR, WhisperASR
from speechbrain.nnet.activations import Softmax
from speechbrain.nnet.containers import LengthsCapableSequential
from speechbrain.nnet.linear import Linear

from speechtune import longform
from speechtune.data import load_audio
from speechtune.models import SSLEncoder
from speechtune.text import get_normalizer
from speechtune.whisper_models import Whisper, WhisperEncoder

RATE = 16000
spec = importlib.util.spec_from_file_location("transcribe_tool", REPO / "tools" / "transcribe.py")
transcribe_tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(transcribe_tool)


def char_tokenizer(chars):
    tokenizer = CTCTextEncoder()
    tokenizer.insert_blank(index=0)
    tokenizer.update_from_iterable(chars, sequence_input=False)
    return tokenizer


def ctc_interface(encoder, tokenizer):
    """``EncoderASR`` as an export builds it: encoder, greedy decoding with blank 0."""
    return EncoderASR(modules={"encoder": encoder}, hparams={
        "tokenizer": tokenizer, "sample_rate": RATE,
        "decoding_function": functools.partial(ctc_greedy_decode, blank_id=0)})


class FrameLocal(torch.nn.Module):
    """A CTC encoder whose frame t depends on samples [320 t, 320 (t + 1)) alone: the level of
    that block (its mean x ``levels``, rounded) is the frame's argmax. Windowed decoding of it
    must give the single pass's transcript exactly."""

    frame_samples, window_seconds = 320, None

    def __init__(self, levels):
        super().__init__()
        self.levels = levels

    def output_frames(self, num_samples):
        return num_samples // self.frame_samples

    def forward(self, wavs, wav_lens=None):
        frames = wavs.shape[1] // self.frame_samples
        blocks = wavs[:, :frames * self.frame_samples].reshape(len(wavs), frames, -1)
        level = blocks.mean(-1, keepdim=True) * self.levels
        return -(level - torch.arange(self.levels)) ** 2  # log-probs up to a constant


def block_signal(levels, frames, seed):
    """Blocks of constant level with runs (repeats) and level 0 (the blank) between words."""
    rng = random.Random(seed)
    values = []
    while len(values) < frames:
        values += [rng.choice([0, 0, 1]) if rng.random() < 0.3 else rng.randrange(levels)] * \
            rng.randint(1, 4)
    return torch.tensor(values[:frames], dtype=torch.float32).repeat_interleave(320) / levels


def test_whisper_cuts_fall_in_the_pauses_near_the_window_end():
    gen = torch.Generator().manual_seed(0)
    # seconds; a pause early in the first window, then one in each window's last quarter
    speech = [(0.0, 3.0), (4.0, 7.1), (7.5, 14.0), (14.3, 21.0), (21.6, 26.0)]
    sig = torch.zeros(26 * RATE)
    for a, b in speech:
        sig[int(a * RATE):int(b * RATE)] = torch.randn(int(b * RATE) - int(a * RATE),
                                                       generator=gen) * 0.1
    cuts = longform.whisper_cuts(sig, 8 * RATE, RATE)
    assert cuts[0][0] == 0 and cuts[-1][1] == sig.shape[0]
    assert all(b == c for (_, b), (c, _) in zip(cuts, cuts[1:], strict=False))
    assert all(0 < b - a <= 8 * RATE for a, b in cuts)
    # each cut is in the pause within its window's last quarter (6-8 s, then 13.4-15.4 s, ...)
    pauses = [(7.1, 7.5), (14.0, 14.3), (21.0, 21.6)]
    assert len(cuts) == 4
    for (_, cut), (a, b) in zip(cuts, pauses, strict=False):
        assert a * RATE <= cut <= b * RATE, (cut / RATE, a, b)
    # no pause at all: cut at the quietest point, never past the window
    cuts = longform.whisper_cuts(torch.randn(20 * RATE, generator=gen), 8 * RATE, RATE)
    assert [b - a <= 8 * RATE for a, b in cuts] == [True] * 3
    assert longform.whisper_cuts(sig[:8 * RATE], 8 * RATE, RATE) == [(0, 8 * RATE)]


@pytest.mark.parametrize("total", [4000, 31999, 32000, 32321, 100000, 160007])
def test_ctc_windows_keep_each_frame_once_away_from_the_window_edges(total):
    window, overlap, stride = 32000, 8000, 320
    windows = longform.ctc_windows(total, window, overlap, stride)
    frames = -(-total // stride)
    assert windows[0][0] == 0 and windows[-1][1] == total
    assert all(s % stride == 0 and 0 < e - s <= window for s, e, _, _ in windows)
    kept = [(k0, k1 if k1 is not None else frames) for _, _, k0, k1 in windows]
    assert kept[0][0] == 0 and kept[-1][1] == frames
    assert all(a[1] == b[0] for a, b in zip(kept, kept[1:], strict=False))  # contiguous, once
    for i, ((start, end, _, _), (k0, k1)) in enumerate(zip(windows, kept, strict=True)):
        margin = (overlap // 2 - stride) // stride  # frames kept away from a shared edge
        if i > 0:
            assert k0 - start // stride >= margin
        if i < len(windows) - 1:
            assert end // stride - k1 >= margin
    with pytest.raises(ValueError, match="under the window"):
        longform.ctc_windows(total, window, window, stride)


def test_ctc_long_form_of_a_frame_local_model_is_the_single_pass():
    levels = 12
    tokenizer = char_tokenizer(list(" abcdefghijk"))
    asr = ctc_interface(FrameLocal(levels), tokenizer)
    sig = block_signal(levels, 1200, seed=1)  # 24 s
    (single,), _ = asr.transcribe_batch(sig[None], torch.ones(1))
    assert len(single.split()) > 50
    for window_s, overlap_s, batch_size in [(2.0, 0.5, 1), (3.3, 1.0, 4), (5.0, 0.0, 2)]:
        window = longform.window_samples(asr, window_s)
        text, segments = longform.transcribe_long(
            asr, sig, batch_size, window, longform.overlap_samples(asr, window, overlap_s))
        assert text == single, (window_s, overlap_s)
        assert len(segments) > 4 and segments[0].start == 0 and segments[-1].end == 24.0
        assert all(a.end == b.start for a, b in zip(segments, segments[1:], strict=False))
        assert " ".join(s.text for s in segments if s.text).split() == single.split()


@pytest.fixture(scope="module", params=["whisper_encoder", "wavlm"])
def real_ctc(request, tmp_path_factory):
    """CTC on the micro Whisper's encoder (4 s window) or on a micro WavLM (any length), with a
    random head, built as an export loads them: their greedy transcripts are long strings of
    characters."""
    torch.manual_seed(0)
    save = str(tmp_path_factory.mktemp("hf"))
    if request.param == "wavlm":
        encoder = SSLEncoder(str(request.getfixturevalue("micro_encoder_dir")), save,
                             freeze=True, freeze_feature_extractor=True,
                             apply_spec_augment=False, output_norm=False)
    else:
        encoder = WhisperEncoder(str(request.getfixturevalue("micro_whisper_en_dir")), save,
                                 freeze=True)
    tokenizer = char_tokenizer(list(" abcdefghijklmnopqrstuvwxyz'"))
    head = Linear(input_size=encoder.model.config.hidden_size, n_neurons=len(tokenizer.lab2ind))
    return request.param, ctc_interface(LengthsCapableSequential(
        ssl=encoder.eval(), head=head, log_softmax=Softmax(apply_log=True)).eval(), tokenizer)


def bundled(names, language="en"):
    with open(SYNTHETIC / language / "test.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:names]
    for row in rows:
        row["wav"] = row["wav"].replace("$data_root", str(SYNTHETIC))
    return rows


def test_ctc_windows_of_a_real_encoder_are_each_window_decoded_alone(real_ctc, tmp_path):
    kind, asr = real_ctc
    assert longform.model_window(asr) == (4 * RATE if kind == "whisper_encoder" else None)
    sig = torch.cat([load_audio(r["wav"], RATE) for r in bundled(4)])  # about 9 s
    window = longform.window_samples(asr, 4)
    overlap = longform.overlap_samples(asr, window, 1)
    text, segments = longform.transcribe_long(asr, sig, 1, window, overlap)
    assert len(text) > 20 and segments[-1].end == sig.shape[0] / RATE
    # the merge: each window decoded alone, its kept frames' argmax, collapsed in order
    ids = []
    for start, end, k0, k1 in longform.ctc_windows(sig.shape[0], window, overlap, 320):
        with torch.no_grad():
            best = asr.encode_batch(sig[None, start:end], torch.ones(1))[0].argmax(-1)
        ids += best[k0 - start // 320:None if k1 is None else k1 - start // 320].tolist()
    if kind == "wavlm":  # a single pass has as many frames (the Whisper encoder's is 4 s long)
        with torch.no_grad():
            assert len(ids) == asr.encode_batch(sig[None], torch.ones(1)).shape[1]
    assert len(ids) == longform.output_frames(asr, sig.shape[0]) or kind == "whisper_encoder"
    (alone,) = ctc_greedy_decode(torch.nn.functional.one_hot(torch.tensor(ids))[None].float(),
                                 torch.ones(1), blank_id=0)
    assert text == "".join(asr.tokenizer.decode_ndim(alone))
    if kind == "whisper_encoder":  # every window padded to the encoder's own: batches alike
        assert len(ids) == -(-sig.shape[0] // 320)  # one per started 20 ms frame of the file
        assert longform.transcribe_long(asr, sig, 3, window, overlap) == (text, segments)

    # a file within the window takes today's path: the interface's own transcript
    short = tmp_path / "short.wav"
    sf.write(short, sig[:3 * RATE].numpy(), RATE)
    texts, found, failed = longform.transcribe_files(asr, [short], 4, window, progress=False)
    (single,), _ = asr.transcribe_batch(sig[None, :3 * RATE], torch.ones(1))
    assert texts == {short: single} and not failed
    assert found[short] == [{"start": 0.0, "end": 3.0, "text": single.strip()}]


def test_window_is_read_from_the_whisper_model_and_bad_values_named(micro_whisper_en_dir,
                                                                    tmp_path):
    # saved as an export saves a run's model (config + preprocessor of the cut window), the
    # folder loads with its 2 s window and no window_seconds given
    cut = Whisper(str(micro_whisper_en_dir), str(tmp_path), window_seconds=2, freeze=True)
    shutil.copytree(micro_whisper_en_dir, tmp_path / "saved")
    cut.model.save_pretrained(tmp_path / "saved")
    cut.feature_extractor.save_pretrained(tmp_path / "saved")
    whisper = Whisper(str(tmp_path / "saved"), str(tmp_path), freeze=True)
    asr = WhisperASR(modules={"whisper": whisper, "decoder": S2SWhisperGreedySearcher(
        model=whisper, min_decode_ratio=0.0, max_decode_ratio=0.1)}, hparams={
        "whisper": whisper, "language": "en", "sample_rate": RATE,
        "normalized_transcripts": False})
    assert longform.model_window(asr) == longform.window_samples(asr) == 2 * RATE
    assert longform.window_samples(asr, 1.5) == 24000
    with pytest.raises(ValueError, match="at most the model's 2 s"):
        longform.window_samples(asr, 3)
    sig = torch.randn(5 * RATE) * 0.05
    _, segments = longform.transcribe_long(asr, sig, 2)
    assert len(segments) == 3 and all(s.end - s.start <= 2 for s in segments)
    assert segments[-1].end == 5.0


def test_the_cli_writes_segments_and_refuses_timestamps_as_text(monkeypatch, tmp_path, capsys):
    levels = 12
    asr = ctc_interface(FrameLocal(levels), char_tokenizer(list(" abcdefghijk")))
    monkeypatch.setattr(transcribe_tool, "load_asr", lambda folder, device: asr)
    long_sig, short_sig = block_signal(levels, 2000, 2), block_signal(levels, 100, 3)
    sf.write(tmp_path / "long.wav", long_sig.numpy(), RATE)  # 40 s: beyond the 30 s default
    sf.write(tmp_path / "short.wav", short_sig.numpy(), RATE)
    out = tmp_path / "out.jsonl"
    assert transcribe_tool.main(["export", str(tmp_path / "long.wav"), str(tmp_path / "short.wav"),
                                 "--out", str(out), "--timestamps", "--quiet"]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["audio"] for r in records] == [str(tmp_path / "long.wav"),
                                             str(tmp_path / "short.wav")]
    (single,), _ = asr.transcribe_batch(long_sig[None], torch.ones(1))
    assert records[0]["text"] == single and len(records[0]["segments"]) == 2
    assert records[0]["segments"][-1]["end"] == 40.0 and len(records[1]["segments"]) == 1
    with pytest.raises(SystemExit):
        transcribe_tool.main(["export", str(tmp_path / "long.wav"), "--timestamps",
                              "--format", "text"])
    assert "--timestamps writes JSON lines" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        transcribe_tool.main(["export", str(tmp_path / "long.wav"), "--overlap_seconds", "40"])
    assert "under the window's 30 s" in capsys.readouterr().err


def test_whisper_base_long_form_wer_is_within_2_of_per_utterance(whisper_base_dir, tmp_path):
    """The issue's acceptance test: bundled test utterances joined by 0.3-1.5 s pauses into one
    file, decoded by zero-shot whisper-base at its own 30 s window as one long file and one
    utterance at a time. Long-form WER may not exceed per-utterance + 2. Here the first 12
    held-out English ones (about 40 s, two chunks); docs/longform.md measures 40 (about 2 min)
    with LONGFORM_UTTERANCES=40 and LONGFORM_SPLIT=en_heldout or en."""
    rows = bundled(int(os.environ.get("LONGFORM_UTTERANCES", "12")),
                   os.environ.get("LONGFORM_SPLIT", "en_heldout"))
    whisper = Whisper("packaged:whisper-base", str(tmp_path / "hf"), language="en",
                      task="transcribe", freeze=True)
    asr = WhisperASR(modules={"whisper": whisper, "decoder": S2SWhisperGreedySearcher(
        model=whisper, min_decode_ratio=0.0, max_decode_ratio=0.25)}, hparams={
        "whisper": whisper, "language": "en", "sample_rate": RATE,
        "normalized_transcripts": False})
    rng, pieces, pauses, at = random.Random(0), [], [], 0
    for row in rows:
        sig = load_audio(row["wav"], RATE)
        gap = int(rng.uniform(0.3, 1.5) * RATE)
        pieces += [sig, torch.zeros(gap)]
        at += sig.shape[0]
        pauses.append((at / RATE, (at + gap) / RATE))
        at += gap
    sf.write(tmp_path / "long.wav", torch.cat(pieces).numpy(), RATE)
    files = [row["wav"] for row in rows]
    texts, segments, failed = longform.transcribe_files(
        asr, [tmp_path / "long.wav", *files], 8, progress=False)
    assert not failed and len(segments[tmp_path / "long.wav"]) >= 2
    for segment in segments[tmp_path / "long.wav"][:-1]:  # every cut lies in a pause
        assert any(a <= segment["end"] <= b for a, b in pauses), segment
    normalize = get_normalizer("en")
    reference = " ".join(normalize(row["wrd"]) for row in rows)
    per_utterance = 100 * jiwer.wer(reference, normalize(" ".join(texts[f] for f in files)))
    long_form = 100 * jiwer.wer(reference, normalize(texts[tmp_path / "long.wav"]))
    print(f"\n{len(rows)} utterances, {at / RATE:.1f} s: per-utterance WER {per_utterance:.2f}%, "
          f"long-form WER {long_form:.2f}%")
    assert long_form < 50  # the model understood the speech: the comparison means something
    assert long_form <= per_utterance + 2
