"""Whisper exports to CTranslate2 / faster-whisper folders, and greedy decoding with them.

``export_ct2`` converts a transformers Whisper folder (what ``speechtune.whisper_export`` writes:
the run's weights, LoRA merged) with CTranslate2's own ``TransformersConverter``. The folder
holds what ``faster_whisper.WhisperModel(folder)`` and ``ctranslate2.models.Whisper(folder)``
read: ``model.bin`` (a ``WhisperSpec``, the layout ``speechtune.ct2`` reads back),
``config.json`` (suppressed tokens and language ids from the generation config),
``vocabulary.json``, ``tokenizer.json`` and ``preprocessor_config.json``.

The encoder window: a run with ``window_seconds`` below 30 has its encoder's position embedding
cut to ``window_seconds x 50`` positions (``speechtune.whisper_models.Whisper``). CTranslate2
keeps the cut table and refuses features longer than it (``expected (1, 80, 800)`` for 8 s) but
takes shorter ones, which then meet fewer positions than in training: features must be padded
to the window. ``preprocessor_config.json`` holds the run's window (``chunk_length``,
``nb_max_frames``), and both faster-whisper's feature extractor and transformers'
``WhisperFeatureExtractor.from_pretrained(folder)`` (``greedy_transcripts`` here) pad every
segment to it. A folder whose feature extractor and position table disagree is refused.
"""

import shutil
import tempfile
from pathlib import Path

import numpy as np
from transformers import AutoConfig, WhisperFeatureExtractor, WhisperTokenizerFast

from speechtune.ct2 import PREPROCESSOR_FILE, CT2FormatError
from speechtune.ct2 import check_window as check_window_of

try:  # the export extra
    import ctranslate2
    from ctranslate2.converters import TransformersConverter
    from ctranslate2.specs.model_spec import ACCEPTED_MODEL_TYPES as QUANTIZATIONS
except ImportError:
    ctranslate2 = TransformersConverter = None
    QUANTIZATIONS = ()  # CTranslate2's weight types (ct2-transformers-converter --quantization)
#: files faster-whisper reads beside model.bin (the converter writes config and vocabulary)
FASTER_WHISPER_FILES = ("tokenizer.json", PREPROCESSOR_FILE)


def require_ctranslate2():
    """Stop with the install command when the ``export`` extra is missing."""
    if ctranslate2 is None:
        raise SystemExit("--format ct2 needs the ctranslate2 package, which is not installed: "
                         'pip install -e ".[export]" (from the speechtune checkout)')


def check_quantization(quantization):
    """``quantization`` if CTranslate2 has it, else an error naming the choices."""
    require_ctranslate2()
    if quantization not in QUANTIZATIONS:
        raise SystemExit(f"--quantization {quantization}: CTranslate2 has "
                         f"{', '.join(QUANTIZATIONS)}")
    return quantization


def check_window(hf_folder):
    """The encoder window in seconds; an error if the feature extractor pads to another length
    than the encoder's position table covers (``speechtune.ct2.check_window``)."""
    extractor = WhisperFeatureExtractor.from_pretrained(hf_folder)
    try:
        check_window_of(extractor, AutoConfig.from_pretrained(hf_folder), hf_folder)
    except CT2FormatError as err:
        raise SystemExit(f"{err}; or export the run again with this speechtune, which writes "
                         "the window to both") from err
    return extractor.chunk_length


def export_ct2(hf_folder, out, quantization="float16"):
    """Convert the transformers Whisper folder ``hf_folder`` into the CTranslate2 folder ``out``
    (created; ``quantization`` as CTranslate2 names it). Returns the window in seconds."""
    require_ctranslate2()
    check_quantization(quantization)
    hf_folder, out = Path(hf_folder), Path(out)
    architectures = AutoConfig.from_pretrained(hf_folder).architectures or []
    if "WhisperForConditionalGeneration" not in architectures:
        raise SystemExit(f"--format ct2 converts Whisper encoder-decoder models; {hf_folder} "
                         f"holds {', '.join(architectures) or 'no transformers model'}")
    window = check_window(hf_folder)
    with tempfile.TemporaryDirectory(prefix="speechtune_ct2_") as files:
        # transformers writes the feature extractor into processor_config.json; faster-whisper
        # reads preprocessor_config.json
        WhisperFeatureExtractor.from_pretrained(hf_folder).to_json_file(
            Path(files) / PREPROCESSOR_FILE)
        shutil.copy(hf_folder / "tokenizer.json", Path(files) / "tokenizer.json")
        converter = TransformersConverter(str(hf_folder), low_cpu_mem_usage=True)
        converter.convert(str(out), quantization=quantization, force=True)
        for name in FASTER_WHISPER_FILES:
            shutil.copy(Path(files) / name, out / name)
    return window


def prompt_tokens(model, language, task):
    """The decoder prompt: ``<|startoftranscript|>`` [language, task] ``<|notimestamps|>``."""
    if not model.is_multilingual:
        return ["<|startoftranscript|>", "<|notimestamps|>"]
    return ["<|startoftranscript|>", f"<|{language}|>", f"<|{task}|>", "<|notimestamps|>"]


def load_ct2(folder, compute_type="default", threads=0):
    """``ctranslate2.models.Whisper`` on the CPU, its feature extractor (the folder's window) and
    tokenizer."""
    require_ctranslate2()
    model = ctranslate2.models.Whisper(str(folder), device="cpu", compute_type=compute_type,
                                       intra_threads=threads)
    extractor = WhisperFeatureExtractor.from_pretrained(folder)
    tokenizer = WhisperTokenizerFast(tokenizer_file=str(Path(folder) / "tokenizer.json"))
    return model, extractor, tokenizer


def greedy_transcripts(loaded, signals, language, task="transcribe", batch_size=8,
                       max_length=448):
    """Greedy transcripts of ``signals`` (1-D float arrays at 16 kHz) with a ``load_ct2`` triple:
    each padded to the model's window, the prompt of ``prompt_tokens``, CTranslate2's own
    suppression (the folder's ``suppress_ids``, blank at the start). Returns token id lists and
    texts."""
    model, extractor, tokenizer = loaded
    prompt = prompt_tokens(model, language, task)
    ids = []
    for start in range(0, len(signals), batch_size):
        chunk = [np.asarray(s, dtype=np.float32) for s in signals[start:start + batch_size]]
        features = extractor(chunk, sampling_rate=extractor.sampling_rate,
                             return_tensors="np").input_features
        results = model.generate(ctranslate2.StorageView.from_array(
            np.ascontiguousarray(features)), [prompt] * len(chunk), beam_size=1,
            max_length=max_length)
        ids += [r.sequences_ids[0] for r in results]
    return ids, [tokenizer.decode(i, skip_special_tokens=True).strip() for i in ids]
