"""CTC exports to ONNX, run with onnxruntime.

``export_onnx`` traces a transformers ``*ForCTC`` folder (what ``speechtune.ctc_export`` writes:
the run's encoder and CTC head, LoRA merged) with the per-utterance normalisation the run's
``speechtune.models.SSLEncoder`` applies, and a log-softmax: raw 16 kHz audio in, the CTC
log-probabilities the run decodes out. Inputs ``audio`` (batch, samples) float32, zero-padded,
and ``lengths`` (batch,) int64 samples; outputs ``log_probs`` (batch, frames, vocabulary) and
``frames`` (batch,) int64, the valid frames of each row. Batch and time axes are dynamic.

torch 2.14's default exporter (``dynamo=True``) needs the onnxscript package, which the
``export`` extra does not install; the TorchScript-based exporter (``dynamo=False``) is used. The
export runs a padded batch of another length through onnxruntime and PyTorch and refuses a
model whose outputs differ by more than ``TOLERANCE``.
"""

import json
import shutil
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCTC, Wav2Vec2CTCTokenizer, Wav2Vec2FeatureExtractor

from speechtune.models import normalize_per_utterance

try:  # the export extra
    import onnxruntime
except ImportError:
    onnxruntime = None

OPSET = 17
TOLERANCE = 1e-4  # largest difference of log-probabilities accepted at export
INPUTS, OUTPUTS = ("audio", "lengths"), ("log_probs", "frames")
#: the ``Wav2Vec2CTCTokenizer`` files copied beside model.onnx
TOKENIZER_FILES = ("vocab.json", "tokenizer_config.json")


def require_onnxruntime():
    """Stop with the install command when the ``export`` extra is missing."""
    if onnxruntime is None:
        raise SystemExit("--format onnx needs the onnx and onnxruntime packages, which are not "
                         'installed: pip install -e ".[export]" (from the speechtune checkout)')


class CTCLogProbs(torch.nn.Module):
    """Raw audio and lengths -> CTC log-probabilities and valid frame counts, as the run's
    SpeechBrain encoder computes them (``SSLEncoder``: normalised over each utterance's own
    samples, padding 0; an attention mask unless the model was trained without one)."""

    def __init__(self, model, normalize, attention_mask):
        super().__init__()
        self.model, self.normalize, self.attention_mask = model, normalize, attention_mask

    def forward(self, audio, lengths):
        if self.normalize:
            audio = normalize_per_utterance(audio, lengths.to(audio.dtype) / audio.shape[1])
        mask = torch.arange(audio.shape[1], device=audio.device)[None, :] < lengths[:, None]
        logits = self.model(audio, attention_mask=mask.long() if self.attention_mask else None
                            ).logits
        return logits.log_softmax(-1), self.model._get_feat_extract_output_lengths(lengths)


def padded_batch(signals):
    """``(audio, lengths)``: 1-D signals zero-padded into one float32 batch."""
    lengths = torch.tensor([len(s) for s in signals], dtype=torch.int64)
    audio = torch.zeros(len(signals), int(lengths.max()))
    for row, signal in zip(audio, signals, strict=True):
        row[:len(signal)] = torch.as_tensor(signal)
    return audio, lengths


def load_module(hf_folder):
    """The ``CTCLogProbs`` of a transformers CTC folder, in eval mode."""
    extractor = Wav2Vec2FeatureExtractor.from_pretrained(hf_folder)
    model = AutoModelForCTC.from_pretrained(hf_folder, attn_implementation="eager").eval()
    return CTCLogProbs(model, extractor.do_normalize,
                       bool(getattr(extractor, "return_attention_mask", True))).eval()


def session(path, threads=0):
    """An onnxruntime CPU session of ``path``."""
    require_onnxruntime()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run(sess, audio, lengths):
    """``(log_probs, frames)`` numpy arrays of a session for a padded batch."""
    return sess.run(list(OUTPUTS), {"audio": audio.numpy(), "lengths": lengths.numpy()})


def export_onnx(hf_folder, out, sample_rate):
    """Write ``out/model.onnx`` of the transformers CTC folder ``hf_folder``, its tokenizer
    (``vocab.json``: token -> id, ``<pad>`` the blank, ``|`` the space; ``Wav2Vec2CTCTokenizer``
    loads the folder) and ``onnx.json`` (inputs, outputs, sample rate, blank). Returns the largest
    difference of log-probabilities seen in the check."""
    require_onnxruntime()
    hf_folder, out = Path(hf_folder), Path(out)
    module = load_module(hf_folder)
    gen = torch.Generator().manual_seed(0)
    # traced on a padded batch of two; checked on three at other lengths
    trace = padded_batch([torch.randn(n, generator=gen) * 0.1 for n in (16000, 12000)])
    check = padded_batch([torch.randn(n, generator=gen) * 0.1 for n in (9000, 23000, 15000)])
    axes = {"audio": {0: "batch", 1: "samples"}, "lengths": {0: "batch"},
            "log_probs": {0: "batch", 1: "frames"}, "frames": {0: "batch"}}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the tracer's notes on Python values it records
        torch.onnx.export(module, trace, str(out / "model.onnx"), dynamo=False,
                          input_names=list(INPUTS), output_names=list(OUTPUTS),
                          dynamic_axes=axes, opset_version=OPSET)
        expected = module(*check)
    got = run(session(out / "model.onnx"), *check)
    if not (got[1] == expected[1].numpy()).all():
        raise SystemExit(f"the ONNX model of {hf_folder} counts frames {got[1].tolist()}, "
                         f"PyTorch {expected[1].tolist()}: not exported")
    diff = max(float((torch.from_numpy(got[0][i, :n]) - expected[0][i, :n]).abs().max())
               for i, n in enumerate(expected[1].tolist()))
    if diff > TOLERANCE:
        raise SystemExit(f"the ONNX model of {hf_folder} differs from PyTorch by {diff:.2e} "
                         f"(more than {TOLERANCE:g}) on a padded batch: not exported")
    for name in TOKENIZER_FILES:
        shutil.copy(hf_folder / name, out / name)
    vocab = json.loads((hf_folder / "vocab.json").read_text(encoding="utf-8"))
    (out / "onnx.json").write_text(json.dumps({
        "sample_rate": sample_rate,
        "inputs": {"audio": "float32 (batch, samples): mono audio at sample_rate, zero-padded",
                   "lengths": "int64 (batch,): samples of each row before padding"},
        "outputs": {"log_probs": "float32 (batch, frames, vocabulary): CTC log-probabilities",
                    "frames": "int64 (batch,): valid frames of each row"},
        "blank_id": vocab["<pad>"], "word_delimiter": "|",
        "tokenizer": "vocab.json (Wav2Vec2CTCTokenizer)",
        "exporter": f"torch.onnx.export(dynamo=False), opset {OPSET}",
        "torch": torch.__version__}, indent=1), encoding="utf-8")
    return diff


def greedy_texts(folder, log_probs, frames):
    """Greedy CTC transcripts of ``log_probs`` (numpy, batch first) with the folder's
    ``Wav2Vec2CTCTokenizer``: best ids of each row's valid frames, repeats merged, blanks
    dropped, ``|`` as the space."""
    tokenizer = Wav2Vec2CTCTokenizer.from_pretrained(folder)
    return [tokenizer.decode(row[:n].tolist())
            for row, n in zip(log_probs.argmax(-1), frames, strict=True)]
