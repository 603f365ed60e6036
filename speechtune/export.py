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

Other formats (``FORMATS``; docs/export.md): ``ct2`` converts a Whisper run's transformers files
into a CTranslate2 / faster-whisper folder (``speechtune.ct2_export``), ``onnx`` a CTC run's into
an onnxruntime model (``speechtune.onnx_export``). The transformers files are written to a
temporary folder first; ``out`` holds the format's files, the card and the marker file.
"""

import atexit
import json
import re
import shlex
import shutil
import tempfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from speechbrain.inference import ASR
from speechbrain.utils.checkpoints import Checkpointer
from transformers.models.auto.modeling_auto import MODEL_FOR_CTC_MAPPING_NAMES

from speechtune import ct2_export, families, onnx_export
from speechtune.model_card import model_card


@dataclass(frozen=True)
class Format:
    """An export format: the runs it takes (by their SpeechBrain inference class) and the
    transformers model classes it converts."""

    runs: str  # what it takes, for messages
    inference_class: str | None  # None: any run
    model_classes: tuple | None  # None: the SpeechBrain + transformers folder itself


FORMATS = {
    "speechbrain": Format("any run", None, None),
    "ct2": Format("Whisper encoder-decoder runs (SpeechBrain WhisperASR)", "WhisperASR",
                  ("WhisperForConditionalGeneration",)),
    "onnx": Format("CTC runs (SpeechBrain EncoderASR) with a transformers *ForCTC class "
                   "(WavLM, wav2vec2, HuBERT)", "EncoderASR",
                   tuple(MODEL_FOR_CTC_MAPPING_NAMES.values())),
}


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
def check_format(fmt, family, quantization):
    """Stop on a format the run's family cannot take, or a quantization it has no use for."""
    if fmt not in FORMATS:
        raise SystemExit(f"--format {fmt}: the formats are {', '.join(FORMATS)}")
    wanted = FORMATS[fmt].inference_class
    if wanted is not None and family.inference_class != wanted:
        others = [f for f, spec in FORMATS.items() if spec.inference_class in (
            None, family.inference_class) and f != "speechbrain"]
        raise SystemExit(f"--format {fmt} is for {FORMATS[fmt].runs}; this is a "
                         f"{family.name} run ({family.inference_class}): use --format "
                         f"{' or '.join(others + ['speechbrain'])}")
    if quantization is not None and fmt != "ct2":
        raise SystemExit(f"--quantization is for --format ct2 (CTranslate2 weight types), not "
                         f"--format {fmt}")
    if fmt == "ct2":
        ct2_export.require_ctranslate2()
        ct2_export.check_quantization(quantization or "float16")
    if fmt == "onnx":
        onnx_export.require_onnxruntime()


def convert(fmt, model_class, hf_folder, out, info, quantization):
    """Write ``fmt``'s files of the transformers folder ``hf_folder`` into ``out``; returns
    the marker file's notes on them."""
    if model_class not in FORMATS[fmt].model_classes:
        what = model_class or "for SpeechBrain only (transformers has no class for it)"
        raise SystemExit(f"--format {fmt} converts transformers "
                         f"{', '.join(FORMATS[fmt].model_classes[:3])}, ... models; this run's "
                         f"model is {what}: export it without --format")
    if fmt == "ct2":
        quantization = quantization or "float16"
        window = ct2_export.export_ct2(hf_folder, out, quantization)
        return {"quantization": quantization, "window_seconds": window}
    diff = onnx_export.export_onnx(hf_folder, out, info["sample_rate"])
    return {"checked_max_abs_diff": diff}


def export(run, out, checkpoint=None, average=1, force=False, fmt="speechbrain",
           quantization=None):
    """Export ``run`` (its output folder) to ``out`` in format ``fmt`` (``FORMATS``); returns a
    summary dict for the card."""
    run_folder, save, info = read_run(run)
    family = families.get(info["family"])
    check_format(fmt, family, quantization)
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
    notes = {}
    if fmt == "speechbrain":
        model_class = family.export(save, ckpts, info, out)
    else:
        try:
            with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as hf:
                model_class = family.export(save, ckpts, info, Path(hf))
                notes = convert(fmt, model_class, Path(hf), out, info, quantization)
        except BaseException:  # no half-written folder that --force would not replace
            shutil.rmtree(out, ignore_errors=True)
            raise
    summary = {"run": str(run_folder.resolve()), "family": info["family"], "format": fmt,
               **notes,
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
    card = model_card(summary, out)
    if fmt != "speechbrain":  # the provenance and results; the use section is the format's
        card = card.split("\n## Use\n")[0] + "\n" + format_use(summary, out)
    (out / "README.md").write_text(card, encoding="utf-8")
    return summary


def format_use(summary, out):
    """The card's use section of a ct2 / onnx folder."""
    name = Path(out).name
    if summary["format"] == "ct2":
        window = summary["window_seconds"]
        if window < 30:  # faster-whisper 1.2's transcribe pads every window to 3000 frames
            use = f"""faster-whisper (1.2) cannot run this model: its `WhisperModel.transcribe` pads
every window to 30 s of features whatever `preprocessor_config.json` says, and CTranslate2 then
refuses them (`expected an input with shape (1, 80, {int(window * 100)})`). Decode with
ctranslate2 itself, which pads to the model's window as training did:

```python
from speechtune.ct2_export import greedy_transcripts, load_ct2
from speechtune.data import load_audio
loaded = load_ct2("{name}", threads=2)
ids, texts = greedy_transcripts(loaded, [load_audio("utt.wav", 16000).numpy()],
                                "{summary['language']}")
```

For faster-whisper, train with the model's own 30 s window (`--window_seconds=null`)."""
        else:
            use = f"""```python
from faster_whisper import WhisperModel
model = WhisperModel("{name}", device="cpu", compute_type="default")
segments, _ = model.transcribe("utt.wav", language="{summary['language']}", beam_size=1,
                               without_timestamps=True)
print(" ".join(s.text for s in segments))
```

Without faster-whisper: `speechtune.ct2_export.greedy_transcripts` (ctranslate2 and
transformers' feature extractor)."""
        return f"""## Use (CTranslate2 / faster-whisper, {summary['quantization']} weights)

The encoder's window is {window:g} s (`preprocessor_config.json`): audio is padded to it, as in
training.

{use} See docs/export.md in the speechtune repository.
"""
    return f"""## Use (onnxruntime)

`model.onnx` takes mono audio at {summary['sample_rate']} Hz, zero-padded into a batch, and each
row's length in samples, and returns CTC log-probabilities and each row's valid frames
(`onnx.json`; per-utterance normalisation is inside the model). Greedy decoding:

```python
import numpy as np, onnxruntime, soundfile
from transformers import Wav2Vec2CTCTokenizer
session = onnxruntime.InferenceSession("{name}/model.onnx")
audio, rate = soundfile.read("utt.wav", dtype="float32")
log_probs, frames = session.run(None, {{"audio": audio[None], "lengths": np.array([len(audio)])}})
tokenizer = Wav2Vec2CTCTokenizer.from_pretrained("{name}")
print(tokenizer.decode(log_probs[0, :frames[0]].argmax(-1).tolist()))
```
"""


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
    exported = json.loads(marker.read_text())
    if exported.get("format", "speechbrain") != "speechbrain":
        raise SystemExit(f"{folder} is a --format {exported['format']} export, which SpeechBrain "
                         "does not load: see its README.md (or export the run without --format)")
    family = families.get(exported["family"])
    if savedir is None:
        savedir = tempfile.mkdtemp(prefix="speechtune_load_")
        atexit.register(shutil.rmtree, savedir, ignore_errors=True)
    asr = getattr(ASR, family.inference_class).from_hparams(
        source=str(folder), savedir=str(savedir), overrides={"export_folder": str(folder)},
        run_opts={"device": device})
    return family.after_load(asr)
