"""Transcribe audio files with an exported model (``tools/checkpoints.py export``).

    python tools/transcribe.py EXPORT_FOLDER a.wav b.flac            # one "file<TAB>text" per line
    python tools/transcribe.py EXPORT_FOLDER audio/ --out hyps.jsonl  # a folder, as JSON lines
    python tools/transcribe.py EXPORT_FOLDER list.txt --device cuda --batch_size 32

    python tools/transcribe.py EXPORT_FOLDER talk.flac --out talk.jsonl --timestamps

Inputs are audio files, folders (searched recursively for .wav .flac .mp3 .ogg .opus .m4a) or
text files listing one audio path per line. Audio is read with soundfile, mixed to mono and
resampled to the model's rate, and decoded through the folder's SpeechBrain interface
(``EncoderASR`` greedy CTC, or ``WhisperASR`` with the run's search). Files no longer than the
model's window (Whisper: the export's own, e.g. 30 s or a recipe's 8 s; CTC: 30 s, or the
Whisper encoder's window) are decoded in batches of ``--batch_size`` in order of duration (little
padding), as the recipes batch their valid and test sets. A longer file of any length is read
whole and decoded in pieces, ``--batch_size`` at a time (``speechtune.longform``;
docs/longform.md): Whisper in chunks of at most the window cut at the quietest point near its
end, CTC in overlapping windows whose middle frames are merged before the greedy collapse.
``--timestamps`` adds each file's segments (``{"start", "end", "text"}``, seconds; one per chunk
or window, one for a short file) to the JSON lines. The output keeps the input order. A file
that cannot be read is reported by name and skipped; the exit status is then 1.
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from speechtune import longform
from speechtune.export import load_asr

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("export", help="a folder written by tools/checkpoints.py export")
    parser.add_argument("inputs", nargs="+", help="audio files, folders or lists of paths")
    parser.add_argument("--out", help="write here instead of stdout (.jsonl: JSON lines)")
    parser.add_argument("--format", choices=["text", "jsonl"],
                        help="text: path<TAB>text; jsonl: {\"audio\", \"text\"} (default: from "
                             "--out's suffix, else text)")
    parser.add_argument("--batch_size", type=int, default=16,
                        help="files, or pieces of a long file, decoded together")
    parser.add_argument("--timestamps", action="store_true",
                        help="add each file's segments {start, end, text} (seconds) to the "
                             "JSON lines")
    parser.add_argument("--window_seconds", type=float,
                        help="longest audio decoded in one pass (default: the model's window; "
                             "30 s for SSL CTC encoders); longer files go in pieces")
    parser.add_argument("--overlap_seconds", type=float,
                        help="CTC: audio shared by neighbouring windows (default: a quarter of "
                             "the window, at most 2 s)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)

    fmt = args.format or ("jsonl" if args.out and args.out.endswith(".jsonl") or args.timestamps
                          else "text")
    if args.timestamps and fmt != "jsonl":
        parser.error("--timestamps writes JSON lines: drop --format text, or use --format jsonl")
    if args.batch_size < 1:
        parser.error(f"--batch_size {args.batch_size}: it must be at least 1")
    paths = collect(args.inputs)
    asr = load_asr(args.export, device=args.device)
    try:
        window = longform.window_samples(asr, args.window_seconds)
        overlap = longform.overlap_samples(asr, window, args.overlap_seconds)
    except ValueError as err:
        parser.error(f"--window_seconds / --overlap_seconds: {err}")
    texts, segments, failed = longform.transcribe_files(
        asr, paths, args.batch_size, window, overlap, progress=not args.quiet)

    def record(path):
        found = {"audio": str(path), "text": texts[path]}
        return {**found, "segments": segments[path]} if args.timestamps else found

    lines = [json.dumps(record(p), ensure_ascii=False) if fmt == "jsonl"
             else f"{p}\t{texts[p]}" for p in paths if p in texts]
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
