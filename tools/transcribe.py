"""Transcribe audio files with an exported model (``tools/checkpoints.py export``).

    python tools/transcribe.py EXPORT_FOLDER a.wav b.flac            # one "file<TAB>text" per line
    python tools/transcribe.py EXPORT_FOLDER audio/ --out hyps.jsonl  # a folder, as JSON lines
    python tools/transcribe.py EXPORT_FOLDER list.txt --device cuda --batch_size 32

Inputs are audio files, folders (searched recursively for .wav .flac .mp3 .ogg .opus .m4a) or
text files listing one audio path per line. Audio is read with soundfile, mixed to mono and
resampled to the model's rate. Files are decoded in batches of ``--batch_size`` in order of
duration (little padding), as the recipes batch their valid and test sets, through the folder's
SpeechBrain interface (``EncoderASR`` greedy CTC, or ``WhisperASR`` with the run's beam search).
The output keeps the input order. A file that cannot be read is reported by name and skipped;
the exit status is then 1.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

AUDIO_SUFFIXES = {".wav", ".flac", ".mp3", ".ogg", ".opus", ".m4a"}


def collect(inputs):
    """Audio paths from files, folders and list files, in the order given (folders sorted)."""
    found = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += sorted(p for p in item.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES)
        elif item.suffix.lower() in (".txt", ".lst", ".list"):
            lines = item.read_text(encoding="utf-8").splitlines()
            found += [Path(line.strip()) for line in lines if line.strip()]
        elif item.exists():
            found.append(item)
        else:
            raise SystemExit(f"{item}: no such file or folder")
    if not found:
        raise SystemExit(f"no audio files in {', '.join(map(str, inputs))} (looked for "
                         f"{' '.join(sorted(AUDIO_SUFFIXES))})")
    return found


def transcribe(asr, paths, sample_rate, batch_size, progress=True):
    """``({path: text}, {path: error})``: batches of similar duration through ``asr``. Durations
    come from the file headers; audio is read one batch at a time (a folder of hours of audio
    never sits in memory at once)."""
    import soundfile as sf

    from speechtune.data import load_audio

    seconds, failed = {}, {}
    for path in paths:
        try:
            info = sf.info(str(path))
            seconds[path] = info.frames / info.samplerate
        except Exception as err:  # noqa: BLE001 - reported by name, the rest still decoded
            failed[path] = f"{type(err).__name__}: {err}"
    order = sorted(seconds, key=seconds.get)
    texts = {}
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="transcribing", disable=not progress):
        sigs = {}
        for path in batch:
            try:
                sigs[path] = load_audio(str(path), sample_rate)
            except Exception as err:  # noqa: BLE001 - as above
                failed[path] = f"{type(err).__name__}: {err}"
        if not sigs:
            continue
        longest = max(s.shape[0] for s in sigs.values())
        wavs = torch.zeros(len(sigs), longest)
        for row, sig in enumerate(sigs.values()):
            wavs[row, :sig.shape[0]] = sig
        lens = torch.tensor([s.shape[0] / longest for s in sigs.values()])
        words, _ = asr.transcribe_batch(wavs, lens)
        for path, text in zip(sigs, words, strict=True):
            texts[path] = text if isinstance(text, str) else " ".join(text)
    return texts, failed


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", help="a folder written by tools/checkpoints.py export")
    parser.add_argument("inputs", nargs="+", help="audio files, folders or lists of paths")
    parser.add_argument("--out", help="write here instead of stdout (.jsonl: JSON lines)")
    parser.add_argument("--format", choices=["text", "jsonl"],
                        help="text: path<TAB>text; jsonl: {\"audio\", \"text\"} (default: from "
                             "--out's suffix, else text)")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    from speechtune.export import load_asr

    paths = collect(args.inputs)
    asr = load_asr(args.export, device=args.device)
    texts, failed = transcribe(asr, paths, asr.hparams.sample_rate, args.batch_size,
                               progress=not args.quiet)
    fmt = args.format or ("jsonl" if args.out and args.out.endswith(".jsonl") else "text")
    lines = [json.dumps({"audio": str(p), "text": texts[p]}, ensure_ascii=False)
             if fmt == "jsonl" else f"{p}\t{texts[p]}" for p in paths if p in texts]
    output = "\n".join(lines) + "\n"
    if args.out:
        Path(args.out).write_text(output, encoding="utf-8")
    else:
        sys.stdout.write(output)
    for path, err in failed.items():
        print(f"skipped {path}: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
