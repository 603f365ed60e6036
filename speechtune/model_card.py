"""The model card (``README.md``) of an exported folder (``speechtune.export``)."""

from pathlib import Path


def transformers_section(summary, name):
    """How to load the folder with transformers, or why it does not load there."""
    hf_class = summary["model_class"]
    if hf_class is None:  # CTC on Whisper's encoder: transformers has no such class
        return """transformers: not supported. transformers has no CTC model class for Whisper's
encoder (its `*ForCTC` classes are for wav2vec2-style encoders), so no transformers CTC model
was written. `model.safetensors` holds the fine-tuned encoder alone (`encoder.*`, Whisper's
layout, the run's window in `config.json`); the CTC head is `head.ckpt` and the characters
`tokenizer.ckpt`, both SpeechBrain's. Load it through SpeechBrain as above
(`speechtune.whisper_models.WhisperEncoder` + `EncoderASR`)."""
    processor = summary["processor_class"]
    return f"""transformers:

```python
from transformers import {hf_class}, {processor}
model = {hf_class}.from_pretrained("{name}")
processor = {processor}.from_pretrained("{name}")
```

Both read the same weights."""


def model_card(summary, out):
    """A README for the exported folder: what it is, where from, how good, how to load."""
    def pct(value):
        return "-" if value is None else f"{value:.2f}"

    ckpt_rows = "\n".join(f"| {c['name']} | {c['epoch']} | {c['step']} | {pct(c['WER'])} | "
                          f"{pct(c['CER'])} |" for c in summary["checkpoints"])
    what = ("the best-WER checkpoint" if len(summary["checkpoints"]) == 1
            else f"the average of the {len(summary['checkpoints'])} best checkpoints by valid WER")
    sb_class = summary["inference_class"]
    tests = "\n".join(f"    {line}" for line in summary["test"]) or "    (none logged)"
    name = Path(out).name
    return f"""# {name}: {summary['family'].upper()} ASR model ({summary['language']})

Exported by speechtune (`tools/checkpoints.py export`) on {summary['exported']} from the run
`{summary['run']}`: {what}.

| checkpoint | epoch | step | valid WER % | valid CER % |
|---|---|---|---|---|
{ckpt_rows}

Trained with:

    {summary['train_command']}

The run's latest results for these weights (its `train_log.txt`; an average is scored when the
run is evaluated with `tools/checkpoints.py average` or `--average_best`):

{tests}

## Use

Transcribe files or a folder: `python tools/transcribe.py {name} audio/ --out text.jsonl`.

SpeechBrain (needs `speechtune` installed: the encoder wrappers are its own):

```python
from speechtune.export import load_asr
asr = load_asr("{name}")          # speechbrain.inference.ASR.{sb_class}
print(asr.transcribe_file("utt.wav"))
```

{transformers_section(summary, name)} Audio is mono at {summary['sample_rate']} Hz. Per-utterance
normalisation and the greedy/beam settings are those of the run's test decoding; an n-gram LM
used in testing is not part of the export.
"""
