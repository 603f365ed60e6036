"""A run's checkpoints: list them with their metadata, or name the best by validation WER.

    python tools/checkpoints.py list recipes/Synthetic/CTC/results/wavlm_tiny_en/1986
    python tools/checkpoints.py best recipes/Synthetic/CTC/results/wavlm_tiny_en/1986

``RUN`` is a run's output folder (its checkpoints are in ``RUN/save``) or the save folder itself.
``list`` prints one row per checkpoint (name, valid WER and CER, epoch, optimizer step, whether it
was written at an epoch end, when), oldest first, the best-WER one marked; ``--json`` prints the
same as JSON lines. ``best`` prints the path of the lowest-WER checkpoint, the one ``train.py``
tests and the one to ship. The checkpoints are read with SpeechBrain's ``Checkpointer``, the
class that wrote them.
"""

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

from speechbrain.utils.checkpoints import Checkpointer

FIELDS = ("WER", "CER", "epoch", "step", "end-of-epoch")


def save_folder(run):
    """``RUN/save`` if it exists, else ``RUN`` itself; an error naming the fix if neither holds
    checkpoints."""
    run = Path(run)
    folder = run / "save" if (run / "save").is_dir() else run
    if not folder.is_dir() or not any(folder.glob("CKPT+*")):
        raise SystemExit(f"no checkpoints (CKPT+* folders) in {folder}: give a run's output "
                         "folder (the one holding save/) or its save folder")
    return folder


def checkpoints(run):
    """``(checkpoints oldest first, the best-WER one)``: best as SpeechBrain's Checkpointer picks
    it for ``min_key="WER"``, so the one ``train.py`` tests (checkpoints without a WER, e.g. for
    resuming, are listed but never best)."""
    checkpointer = Checkpointer(save_folder(run))
    found = sorted(checkpointer.list_checkpoints(), key=lambda c: c.meta["unixtime"])
    best = checkpointer.find_checkpoint(min_key="WER")
    return found, next((c for c in found if best is not None and c.path == best.path), None)


def rows(run):
    """One dict per checkpoint: its path, metadata and whether it is the best."""
    found, best = checkpoints(run)
    return [{"name": c.path.name, "path": str(c.path), "best": c is best,
             **{k: c.meta.get(k) for k in FIELDS},
             "time": datetime.fromtimestamp(c.meta["unixtime"], UTC)
             .strftime("%Y-%m-%d %H:%M:%S UTC")} for c in found]


def table(items):
    """The rows as a Markdown table."""
    def cell(value, key):
        if key in ("WER", "CER") and value is not None:
            return f"{value:.2f}"
        return "-" if value is None else str(value)

    head = ["", "name", *FIELDS, "time"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in items:
        cells = ["best" if row["best"] else "", row["name"],
                 *(cell(row[k], k) for k in FIELDS), row["time"]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="every checkpoint of a run with its metadata")
    listing.add_argument("run", help="the run's output folder (or its save folder)")
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    best = sub.add_parser("best", help="the path of the lowest-WER checkpoint")
    best.add_argument("run", help="the run's output folder (or its save folder)")
    args = parser.parse_args(argv)

    if args.command == "list":
        items = rows(args.run)
        print("\n".join(json.dumps(r) for r in items) if args.json else table(items))
        return 0
    _, chosen = checkpoints(args.run)
    if chosen is None:
        raise SystemExit(f"no checkpoint of {args.run} has a validation WER yet (only resume "
                         "checkpoints): let the run validate at least once")
    print(chosen.path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
