"""CTC decoding at test time: greedy, beam, beam + n-gram LM.

Decoding is SpeechBrain's (``ctc_greedy_decode``; the yaml's ``ctc_searcher``, a
``speechbrain.decoders.ctc.CTCBeamSearcher`` or ``CTCPrefixBeamSearcher``, which scores words
with KenLM through ``kenlm_model_path``); this module chooses and configures it from the yaml's
decoding keys. The LM weights ``alpha``/``beta`` are the yaml's or those ``speechtune.lm_tuning``
found on the validation set of a finished run.

Keys read (all required): ``decoding`` (``greedy | beam | beam_lm``: test only, validation is
always greedy), ``ctc_searcher``, ``lm_path``, ``lm_weights`` (``tuned``: the file
``tune_lm.py`` writes, ``<output_folder>/lm_tuning/lm_weights.yaml``; ``fixed``: ``lm_alpha``,
``lm_beta``), ``lm_missing`` (``error | fallback``: what ``beam_lm`` does without the ``kenlm``
module), ``blank_index``, ``target_case``.
"""

import logging
from pathlib import Path

import speechbrain as sb
import yaml

logger = logging.getLogger(__name__)

DECODINGS = ("greedy", "beam", "beam_lm")
LM_WEIGHTS = ("tuned", "fixed")
LM_MISSING = ("error", "fallback")
SPACE = " "  # the word separator of the character vocabulary


def _choice(hparams, key, allowed):
    value = hparams[key]
    if value not in allowed:
        raise ValueError(f"{key}: {value!r} is not one of {' | '.join(allowed)} (see the yaml's "
                         "decoding section)")
    return value


def import_kenlm():
    """Import what SpeechBrain's LM scorer needs (``kenlm``, ``pygtrie``) or say how to install."""
    try:
        import kenlm  # noqa: F401
        import pygtrie  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"n-gram LM decoding needs the Python module '{err.name}', which is not installed: "
            "pip install -e '.[lm]' (or: pip install kenlm pygtrie; kenlm compiles with g++)."
        ) from err


def tuned_weights_path(hparams) -> Path:
    """Where ``tune_lm.py`` writes the best ``alpha``/``beta`` of a run."""
    return Path(hparams["output_folder"]) / "lm_tuning" / "lm_weights.yaml"


def lm_file(hparams) -> Path:
    """The LM KenLM loads (``lm_path``: an ARPA file or a KenLM binary), checked to exist."""
    if hparams["lm_path"] is None:
        raise ValueError("LM decoding needs --lm_path=<ARPA or KenLM binary>; build one with "
                         "local/build_lm.py")
    path = Path(hparams["lm_path"])
    if not path.is_file():
        raise FileNotFoundError(f"lm_path {path} does not exist; build it with local/build_lm.py")
    return path


def lm_unigrams(path: Path):
    """The LM's words, which the beam search needs to score partial words: SpeechBrain reads them
    from an ARPA file itself (None); a binary does not list them, so the ARPA file that
    ``local/build_lm.py`` writes beside it (same stem) is read."""
    if path.suffix == ".arpa":
        return None
    arpa = path.with_suffix(".arpa")
    if not arpa.is_file():
        raise FileNotFoundError(f"{path} is a KenLM binary, which does not list its words; the "
                                f"beam search reads them from {arpa}, which is missing. Pass the "
                                "ARPA file as --lm_path, or put it beside the binary.")
    from speechbrain.integrations.decoders.kenlm_scorer import load_unigram_set_from_arpa

    return sorted(load_unigram_set_from_arpa(str(arpa)))


def check_lm_case(path: Path, target_case: str):
    """Refuse an LM whose words are in the other case than the CTC targets (``target_case``):
    every word would be out of its vocabulary and the LM would silently stop helping."""
    from speechbrain.integrations.decoders.kenlm_scorer import load_unigram_set_from_arpa

    words = load_unigram_set_from_arpa(str(path.with_suffix(".arpa")))
    cased = [w for w in words if w.upper() != w.lower()]
    other = [w for w in cased if w != (w.upper() if target_case == "upper" else w.lower())]
    if cased and len(other) > len(cased) / 2:
        raise ValueError(
            f"{path}: {len(other)} of the LM's {len(cased)} words are not {target_case} case "
            f"(e.g. {sorted(other)[:3]}), but the targets are (target_case: {target_case}). "
            f"Rebuild it with python local/build_lm.py ... --case {target_case}.")


def lm_weights(hparams) -> tuple[float, float]:
    """``(alpha, beta)``: the yaml's ``lm_alpha``/``lm_beta`` (``lm_weights: fixed``) or those
    ``tune_lm.py`` found for this run and this LM (``lm_weights: tuned``)."""
    if _choice(hparams, "lm_weights", LM_WEIGHTS) == "fixed":
        return float(hparams["lm_alpha"]), float(hparams["lm_beta"])
    path = tuned_weights_path(hparams)
    if not path.is_file():
        raise FileNotFoundError(
            f"lm_weights: tuned reads {path}, which tune_lm.py writes from a finished run: train "
            "first (test decoding greedy), run `python tune_lm.py <same yaml and overrides> "
            "--lm_path=...`, then rerun this command; or pass --lm_weights=fixed "
            "--lm_alpha=A --lm_beta=B.")
    tuned = yaml.safe_load(path.read_text(encoding="utf-8"))
    if Path(tuned["lm_path"]).resolve() != lm_file(hparams).resolve():
        raise ValueError(f"{path} was tuned for the LM {tuned['lm_path']}, not for lm_path "
                         f"{hparams['lm_path']}: run tune_lm.py again with this LM.")
    checkpointer = hparams.get("checkpointer")
    best = checkpointer.find_checkpoint(min_key="WER") if checkpointer is not None else None
    if best is not None and best.path.name != tuned["checkpoint"]:
        # e.g. training went on after tuning: the weights still work, but were not chosen for it
        logger.warning("%s was tuned on checkpoint %s, but the best-WER checkpoint is now %s: "
                       "run tune_lm.py again for weights chosen for it.", path,
                       tuned["checkpoint"], best.path.name)
    return float(tuned["alpha"]), float(tuned["beta"])


def check_decoding(hparams) -> str:
    """Validate the decoding keys at start-up (before any training) and return the test
    decoding that will run: ``beam_lm`` falls back to ``beam`` without ``kenlm`` only when
    ``lm_missing: fallback``."""
    mode = _choice(hparams, "decoding", DECODINGS)
    _choice(hparams, "lm_missing", LM_MISSING)
    _choice(hparams, "lm_weights", LM_WEIGHTS)
    if mode != "beam_lm":
        return mode
    lm_unigrams(lm_file(hparams))
    check_lm_case(lm_file(hparams), hparams["target_case"])
    try:
        import_kenlm()
    except ImportError as err:
        if hparams["lm_missing"] == "error":
            raise ImportError(f"{err} Or test without the LM: --decoding=beam, or "
                              "--lm_missing=fallback to fall back to it.") from err
        logger.warning("%s lm_missing: fallback, so the test set is decoded by beam search "
                       "WITHOUT the language model.", err)
        return "beam"
    lm_weights(hparams)
    return mode


def vocab_list(tokenizer) -> list[str]:
    """The CTC output labels in index order (what SpeechBrain's CTC searchers take)."""
    return [tokenizer.ind2lab[i] for i in range(len(tokenizer.ind2lab))]


def make_searcher(hparams, tokenizer, mode, alpha=None, beta=None):
    """The yaml's ``ctc_searcher`` over the vocabulary; with the LM for ``mode == "beam_lm"``."""
    kwargs = {"blank_index": hparams["blank_index"], "vocab_list": vocab_list(tokenizer),
              "space_token": SPACE}
    if mode == "beam_lm":
        path = lm_file(hparams)
        kwargs.update(kenlm_model_path=str(path), unigrams=lm_unigrams(path), alpha=alpha,
                      beta=beta)
    return hparams["ctc_searcher"](**kwargs)


def set_lm_weights(searcher, alpha, beta):
    """Change ``alpha``/``beta`` of a searcher whose LM is loaded (reloading it costs minutes
    for a large LM); both live on SpeechBrain's ``KenlmScorer``. These are attributes, not API:
    checked against SpeechBrain 1.1.2, which reads them afresh on every search; re-check on an
    upgrade, or tuning would silently score one setting many times."""
    searcher.alpha = searcher.lm.alpha = alpha
    searcher.beta = searcher.lm.beta = beta


class GreedyDecoder:
    """Greedy CTC decoding (SpeechBrain's ``ctc_greedy_decode``) to word lists."""

    def __init__(self, tokenizer, blank_index):
        self.tokenizer, self.blank_index = tokenizer, blank_index

    def __call__(self, log_probs, wav_lens):
        ids = sb.decoders.ctc_greedy_decode(log_probs, wav_lens, blank_id=self.blank_index)
        return ["".join(chars).split() for chars in self.tokenizer.decode_ndim(ids)]


class SearchDecoder:
    """A SpeechBrain CTC searcher's best hypothesis, as word lists."""

    def __init__(self, searcher):
        self.searcher = searcher

    def __call__(self, log_probs, wav_lens):
        return [hyps[0].text.split() for hyps in self.searcher(log_probs, wav_lens)]


def build_test_decoder(hparams, tokenizer):
    """The test-time decoder the yaml's ``decoding`` asks for (after ``check_decoding``)."""
    mode = check_decoding(hparams)
    if mode == "greedy":
        return GreedyDecoder(tokenizer, hparams["blank_index"])
    alpha, beta = lm_weights(hparams) if mode == "beam_lm" else (None, None)
    return SearchDecoder(make_searcher(hparams, tokenizer, mode, alpha, beta))
