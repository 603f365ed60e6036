#!/usr/bin/env python3
"""Export formats side by side: folder sizes, CPU greedy decoding speed and WER.

A finished Whisper run is exported as transformers files (float32) and converted to CTranslate2
float32, float16 and int8 folders (``speechtune.ct2_export``); a CTC run (``--ctc_run``) as
transformers files and ONNX (``speechtune.onnx_export``). Every model then decodes the same
manifest (``--split``, the run's language) greedily on the CPU with ``--threads`` threads, in
batches of ``--batch_size``, in this one process: transformers' ``generate(num_beams=1)`` beside
CTranslate2's ``generate(beam_size=1)`` (same window, prompt and suppressed tokens), and the CTC
run's SpeechBrain encoder beside onnxruntime. Each model decodes one batch untimed, then the
whole split ``--repeats`` times; the fastest pass is reported, as utterances a second and as a
ratio to the PyTorch model. WER is scored with the run's scoring normaliser:

    python tools/benchmark_export.py \\
        --whisper_run recipes/Synthetic/Whisper/results/whisper_base_da/1986 \\
        --split recipes/Synthetic/data/da/test.csv \\
        --ctc_run recipes/Synthetic/CTC/results/wavlm_tiny_en/1986 \\
        --ctc_split recipes/Synthetic/data/en/test.csv --threads 2

Prints a Markdown table; ``--out F`` appends the numbers as one JSON line.
"""

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import jiwer
import torch
from transformers import WhisperForConditionalGeneration, WhisperProcessor

from speechtune import ct2_export, onnx_export
from speechtune.data import load_audio, read_manifest
from speechtune.export import export, load_asr
from speechtune.text import get_normalizer
from speechtune.whisper import scoring_normalizer

CT2_TYPES = ("float32", "float16", "int8")


def folder_mb(folder):
    """Megabytes of the files in ``folder``."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) / 2**20


def read_split(manifest):
    """``(signals, references)`` of a manifest CSV (``$data_root``: the folder above its own)."""
    rows = read_manifest(manifest, Path(manifest).resolve().parent.parent).values()
    return [load_audio(r["wav"], 16000).numpy() for r in rows], [r["wrd"] for r in rows]


def timed(decode, batches, repeats):
    """``(hypotheses, fastest seconds)`` of ``decode`` over ``batches``, after one warm-up
    batch."""
    decode(batches[0])
    best, texts = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        texts = [t for batch in batches for t in decode(batch)]
        best = min(best, time.perf_counter() - start)
    return texts, best


def wer(references, hypotheses, normalize):
    """Corpus WER in % after ``normalize`` (jiwer)."""
    refs = [normalize(r) for r in references]
    return 100 * jiwer.wer(refs, [normalize(h) or "" for h in hypotheses])


def whisper_rows(run, manifest, work, threads, batch_size, repeats):
    """Size, speed and WER rows of the Whisper run's transformers and CTranslate2 models."""
    hf = work / "whisper_transformers"
    export(run, hf)
    info = json.loads((hf / "speechtune_export.json").read_text(encoding="utf-8"))
    language = info["language"]
    signals, references = read_split(manifest)
    batches = [signals[i:i + batch_size] for i in range(0, len(signals), batch_size)]
    model = WhisperForConditionalGeneration.from_pretrained(hf).eval()
    processor = WhisperProcessor.from_pretrained(hf)
    normalize = scoring_normalizer(language, processor.tokenizer)

    def hf_decode(batch):
        features = processor(batch, sampling_rate=16000, return_tensors="pt").input_features
        with torch.no_grad():
            ids = model.generate(features, num_beams=1)
        return [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]

    texts, seconds = timed(hf_decode, batches, repeats)
    rows = [{"model": "Whisper", "format": "transformers float32", "MB": folder_mb(hf),
             "utt_per_s": len(signals) / seconds, "WER": wer(references, texts, normalize)}]
    for quantization in CT2_TYPES:
        folder = work / f"whisper_ct2_{quantization}"
        ct2_export.export_ct2(hf, folder, quantization)
        loaded = ct2_export.load_ct2(folder, threads=threads)
        texts, seconds = timed(
            lambda batch, loaded=loaded: ct2_export.greedy_transcripts(
                loaded, batch, language, batch_size=batch_size)[1], batches, repeats)
        rows.append({"model": "Whisper", "format": f"CTranslate2 {quantization}",
                     "MB": folder_mb(folder), "utt_per_s": len(signals) / seconds,
                     "WER": wer(references, texts, normalize)})
    return rows


def ctc_rows(run, manifest, work, threads, batch_size, repeats):
    """Size, speed and WER rows of the CTC run's SpeechBrain/transformers export and ONNX."""
    sb, onnx = work / "ctc_transformers", work / "ctc_onnx"
    export(run, sb)
    export(run, onnx, fmt="onnx")
    language = json.loads((sb / "speechtune_export.json").read_text())["language"]
    normalize = get_normalizer(language)
    signals, references = read_split(manifest)
    batches = [onnx_export.padded_batch(signals[i:i + batch_size])
               for i in range(0, len(signals), batch_size)]
    asr = load_asr(sb)
    session = onnx_export.session(onnx / "model.onnx", threads)

    def sb_decode(batch):
        audio, lengths = batch
        with torch.no_grad():
            return asr.transcribe_batch(audio, lengths / lengths.max())[0]

    def onnx_decode(batch):
        return onnx_export.greedy_texts(onnx, *onnx_export.run(session, *batch))

    rows = []
    for name, decode, folder in (("SpeechBrain EncoderASR float32", sb_decode, sb),
                                 ("ONNX (onnxruntime) float32", onnx_decode, onnx)):
        texts, seconds = timed(decode, batches, repeats)
        rows.append({"model": "CTC", "format": name, "MB": folder_mb(folder),
                     "utt_per_s": len(signals) / seconds,
                     "WER": wer(references, texts, normalize)})
    return rows


def table(rows):
    """Markdown, with each format's speed as a ratio to the first row of its model."""
    lines = ["| model | format | folder MB | utt/s | x PyTorch | WER % |",
             "|---|---|---|---|---|---|"]
    first = {}
    for r in rows:
        base = first.setdefault(r["model"], r["utt_per_s"])
        lines.append(f"| {r['model']} | {r['format']} | {r['MB']:.1f} | {r['utt_per_s']:.2f} | "
                     f"{r['utt_per_s'] / base:.2f} | {r['WER']:.2f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--whisper_run", required=True, help="a finished Whisper run's folder")
    parser.add_argument("--split", required=True, help="manifest CSV the Whisper models decode")
    parser.add_argument("--ctc_run", help="a finished CTC run's folder (ONNX beside PyTorch)")
    parser.add_argument("--ctc_split", help="manifest CSV the CTC models decode")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads of every model")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes; fastest kept")
    parser.add_argument("--work", help="where the exports are written (default: a temp folder)")
    parser.add_argument("--out", help="append the results as one JSON line to this file")
    args = parser.parse_args(argv)
    if args.ctc_run and not args.ctc_split:
        parser.error("--ctc_run needs --ctc_split")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="benchmark_export_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = whisper_rows(Path(args.whisper_run), args.split, work, args.threads,
                            args.batch_size, args.repeats)
        if args.ctc_run:
            rows += ctc_rows(Path(args.ctc_run), args.ctc_split, work, args.threads,
                             args.batch_size, args.repeats)
    hardware = f"{platform.processor() or platform.machine()}, {args.threads} threads"
    print(f"command: python {' '.join(sys.argv)}\nhardware: {hardware}; torch "
          f"{torch.__version__}\n\n{table(rows)}")
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps({"argv": sys.argv[1:], "hardware": hardware,
                                "rows": rows}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
