"""What the corpus preparations write, written so that a crash or a second process never leaves a
file that looks done: 16-bit FLAC, TSV reports and settings stamps go to ``<name>.<pid>.tmp``
first and are renamed; a FLAC counts as done only if it reads to its last sample."""

import csv
import json
import multiprocessing
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import soundfile as sf
import torch


@contextmanager
def worker_pool(num_workers):
    """A pool of ``num_workers`` single-threaded processes (forked where the platform can), or
    None for one worker: the caller then runs the jobs itself."""
    if num_workers <= 1:
        yield None
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(num_workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield pool


def write_flac(path, signal, sample_rate):
    """``signal`` (float samples) as 16-bit FLAC at ``path``, whole or not at all."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # unique per process
    sf.write(tmp, np.clip(signal, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    os.replace(tmp, path)


def complete_flac(path, sample_rate):
    """Seconds of a FLAC at ``sample_rate`` that reads to its last sample, else None (absent,
    unreadable, or cut short: its header still counts every sample, the seek to the end fails)."""
    try:
        with sf.SoundFile(path) as f:
            if f.samplerate != sample_rate or f.frames < 1:
                return None
            f.seek(f.frames - 1)  # fails if cut short
            return f.frames / sample_rate if len(f.read(1)) == 1 else None
    except Exception:  # soundfile raises several types for broken files
        return None


def remove_stale_temps(folder):
    """Delete the ``<name>.<pid>.tmp`` files of dead writers (process gone, or this one), not a
    live one's (PIDs are per machine: prepare into a folder from one machine at a time)."""
    for tmp in Path(folder).glob("*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                os.kill(int(pid), 0)  # raises unless the process is alive
                continue
            except PermissionError:  # alive, another user's
                continue
            except (OSError, OverflowError):
                pass
        tmp.unlink(missing_ok=True)


def write_tsv(path, header, rows):
    """``rows`` (sequences) under ``header`` as a TSV (``csv``'s quoting), whole or not at all;
    tabs and line breaks inside a value become spaces."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t")
        writer.writerow(header)
        writer.writerows([" ".join(str(v).split()) for v in row] for row in rows)
    os.replace(tmp, path)


def read_stamp(path):
    """What a ``.source.json`` stamp records; None if absent or unreadable (prepare again)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_stamp(path, source):
    """Write the stamp whole or not at all (a temporary file, then renamed)."""
    tmp = Path(path).with_name(f"{Path(path).name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(source), encoding="utf-8")
    os.replace(tmp, path)
