#!/usr/bin/env python3
"""Measure what 8-bit FLAC costs the bundled corpus: size vs 16-bit and quantisation SNR.

Re-synthesises the first N English train sentences with their voices (espeak-ng's default
speed and pitch), encodes each with the generator's own ``encode`` as 8-bit (what is committed)
and as 16-bit FLAC, and prints the size ratio and the signal-to-quantisation-noise ratio (the
16-bit signal against the difference between the 8-bit and the 16-bit one).

    python local/check_corpus_encoding.py --n 40
"""

import argparse
import csv
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf
from make_synthetic_corpus import encode, speak  # the generator's own steps (same folder)

ESPEAK_DEFAULT_SPEED, ESPEAK_DEFAULT_PITCH = 175, 50


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--data", type=Path, default=Path("recipes/Synthetic/data"))
    args = parser.parse_args()
    with open(args.data / "en" / "train.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[: args.n]
    sizes, signal, noise = {8: 0, 16: 0}, 0.0, 0.0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for row in rows:
            speak(row["wrd"], row["voice"], ESPEAK_DEFAULT_SPEED, ESPEAK_DEFAULT_PITCH,
                  tmp / "raw.wav")
            audio = {}
            for bits in (8, 16):
                encode(tmp / "raw.wav", tmp / f"{bits}.flac", bits)
                sizes[bits] += (tmp / f"{bits}.flac").stat().st_size
                audio[bits] = sf.read(tmp / f"{bits}.flac", dtype="float64")[0]
            n = min(len(audio[8]), len(audio[16]))
            signal += np.sum(audio[16][:n] ** 2)
            noise += np.sum((audio[8][:n] - audio[16][:n]) ** 2)
    print(f"{len(rows)} utterances: 16-bit / 8-bit FLAC size = {sizes[16] / sizes[8]:.2f}x, "
          f"8-bit quantisation SNR = {10 * np.log10(signal / noise):.1f} dB")


if __name__ == "__main__":
    main()
