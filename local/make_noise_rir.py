#!/usr/bin/env python3
"""Make the bundled noise and room-impulse-response set, and a noisy copy of a test split.

A small stand-in for MUSAN (noises) and RIRS_NOISES (room impulse responses), made offline from
numpy and the bundled speech corpus, for SpeechBrain's ``AddNoise`` / ``AddReverb``
(``add_noise`` / ``add_reverb`` in hparams/augment.yaml):

- noises, 16 kHz mono 16-bit WAV, 3 s each: ``white``, ``pink`` (1/f power), ``brown``
  (1/f^2 power), ``hum`` (mains hum: a 50/60 Hz fundamental with decaying harmonics over a
  faint noise floor) and ``babble`` (five to seven utterances of the bundled Danish corpus
  summed, each at a random offset and level);
- room impulse responses, 16 kHz mono WAV: a unit direct-path peak, a 2-10 ms gap, then
  exponentially decaying Gaussian noise with an RT60 drawn from a range (the level falls 60 dB
  in RT60 seconds) and a direct-to-reverberant energy ratio drawn from a range;
- each in two disjoint sets: ``train`` (for training) and ``heldout`` (other clips and rooms:
  babble from other Danish utterances, hum at another mains frequency, other RT60 draws), for
  making noisy test sets.

Written as::

    <out>/wav/<ID>.wav
    <out>/noise_train.csv  <out>/noise_heldout.csv   ID,duration,wav,wav_format,wav_opts
    <out>/rir_train.csv    <out>/rir_heldout.csv     (SpeechBrain's noise / RIR CSV format)

The noise CSVs name their files as ``$noise_folder/wav/<ID>.wav`` and the RIR CSVs as
``$rir_folder/wav/<ID>.wav``; the recipes replace both with the CSV's own folder.

``--noisy_test`` also writes a noisy copy of a test manifest (a corpus manifest
``ID,duration,wav,spk_id,wrd,...``): each utterance reverberated with a held-out RIR
(``AddReverb``), then mixed with a held-out noise at ``--snr`` dB (``AddNoise``), the held-out
noises and RIRs taken in turn; 8-bit FLAC as the bundled corpus, IDs prefixed ``noisy_``, with
a ``noise`` column naming the noise kind (the recipes report WER per kind).

Everything is drawn from ``--seed`` (numpy's PCG64 and torch's generator), so a re-run writes the
same files. Usage::

    python local/make_noise_rir.py --out recipes/Synthetic/data/noise
    python local/make_noise_rir.py --out recipes/Synthetic/data/noise \\
        --noisy_test recipes/Synthetic/data/en/test.csv \\
        --noisy_out recipes/Synthetic/data/en_noisy --snr 5

For real noises, point ``noise_manifest`` / ``rir_manifest`` at CSVs of MUSAN and RIRS_NOISES
(docs/robustness.md says how).
"""

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
from speechbrain.augment.time_domain import AddNoise, AddReverb

from speechtune import data

SAMPLE_RATE = 16000
HEADER = ["ID", "duration", "wav", "wav_format", "wav_opts"]
KINDS = ("white", "pink", "brown", "hum", "babble")
# per set: mains frequencies for hum, the Danish manifests the babble is drawn from, the RT60
# range (s) and the direct-to-reverberant ratio range (dB) of the RIRs
SETS = {"train": ((50.0,), ("da/train.csv",), (0.2, 0.8), (-2.0, 8.0)),
        "heldout": ((60.0,), ("da/valid.csv", "da/test.csv"), (0.3, 0.7), (0.0, 6.0))}


def coloured(rng, n, exponent):
    """Gaussian noise whose power falls as 1/f**exponent (0 white, 1 pink, 2 brown)."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    spectrum[1:] /= (freqs[1:] / freqs[1]) ** (exponent / 2)
    spectrum[0] = 0.0
    return np.fft.irfft(spectrum, n)


def hum(rng, n, mains):
    """A mains hum: the fundamental and six harmonics, each with a random phase and a level
    falling with its order, over a noise floor 40 dB down."""
    t = np.arange(n) / SAMPLE_RATE
    wave = sum(rng.uniform(0.3, 1.0) / k * np.sin(2 * np.pi * mains * k * t
                                                   + rng.uniform(0, 2 * np.pi))
               for k in range(1, 8))
    return wave + 0.01 * np.std(wave) * rng.standard_normal(n)


def babble(rng, n, speech):
    """Five to seven utterances summed, each looped to the clip, at a random offset and level."""
    out = np.zeros(n)
    for i in rng.choice(len(speech), size=rng.integers(5, 8), replace=False):
        wav = np.tile(speech[i], n // len(speech[i]) + 2)
        start = rng.integers(0, len(speech[i]))
        out += rng.uniform(0.5, 1.0) * wav[start:start + n] / (np.std(speech[i]) + 1e-9)
    return out


def rir(rng, rt60, gap_ms, drr_db):
    """A synthetic room impulse response: a unit direct-path peak, then after ``gap_ms`` an
    exponentially decaying Gaussian tail (60 dB down at ``rt60`` s) holding ``drr_db`` dB less
    energy than the direct path (the direct-to-reverberant ratio), each tap below the peak."""
    n = int(min(1.2 * rt60, 1.0) * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    tail = rng.standard_normal(n) * np.exp(-np.log(1000.0) * t / rt60)
    tail[:int(gap_ms * SAMPLE_RATE / 1000)] = 0.0
    tail *= np.sqrt(10 ** (-drr_db / 10) / np.sum(tail ** 2))
    tail = np.clip(tail, -0.9, 0.9)
    tail[0] = 1.0
    return tail


def read_speech(corpus, manifests):
    """The audio of the corpus utterances in ``manifests`` (``$data_root`` is ``corpus``)."""
    return [sf.read(row["wav"], dtype="float64")[0] for name in manifests
            for row in data.read_manifest(corpus / name, corpus).values()]


def write_rows(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(HEADER)
        writer.writerows(rows)


def make_set(out, corpus, seed, clip_seconds, clips_per_kind, rirs_per_set):
    """Write the noise and RIR WAVs and their four CSVs under ``out``; returns the CSV paths."""
    (out / "wav").mkdir(parents=True, exist_ok=True)
    n = int(clip_seconds * SAMPLE_RATE)
    written = {}
    for index, (name, (mains, babble_from, rt60_range, drr_range)) in enumerate(SETS.items()):
        rng = np.random.default_rng([seed, index])
        speech = read_speech(corpus, babble_from)
        noise_rows, rir_rows = [], []
        for kind in KINDS:
            for k in range(clips_per_kind):
                if kind == "hum":
                    wave = hum(rng, n, mains[k % len(mains)])
                elif kind == "babble":
                    wave = babble(rng, n, speech)
                else:
                    wave = coloured(rng, n, {"white": 0, "pink": 1, "brown": 2}[kind])
                clip_id = f"{name}_{kind}_{k}"
                # RMS at -26 dBFS, as speech; AddNoise rescales to the SNR drawn anyway
                sf.write(out / "wav" / f"{clip_id}.wav", 0.05 * wave / np.std(wave),
                         SAMPLE_RATE, subtype="PCM_16")
                noise_rows.append([clip_id, f"{n / SAMPLE_RATE:.3f}",
                                   f"$noise_folder/wav/{clip_id}.wav", "wav", ""])
        for k in range(rirs_per_set):
            response = rir(rng, rng.uniform(*rt60_range), rng.uniform(2.0, 10.0),
                           rng.uniform(*drr_range))
            rir_id = f"{name}_rir_{k}"
            sf.write(out / "wav" / f"{rir_id}.wav", response, SAMPLE_RATE, subtype="PCM_16")
            rir_rows.append([rir_id, f"{len(response) / SAMPLE_RATE:.3f}",
                             f"$rir_folder/wav/{rir_id}.wav", "wav", ""])
        for prefix, rows in (("noise", noise_rows), ("rir", rir_rows)):
            written[f"{prefix}_{name}"] = out / f"{prefix}_{name}.csv"
            write_rows(written[f"{prefix}_{name}"], rows)
    return written


def make_noisy_test(test_csv, out, noise_csv, rir_csv, snr, seed, reverb=True):
    """A noisy copy of ``test_csv`` under ``out`` (``wav/noisy_<ID>.flac`` and ``test.csv``):
    each utterance reverberated with the next RIR of ``rir_csv`` (if ``reverb``), then mixed
    with the next noise of ``noise_csv`` at ``snr`` dB, by SpeechBrain's AddReverb/AddNoise."""
    test_csv, out = Path(test_csv), Path(out)
    data_root = test_csv.parent.parent  # manifests name files as $data_root/<split>/wav/...
    if out.resolve().parent != data_root.resolve():
        raise ValueError(f"--noisy_out {out} must sit beside the test split's folder, in "
                         f"{data_root} (its manifest names files as $data_root/{out.name}/...)")
    (out / "wav").mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    add_noise = AddNoise(str(noise_csv), sorting="original", snr_low=snr, snr_high=snr,
                         pad_noise=True, normalize=True,
                         replacements={"noise_folder": str(Path(noise_csv).parent)})
    add_reverb = AddReverb(str(rir_csv), sorting="original",
                           replacements={"rir_folder": str(Path(rir_csv).parent)})
    with open(noise_csv, newline="", encoding="utf-8") as f:
        kinds = [row["ID"].split("_")[1] for row in csv.DictReader(f)]
    with open(test_csv, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), [*reader.fieldnames, "noise"]
    for i, row in enumerate(rows):
        clean = torch.tensor(sf.read(row["wav"].replace("$data_root", str(data_root)),
                                     dtype="float32")[0]).unsqueeze(0)
        wave = add_reverb(clean) if reverb else clean
        noisy = add_noise(wave, torch.ones(1))[0].clamp(-1.0, 1.0).numpy()
        row["ID"] = f"noisy_{row['ID']}"
        row["wav"] = f"$data_root/{out.name}/wav/{row['ID']}.flac"
        row["noise"] = kinds[i % len(kinds)]
        sf.write(out / "wav" / f"{row['ID']}.flac", noisy, SAMPLE_RATE, subtype="PCM_S8")
    with open(out / "test.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out / "test.csv"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("recipes/Synthetic/data/noise"),
                        help="folder of the noise/RIR WAVs and CSVs")
    parser.add_argument("--corpus", type=Path, default=Path("recipes/Synthetic/data"),
                        help="the bundled corpus (babble is made of its Danish utterances)")
    parser.add_argument("--seed", type=int, default=1986)
    parser.add_argument("--clip_seconds", type=float, default=3.0)
    parser.add_argument("--clips_per_kind", type=int, default=2)
    parser.add_argument("--rirs_per_set", type=int, default=8)
    parser.add_argument("--noisy_test", type=Path, default=None,
                        help="a test manifest to copy with held-out noise and reverb")
    parser.add_argument("--noisy_out", type=Path, default=None,
                        help="the noisy copy's folder, beside the test split's (its name is "
                             "the split's name in the manifest's $data_root paths)")
    parser.add_argument("--snr", type=float, default=5.0, help="dB, for --noisy_test")
    parser.add_argument("--no_reverb", action="store_true",
                        help="--noisy_test with noise only")
    args = parser.parse_args(argv)
    if not (args.corpus / "da" / "train.csv").is_file():
        sys.exit(f"--corpus {args.corpus}: no da/train.csv (the babble's speech); give the "
                 "bundled corpus folder, recipes/Synthetic/data")
    written = make_set(args.out, args.corpus, args.seed, args.clip_seconds,
                       args.clips_per_kind, args.rirs_per_set)
    print("wrote " + ", ".join(str(p) for p in written.values()))
    if args.noisy_test is not None:
        if args.noisy_out is None:
            sys.exit("--noisy_test needs --noisy_out, the noisy copy's folder")
        path = make_noisy_test(args.noisy_test, args.noisy_out, written["noise_heldout"],
                               written["rir_heldout"], args.snr, args.seed,
                               reverb=not args.no_reverb)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
