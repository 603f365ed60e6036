"""Export a run's checkpoint to a self-contained folder that loads offline two ways.

The run's family (run.json's ``family``, ``speechtune.families``) writes the model files
(``speechtune.ctc_export``, ``speechtune.whisper_export``); the folder holds, side by side:

- transformers files: ``config.json`` + ``model.safetensors`` of a ``*ForCTC`` model (WavLM,
  wav2vec2, HuBERT; the CTC head as ``lm_head``) or of ``WhisperForConditionalGeneration``, with
  its processor (feature extractor + tokenizer; for CTC a ``Wav2Vec2CTCTokenizer`` whose ``<pad>``
  is the CTC blank and ``|`` the space) and, for Whisper, a generation config that writes the
  run's language and task. CTC on Whisper's encoder has no transformers class: its folder holds
  the encoder alone (``encoder.*``, ``speechtune.whisper_models``) for SpeechBrain, and its
  card says that transformers does not load it;
- SpeechBrain files: ``hyperparams.yaml`` for ``speechbrain.inference.ASR.EncoderASR`` (CTC:
  encoder + ``head.ckpt`` + ``tokenizer.ckpt``, greedy decoding) or ``WhisperASR`` (the run's
  test beam search). The encoder wrappers are speechtune's (per-utterance normalisation, the
  model's own Whisper window), so ``speechtune`` must be installed where the folder is loaded.
  ``hyperparams.yaml`` names the folder in ``export_folder``; load a moved folder with
  ``load_asr(folder)`` (or pass ``overrides={"export_folder": folder}``);
- ``README.md``: a model card (source run, checkpoint(s), valid/test WER, the commands).

What is exported is the best-WER checkpoint, a chosen one, or the average of the ``average``
best (SpeechBrain's ``average_checkpoints``). The run's own ``run.json`` and ``save/model_files``
(written by ``speechtune.recipe`` at training start) supply the model's config and inference
settings, so neither the recipe's yaml nor the hub is needed.
"""

import atexit
import json
import re
import shlex
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from speechbrain.inference import ASR
from speechbrain.utils.checkpoints import Checkpointer

from speechtune import families
from speechtune.model_card import model_card


# ---------------------------------------------------------------------------- the run
def read_run(run):
    """``(output folder, save folder, run.json contents)`` of a run's output folder."""
    out = Path(run)
    if out.name == "save":
        out = out.parent
    info_path, save = out / "run.json", out / "save"
    if not info_path.is_file() or not (save / "model_files").is_dir():
        raise SystemExit(
            f"{out} has no run.json / save/model_files: give a run's output folder (the one "
            "holding save/), of a run trained by this speechtune version (older runs: rerun "
            "their train.py command once; it resumes, writes both and only tests)")
    return out, save, json.loads(info_path.read_text(encoding="utf-8"))


def select_checkpoints(save, checkpoint=None, average=1):
    """The checkpoints to export: ``checkpoint`` (a CKPT+... name or path), else the ``average``
    best by valid WER (the best alone for 1)."""
    checkpointer = Checkpointer(save)
    if checkpoint is not None:
        wanted = Path(checkpoint).name
        found = [c for c in checkpointer.list_checkpoints() if c.path.name == wanted]
        if not found:
            raise SystemExit(f"no checkpoint {wanted} in {save}: see tools/checkpoints.py list")
        return found
    # the Checkpointer's own choice: the checkpoint(s) train.py tests, ties broken alike
    found = checkpointer.find_checkpoints(min_key="WER", max_num_checkpoints=average)
    if not found:
        raise SystemExit(f"no checkpoint in {save} has a valid WER yet: let the run validate")
    if len(found) < average:
        raise SystemExit(f"--average {average} but {save} holds {len(found)} checkpoint(s) "
                         "with a valid WER: lower it, or keep more (num_to_keep in the yaml)")
    return found


# ---------------------------------------------------------------------------- entry points
def export(run, out, checkpoint=None, average=1, force=False):
    """Export ``run`` (its output folder) to ``out``; returns a summary dict for the card."""
    run_folder, save, info = read_run(run)
    ckpts = select_checkpoints(save, checkpoint, average)
    out = Path(out)
    if out.exists():
        if not force:
            raise SystemExit(f"{out} exists: pass --force to replace it, or another folder")
        if any(out.iterdir()) and not (out / "speechtune_export.json").is_file():
            raise SystemExit(f"{out} is not an earlier export (no speechtune_export.json): "
                             "--force replaces only those; choose another folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    family = families.get(info["family"])
    model_class = family.export(save, ckpts, info, out)
    summary = {"run": str(run_folder.resolve()), "family": info["family"],
               "model_class": model_class, "processor_class": family.processor_class,
               "inference_class": family.inference_class, "language": info["language"],
               "sample_rate": info["sample_rate"],
               "checkpoints": [{"name": c.path.name, "WER": c.meta.get("WER"),
                                "CER": c.meta.get("CER"), "epoch": c.meta.get("epoch"),
                                "step": c.meta.get("step")} for c in ckpts],
               "train_command": shlex.join(["cd", info["cwd"]]) + " && " + shlex.join(
                   ["python", Path(info["script"]).name,
                    *(a for a in info["argv"] if not a.startswith("--average_best"))]),
               "test": _test_results(run_folder, ckpts),
               "exported": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")}
    (out / "speechtune_export.json").write_text(json.dumps(summary, indent=1, ensure_ascii=False))
    (out / "README.md").write_text(model_card(summary, out), encoding="utf-8")
    return summary


def _test_results(run_folder, ckpts):
    """The run's latest logged result per split for what is exported: the best-WER checkpoint's
    lines (no ``averaged``) or those of the same average; none for another checkpoint."""
    log = run_folder / "train_log.txt"
    best = Checkpointer(ckpts[0].path.parent).find_checkpoint(min_key="WER")
    if not log.is_file() or (len(ckpts) == 1 and (best is None or ckpts[0].path != best.path)):
        return []
    names = {c.path.name for c in ckpts}
    latest = {}
    for line in log.read_text(encoding="utf-8").splitlines():
        found = re.search(r"split: (\w+)(?:, averaged: (.+?))? - ", line)
        if not found:
            continue
        averaged = set(found[2].split(" + ")) if found[2] else None
        if (averaged is None and len(ckpts) == 1) or averaged == names:
            latest[found[1]] = line.strip()
    return list(latest.values())


def load_asr(folder, savedir=None, device="cpu"):
    """The exported ``folder`` as a SpeechBrain inference object (its family's
    ``inference_class``: ``EncoderASR``, ``WhisperASR``), wherever the folder now is.

    ``savedir`` is where SpeechBrain links the files it loads; by default a temporary folder
    removed at exit, since links left from an earlier load would point at a folder's old place.
    """
    folder = Path(folder).resolve()
    marker = folder / "speechtune_export.json"
    if not marker.is_file():
        raise SystemExit(f"{folder} is not a speechtune export (no speechtune_export.json): "
                         "write one with python tools/checkpoints.py export RUN FOLDER")
    family = families.get(json.loads(marker.read_text())["family"])
    if savedir is None:
        savedir = tempfile.mkdtemp(prefix="speechtune_load_")
        atexit.register(shutil.rmtree, savedir, ignore_errors=True)
    asr = getattr(ASR, family.inference_class).from_hparams(
        source=str(folder), savedir=str(savedir), overrides={"export_folder": str(folder)},
        run_opts={"device": device})
    return family.after_load(asr)
