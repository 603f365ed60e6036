"""A run's checkpoints: list, pick the best, average the best k, export to a model folder.

    RUN=recipes/Synthetic/CTC/results/wavlm_tiny_en/1986
    python tools/checkpoints.py list $RUN
    python tools/checkpoints.py best $RUN
    python tools/checkpoints.py average $RUN -k 3          # score the average on valid and test
    python tools/checkpoints.py export $RUN exported/ [--average 3 | --checkpoint CKPT+...]
    python tools/checkpoints.py export $RUN exported_ct2/ --format ct2 [--quantization int8]
    python tools/checkpoints.py export $RUN exported_onnx/ --format onnx
    python tools/checkpoints.py check $RUN [--max_insertions_rise 5 --max_loop_rise 2]

``RUN`` is a run's output folder (its checkpoints are in ``RUN/save``) or the save folder itself.
``list`` prints one row per checkpoint (name, valid WER and CER, epoch, optimizer step, whether it
was written at an epoch end, when), oldest first, the best-WER one marked; ``--json`` prints the
same as JSON lines. ``best`` prints the path of the lowest-WER checkpoint, the one ``train.py``
tests and the one to ship. The checkpoints are read with SpeechBrain's ``Checkpointer``, the
class that wrote them.

``average`` reruns the run's own training command (recorded in ``RUN/run.json``) with
``--average_best=K``: on a finished run that only evaluates, averaging the K best checkpoints
with SpeechBrain's ``average_checkpoints`` and scoring the average on valid and test like any
checkpoint (``wer_<split>.txt`` and ``train_log.txt`` then hold the average's results).
``check`` reruns it with ``--robustness_gate=True``: the non-speech clips, loops and long
recording of ``speechtune.gate`` for the tested checkpoint against the model as loaded, in
``RUN/gate.md`` (``--max_insertions_rise`` / ``--max_loop_rise`` / ``--max_deletion_rise`` make
a regression fail).
``export`` writes a self-contained folder that loads offline with SpeechBrain's ``EncoderASR`` /
``WhisperASR`` and with transformers' ``from_pretrained`` (``speechtune.export``), with a README
card; ``tools/transcribe.py`` decodes audio with it. ``--format ct2`` (Whisper runs) writes a
CTranslate2 / faster-whisper folder instead, ``--format onnx`` (CTC runs) an onnxruntime model
(both need ``pip install -e ".[export]"``; docs/export.md).
"""

import argparse
import json
import subprocess
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


def rerun_finished(run, options, what):
    """Rerun a finished run's training command (recorded in ``RUN/run.json``) with ``options``
    (``--key=value``, replacing the same keys in it): on a finished run that only evaluates.
    Prints the run's ``[speechtune]`` lines; ``what`` names the purpose in messages."""
    from speechtune.export import read_run

    out, save, info = read_run(run)
    kept = rows(save)  # oldest first
    # rerunning the command of an unfinished run would first train the rest of it
    latest = kept[-1]
    command = f"cd {info['cwd']} && python {Path(info['script']).name} {' '.join(info['argv'])}"
    if "epochs" not in info:
        raise SystemExit(f"{out}/run.json predates the record of the epochs to train: run "
                         f"{command} once (a finished run then only tests), then {what}.")
    limit = info.get("optimizer_step_limit")  # absent from run.json files of older runs
    if not ((latest["end-of-epoch"] and latest["epoch"] >= info["epochs"])
            or (limit and (latest["step"] or 0) >= limit)):
        raise SystemExit(
            f"{out} is not a finished run (latest checkpoint: epoch {latest['epoch']}, "
            f"{'end of epoch' if latest['end-of-epoch'] else 'mid-epoch'}, step {latest['step']}; "
            f"epochs to train: {info['epochs']}, step limit: {limit}): rerunning its command "
            f"would train first. Finish it with {command}, then {what}.")
    keys = {option.split("=", 1)[0] for option in options}
    argv = [a for a in info["argv"] if a.split("=", 1)[0] not in keys]
    command = [sys.executable, info["script"], *argv, *options]
    print("running:", " ".join(command[1:]), f"(in {info['cwd']})", flush=True)
    done = subprocess.run(command, cwd=info["cwd"], capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.startswith("[speechtune]"):
            print(line)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-5000:])
        raise SystemExit(f"{what} failed (exit {done.returncode}); output above")
    return 0


def evaluate_average(run, k):
    """Score the average of the ``k`` best checkpoints: the run's command with
    ``--average_best=k``."""
    scored = [r for r in rows(run) if r["WER"] is not None]
    if k < 2 or k > len(scored):
        raise SystemExit(f"-k {k}: {run} keeps {len(scored)} checkpoint(s) with a valid WER; "
                         "average 2 to that many (more need num_to_keep >= k in the yaml)")
    return rerun_finished(run, [f"--average_best={k}"], "average")


def check(run, limits):
    """The robustness gate (``speechtune.gate``) on a finished run: its command with
    ``--robustness_gate=True`` and the given limits."""
    from speechtune.export import read_run

    out = read_run(run)[0]
    try:
        return rerun_finished(run, ["--robustness_gate=True", *limits], "check")
    finally:  # the table, also when the gate failed
        if (Path(out) / "gate.md").is_file():
            print((Path(out) / "gate.md").read_text(encoding="utf-8"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    listing = sub.add_parser("list", help="every checkpoint of a run with its metadata")
    listing.add_argument("run", help="the run's output folder (or its save folder)")
    listing.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    best = sub.add_parser("best", help="the path of the lowest-WER checkpoint")
    best.add_argument("run", help="the run's output folder (or its save folder)")
    average = sub.add_parser("average", help="score the average of the k best on valid/test")
    average.add_argument("run", help="the run's output folder")
    average.add_argument("-k", type=int, required=True, help="how many best checkpoints")
    export = sub.add_parser("export", help="export a checkpoint (or an average) to a folder")
    export.add_argument("run", help="the run's output folder")
    export.add_argument("out", help="the folder to write (must not exist, unless --force)")
    which = export.add_mutually_exclusive_group()
    which.add_argument("--checkpoint", help="a CKPT+... name (default: the best by valid WER)")
    which.add_argument("--average", type=int, default=1,
                       help="export the average of the k best checkpoints")
    export.add_argument("--force", action="store_true", help="replace OUT if it exists")
    export.add_argument("--format", default="speechbrain",
                        help="speechbrain (default: SpeechBrain + transformers files), ct2 "
                        "(CTranslate2 / faster-whisper; Whisper runs) or onnx (CTC runs)")
    export.add_argument("--quantization", help="--format ct2: CTranslate2's weight type, "
                        "e.g. float16 (default), int8, float32")
    gate = sub.add_parser("check", help="the robustness gate: non-speech clips, loops and a "
                          "long recording, against the base model")
    gate.add_argument("run", help="the run's output folder")
    gate.add_argument("--max_insertions_rise", type=float, help="fail above this many more "
                      "words per minute of non-speech than the base model")
    gate.add_argument("--max_loop_rise", type=float, help="fail above this many more points "
                      "of test hypotheses in a loop than the base model")
    gate.add_argument("--max_deletion_rise", type=float, help="fail above this many more "
                      "points of the long recording's words deleted than the base model")
    args = parser.parse_args(argv)

    if args.command == "check":
        limits = [f"--gate_max_{key}={value}" for key, value in (
            ("insertions_rise", args.max_insertions_rise), ("loop_rise", args.max_loop_rise),
            ("deletion_rise", args.max_deletion_rise))
            if value is not None]
        return check(args.run, limits)
    if args.command == "average":
        return evaluate_average(args.run, args.k)
    if args.command == "export":
        from speechtune.export import export as export_run

        summary = export_run(args.run, args.out, args.checkpoint, args.average, args.force,
                             args.format, args.quantization)
        names = ", ".join(c["name"] for c in summary["checkpoints"])
        what = summary["model_class"] or ("for SpeechBrain's EncoderASR only (transformers has "
                                          "no CTC class for this encoder)")
        if args.format != "speechbrain":
            what = f"{what} as {args.format}" + (
                f" ({summary['quantization']})" if "quantization" in summary else "")
        print(f"exported {what} from {names} to {args.out} (card: {args.out}/README.md)")
        return 0

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
