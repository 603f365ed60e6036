#!/usr/bin/env python3
"""Run one recipe yaml in several configurations, one after the other, and tabulate what each
costs and gives: test WER of every test split, trainable parameters, checkpoint size on disk,
peak RSS and seconds per optimizer step.

Run from a recipe folder, e.g. full decoder fine-tune against LoRA in recipes/Synthetic/Whisper:

    python ../../../tools/measure_finetune.py hparams/whisper_base.yaml --out lora_en \\
        --config "full=" --config "lora8=--lora=decoder --lr=0.001" \\
        --config "lora32=--lora=decoder --lora_rank=32 --lora_alpha=64 --lr=0.001"

Each ``--config NAME=OPTIONS`` is a training run (``train.py``'s own flow: zero-shot test if the
yaml asks, fit, test) into ``<out>/<NAME>``, in a process of its own, whose peak RSS is read
from the kernel (``os.wait4``). Seconds per optimizer step time ``Brain.fit_batch`` alone (the
forward, backward and update; not validation or data waiting), summed over the run and divided
by its optimizer steps. A run whose output folder already holds a finished ``measure.json`` is
read back, not rerun. The table goes to ``<out>/results.md`` with the machine and the commands.
"""

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path


def child(argv, result_path):
    """One run of the recipe's own ``train.py`` (run as ``__main__``) with
    ``FineTuneBrain.fit_batch`` timed; writes ``result_path``."""
    import runpy

    import torch
    from speechbrain.utils.checkpoints import Checkpointer

    from speechtune import recipe
    from speechtune.brain import FineTuneBrain

    timed = {"seconds": 0.0, "batches": 0}
    fit_batch, run = FineTuneBrain.fit_batch, recipe.run
    ran = {}

    def timed_fit_batch(self, batch):
        start = time.perf_counter()
        try:
            return fit_batch(self, batch)
        finally:
            timed["seconds"] += time.perf_counter() - start
            timed["batches"] += 1

    evaluate = recipe.Experiment.evaluate

    def counted_evaluate(self):  # testing loads the best checkpoint, and its step counter
        ran["steps"] = self.brain.optimizer_step
        return evaluate(self)

    def kept_run(*args, **kwargs):
        ran["experiment"], ran["results"] = run(*args, **kwargs)
        return ran["experiment"], ran["results"]

    FineTuneBrain.fit_batch, recipe.run = timed_fit_batch, kept_run
    recipe.Experiment.evaluate = counted_evaluate
    sys.argv = ["train.py", *argv]
    runpy.run_path("train.py", run_name="__main__")
    brain, hparams = ran["experiment"].brain, ran["experiment"].brain.hparams
    zero_shot = Path(hparams.output_folder) / "zero_shot.json"
    ckpt = Checkpointer(hparams.save_folder).find_checkpoint(min_key="WER")
    trainable = sum(p.numel() for m in brain._own_modules.values() for p in m.parameters()
                    if p.requires_grad)
    out = {"argv": argv, "test": {k: {m: float(v) for m, v in s.items()}
                                  for k, s in ran["results"].items()},
           "zero_shot": json.loads(zero_shot.read_text()) if zero_shot.is_file() else {},
           "optimizer_steps": ran["steps"],
           "fit_batch_seconds": timed["seconds"], "batches": timed["batches"],
           "trainable_parameters": trainable,
           "checkpoint_bytes": sum(f.stat().st_size for f in ckpt.path.iterdir()),
           "torch_threads": torch.get_num_threads()}
    Path(result_path).write_text(json.dumps(out, indent=1))


def run_config(yaml, name, options, out):
    """Run one configuration in a child process (unless measured before); returns its record."""
    folder = out / name
    result = folder / "measure.json"
    if result.is_file():
        return json.loads(result.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    argv = [yaml, *shlex.split(options), f"--output_folder={folder}"]
    start = time.time()
    with open(folder / "measure.log", "w") as log:
        proc = subprocess.Popen([sys.executable, __file__, "--child", str(result), "--", *argv],
                                stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed: see {folder / 'measure.log'}")
    record = json.loads(result.read_text())
    record.update(name=name, options=options, peak_rss_bytes=usage.ru_maxrss * 1024,
                  wall_seconds=time.time() - start)
    result.write_text(json.dumps(record, indent=1))
    return record


def table(records, yaml):
    """The markdown table of ``records``."""
    splits = list(records[0]["test"])
    head = ["config", "options", *(f"{s} WER" for s in splits), "trainable params",
            "checkpoint", "peak RSS", "s / step", "steps", "wall"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    zero = next((r["zero_shot"] for r in records if r["zero_shot"]), {})
    if zero:
        lines.append("| zero-shot | | " + " | ".join(
            f"{zero[s]['WER']:.2f}%" if s in zero else "" for s in splits) + " |" + " |" * 6)
    for r in records:
        lines.append("| " + " | ".join([
            r["name"], f"`{r['options']}`" if r["options"] else "(the yaml)",
            *(f"{r['test'][s]['WER']:.2f}%" for s in splits),
            f"{r['trainable_parameters'] / 1e6:.2f} M",
            f"{r['checkpoint_bytes'] / 2**20:.1f} MiB", f"{r['peak_rss_bytes'] / 2**30:.2f} GiB",
            f"{r['fit_batch_seconds'] / max(r['optimizer_steps'], 1):.2f}",
            str(r["optimizer_steps"]), f"{r['wall_seconds'] / 60:.1f} min"]) + " |")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    return (f"`{yaml}`, {datetime.now(UTC):%Y-%m-%d}, {machine}, torch threads "
            f"{records[0]['torch_threads']}\n\n" + "\n".join(lines) + "\n")


def main():
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        return child(sys.argv[4:], sys.argv[2])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("yaml", help="the recipe yaml, relative to the recipe folder (the cwd)")
    p.add_argument("--config", action="append", required=True, metavar="NAME=OPTIONS",
                   help="a run: its name and train.py options (repeat)")
    p.add_argument("--out", required=True, help="folder of the runs and results.md")
    args = p.parse_args()
    out = Path(args.out).resolve()
    records = []
    for spec in args.config:
        name, _, options = spec.partition("=")
        records.append(run_config(args.yaml, name, options, out))
        print(f"{name}: {json.dumps(records[-1]['test'])}", flush=True)
    text = table(records, args.yaml)
    (out / "results.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
