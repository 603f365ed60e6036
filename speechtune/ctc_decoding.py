"""CTC decoding at test time: greedy, beam, beam + n-gram LM.

Greedy is SpeechBrain's ``ctc_greedy_decode``. ``beam`` and ``beam_lm`` run on one of two
backends (``decoder_backend``):

- ``flashlight``: flashlight-text's beam search in C++ (the decoder under torchaudio's
  ``ctc_decoder``, built here through flashlight-text's own API so that the lexicon's LM
  look-ahead, ``smearing``, is an option: torchaudio fixes it to ``max``), KenLM inside. ``beam``
  is its lexicon-free search; ``beam_lm`` its lexicon search, over every word of the LM's
  vocabulary (the ARPA file's unigrams) spelled with the CTC labels and ended by the separator,
  so it writes only words the LM knows. Its KenLM scores are log10: ``lm_weight = alpha ln 10``
  and ``word_score = beta`` make ``alpha``/``beta`` the natural-log weight and word bonus they
  are for SpeechBrain's searcher. Our targets have no separator after the last word: each
  utterance gets one more frame, the separator for certain, so its last word ends like the rest.
- ``speechbrain``: the yaml's ``ctc_searcher`` (``speechbrain.decoders.ctc.CTCBeamSearcher`` or
  ``CTCPrefixBeamSearcher``, pure Python), which scores words with KenLM through
  ``kenlm_model_path`` and may write words outside the LM's vocabulary.

The LM weights ``alpha``/``beta`` are the yaml's or those ``speechtune.lm_tuning`` found on the
validation set of a finished run.

Keys read (all required): ``decoding`` (``greedy | beam | beam_lm``: test only, validation is
always greedy), ``decoder_backend`` (``flashlight | speechbrain``), ``flashlight_decoder`` (the
flashlight search options), ``ctc_searcher``, ``lm_path``, ``lm_weights`` (``tuned``: the file
``tune_lm.py`` writes, ``<output_folder>/lm_tuning/lm_weights.yaml``; ``fixed``: ``lm_alpha``,
``lm_beta``), ``lm_missing`` (``error | fallback``: what ``beam_lm`` does without the ``kenlm``
module), ``blank_index``, ``target_case``.
"""

import itertools
import logging
import math
from pathlib import Path

import speechbrain as sb
import torch
import yaml

logger = logging.getLogger(__name__)

DECODINGS = ("greedy", "beam", "beam_lm")
BACKENDS = ("flashlight", "speechbrain")
LM_WEIGHTS = ("tuned", "fixed")
LM_MISSING = ("error", "fallback")
SPACE = " "  # the word separator of the character vocabulary
# the flashlight search options the yaml sets (flashlight_decoder)
FLASHLIGHT_OPTIONS = ("beam_size", "beam_size_token", "beam_threshold", "log_add", "sil_score",
                      "smearing")
SMEARINGS = ("none", "max", "logadd")
LN10 = math.log(10.0)  # flashlight's KenLM scores are log10 probabilities
UNK_WORD = "<unk>"  # the ARPA file's unknown word
SURE = -1000.0  # log-prob of every other label in the added separator frame (exp() is 0)


def _choice(hparams, key, allowed):
    value = hparams[key]
    if value not in allowed:
        raise ValueError(f"{key}: {value!r} is not one of {' | '.join(allowed)} (see the yaml's "
                         "decoding section)")
    return value


def import_kenlm():
    """Import what SpeechBrain's LM scorer and ARPA reader need (``kenlm``, ``pygtrie``) or say
    how to install them."""
    try:
        import kenlm  # noqa: F401
        import pygtrie  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"n-gram LM decoding needs the Python module '{err.name}', which is not installed: "
            "pip install -e '.[lm]' (or: pip install kenlm pygtrie; kenlm compiles with g++)."
        ) from err


def import_flashlight():
    """flashlight-text's decoder module, its KenLM and its ``Dictionary``, or say how to
    install them."""
    try:
        from flashlight.lib.text import decoder
        from flashlight.lib.text.decoder.kenlm import KenLM
        from flashlight.lib.text.dictionary import Dictionary
    except ImportError as err:
        raise ImportError(
            "decoder_backend: flashlight needs the Python package flashlight-text, which is not "
            "installed: pip install -e '.[lm]' (or: pip install flashlight-text); or decode "
            "with SpeechBrain's searcher: --decoder_backend=speechbrain.") from err
    return decoder, KenLM, Dictionary


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


def lm_arpa(path: Path) -> Path:
    """The ARPA file of the LM at ``path``, which lists its words: ``path`` itself, or beside a
    KenLM binary (which does not list them) the ARPA file ``local/build_lm.py`` writes with the
    same stem."""
    if path.suffix == ".arpa":
        return path
    arpa = path.with_suffix(".arpa")
    if not arpa.is_file():
        raise FileNotFoundError(f"{path} is a KenLM binary, which does not list its words; the "
                                f"beam search reads them from {arpa}, which is missing. Pass the "
                                "ARPA file as --lm_path, or put it beside the binary.")
    return arpa


def lm_words(path: Path) -> set[str]:
    """The LM's vocabulary: the unigrams of its ARPA file, read by SpeechBrain's reader."""
    from speechbrain.integrations.decoders.kenlm_scorer import load_unigram_set_from_arpa

    return load_unigram_set_from_arpa(str(lm_arpa(path)))


def lm_unigrams(path: Path):
    """The LM's words, which SpeechBrain's beam search needs to score partial words: it reads
    them from an ARPA file itself (None); for a binary they come from the ARPA file beside it."""
    return None if path.suffix == ".arpa" else sorted(lm_words(path))


def check_lm_case(path: Path, target_case: str):
    """Refuse an LM whose words are in the other case than the CTC targets (``target_case``):
    every word would be out of its vocabulary and the LM would silently stop helping."""
    words = lm_words(path)
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
    tuned_backend = tuned.get("decoder_backend", "speechbrain")  # files written before flashlight
    if tuned_backend != hparams["decoder_backend"]:
        # alpha/beta are in the same units for both, but each search has its own best point
        logger.warning("%s was tuned with decoder_backend: %s, but this run decodes with %s: "
                       "run tune_lm.py again with --decoder_backend=%s for weights chosen for "
                       "it.", path, tuned_backend, hparams["decoder_backend"],
                       hparams["decoder_backend"])
    return float(tuned["alpha"]), float(tuned["beta"])


def flashlight_options(hparams) -> dict:
    """The yaml's ``flashlight_decoder`` options, each of ``FLASHLIGHT_OPTIONS`` and no other
    (the LM weights come from ``lm_weights``)."""
    options = dict(hparams["flashlight_decoder"])
    unknown = sorted(set(options) - set(FLASHLIGHT_OPTIONS))
    missing = [key for key in FLASHLIGHT_OPTIONS if key not in options]
    if unknown or missing:
        raise ValueError(f"flashlight_decoder: {unknown or missing} "
                         f"{'not among' if unknown else 'missing from'} its options "
                         f"{', '.join(FLASHLIGHT_OPTIONS)} (see hparams/ctc.yaml's decoding "
                         "section)")
    if options["smearing"] not in SMEARINGS:
        raise ValueError(f"flashlight_decoder: smearing {options['smearing']!r} is not one of "
                         f"{' | '.join(SMEARINGS)}")
    return options


def check_decoding(hparams) -> str:
    """Validate the decoding keys at start-up (before any training) and return the test
    decoding that will run: ``beam_lm`` falls back to ``beam`` without ``kenlm`` only when
    ``lm_missing: fallback``."""
    mode = _choice(hparams, "decoding", DECODINGS)
    backend = _choice(hparams, "decoder_backend", BACKENDS)
    _choice(hparams, "lm_missing", LM_MISSING)
    _choice(hparams, "lm_weights", LM_WEIGHTS)
    if mode == "greedy":
        return mode
    if backend == "flashlight":
        import_flashlight()
        flashlight_options(hparams)
    if mode != "beam_lm":
        return mode
    path = lm_file(hparams)
    try:
        import_kenlm()
    except ImportError as err:
        if hparams["lm_missing"] == "error":
            raise ImportError(f"{err} Or test without the LM: --decoding=beam, or "
                              "--lm_missing=fallback to fall back to it.") from err
        logger.warning("%s lm_missing: fallback, so the test set is decoded by beam search "
                       "WITHOUT the language model.", err)
        return "beam"
    lm_unigrams(path)
    check_lm_case(path, hparams["target_case"])
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

    batch_size = 32  # utterances per call when decoding stored log-probs (it rounds lengths)

    def __init__(self, tokenizer, blank_index):
        self.tokenizer, self.blank_index = tokenizer, blank_index

    def __call__(self, log_probs, wav_lens):
        ids = sb.decoders.ctc_greedy_decode(log_probs, wav_lens, blank_id=self.blank_index)
        return ["".join(chars).split() for chars in self.tokenizer.decode_ndim(ids)]


class SearchDecoder:
    """A SpeechBrain CTC searcher's best hypothesis, as word lists."""

    # SpeechBrain 1.1 truncates relative lengths to frames (astype(int)), which can drop a
    # padded utterance's last frame: stored log-probs are decoded one utterance at a time
    batch_size = 1

    def __init__(self, searcher):
        self.searcher = searcher

    def __call__(self, log_probs, wav_lens):
        return [hyps[0].text.split() for hyps in self.searcher(log_probs, wav_lens)]

    def with_weights(self, alpha, beta):
        """This decoder with LM weight ``alpha`` and word bonus ``beta`` (the LM stays loaded)."""
        set_lm_weights(self.searcher, alpha, beta)
        return self


class FlashlightLM:
    """What lexicon search needs of an LM, built once and shared by decoders with other weights:
    its words, flashlight's KenLM over them, and the lexicon trie: each word spelled with the CTC
    ``labels`` and ended by the separator, its prefixes scored by the LM (``smearing``)."""

    def __init__(self, path: Path, labels: list[str], smearing: str):
        fl, kenlm, dictionary = import_flashlight()
        words = sorted(lm_words(path) - {"<s>", "</s>", UNK_WORD})
        index = {label: i for i, label in enumerate(labels)}
        spelled = [w for w in words if all(c in index for c in w)]
        if not spelled:
            raise ValueError(f"none of the {len(words)} words of {path} can be spelled with the "
                             f"CTC labels {labels}: is it an LM of this language?")
        if len(spelled) < len(words):
            logger.warning("%d of the %d words of %s have characters outside the CTC labels: "
                           "the decoder cannot write them.", len(words) - len(spelled),
                           len(words), path)
        self.words = [*spelled, UNK_WORD]  # by flashlight's word index
        self.unk = len(spelled)
        self.kenlm = kenlm(str(path), dictionary(self.words))
        self.trie = fl.Trie(len(labels), index[SPACE])
        start = self.kenlm.start(False)
        for i, word in enumerate(spelled):  # a word's score: its log10 P(word | <s>)
            self.trie.insert([index[c] for c in word] + [index[SPACE]], i,
                             self.kenlm.score(start, i)[1])
        self.trie.smear(getattr(fl.SmearingMode, smearing.upper()))


class FlashlightDecoder:
    """flashlight-text's CTC beam search (C++) to word lists: lexicon-free without an LM, over
    the LM's lexicon with one (``lm``, a ``FlashlightLM``)."""

    batch_size = 32  # utterances per call when decoding stored log-probs

    def __init__(self, labels, blank_index, options, lm=None, alpha=0.0, beta=0.0):
        fl, _, _ = import_flashlight()
        if SPACE not in labels:
            raise ValueError(f"the CTC labels {labels} have no word separator {SPACE!r}")
        self.labels, self.blank_index, self.options, self.lm = labels, blank_index, options, lm
        self.alpha, self.beta = alpha, beta
        self.separator = labels.index(SPACE)
        common = {"beam_size": options["beam_size"],
                  "beam_size_token": options["beam_size_token"] or len(labels),
                  "beam_threshold": options["beam_threshold"], "sil_score": options["sil_score"],
                  "log_add": options["log_add"], "criterion_type": fl.CriterionType.CTC}
        if lm is None:
            self.zero_lm = fl.ZeroLM()  # kept: the decoder does not own it
            self.decoder = fl.LexiconFreeDecoder(fl.LexiconFreeDecoderOptions(
                lm_weight=0.0, **common), self.zero_lm, self.separator, blank_index, [])
        else:
            self.decoder = fl.LexiconDecoder(fl.LexiconDecoderOptions(
                lm_weight=alpha * LN10, word_score=beta, unk_score=-math.inf, **common),
                lm.trie, lm.kenlm, self.separator, blank_index, lm.unk, [], False)

    def with_weights(self, alpha, beta):
        """A decoder with LM weight ``alpha`` and word bonus ``beta`` over the same loaded LM."""
        return FlashlightDecoder(self.labels, self.blank_index, self.options, self.lm, alpha,
                                 beta)

    def emissions(self, log_probs, wav_lens):
        """fp32 CPU log-probs and frame counts; with a lexicon, each utterance followed by a frame
        that is the separator for certain (its last word then ends as the others do)."""
        emissions = log_probs.detach().float().cpu()
        batch, frames, labels = emissions.shape
        lengths = (wav_lens.cpu() * frames).round().long()
        if self.lm is not None:
            emissions = torch.cat([emissions, emissions.new_zeros(batch, 1, labels)], dim=1)
            end = torch.full((labels,), SURE)
            end[self.separator] = 0.0
            emissions[torch.arange(batch), lengths] = end
            lengths = lengths + 1
        return emissions.contiguous(), lengths

    def words(self, result):
        """One flashlight hypothesis as a word list."""
        if self.lm is not None:
            return [self.lm.words[i] for i in result.words if i >= 0]
        ids = [i for i, _ in itertools.groupby(result.tokens) if i != self.blank_index]
        return "".join(SPACE if i == self.separator else self.labels[i] for i in ids).split()

    def nbest(self, log_probs, wav_lens, n=1):
        """Each utterance's ``n`` best hypotheses, best first, as word lists."""
        emissions, lengths = self.emissions(log_probs, wav_lens)
        return [[self.words(r) for r in self.decoder.decode(
            emissions[b].data_ptr(), int(lengths[b]), emissions.shape[2])[:n]]
            for b in range(len(emissions))]

    def __call__(self, log_probs, wav_lens):
        return [hyps[0] if hyps else [] for hyps in self.nbest(log_probs, wav_lens)]


def make_decoder(hparams, tokenizer, mode, alpha=0.0, beta=0.0):
    """The ``decoder_backend``'s beam search for ``mode`` (``beam`` or ``beam_lm``, with LM
    weight ``alpha`` and word bonus ``beta``)."""
    if _choice(hparams, "decoder_backend", BACKENDS) == "speechbrain":
        return SearchDecoder(make_searcher(hparams, tokenizer, mode, alpha, beta))
    labels, options = vocab_list(tokenizer), flashlight_options(hparams)
    lm = None
    if mode == "beam_lm":
        lm = FlashlightLM(lm_file(hparams), labels, options["smearing"])
        logger.info("flashlight lexicon: %d words of %s", lm.unk, hparams["lm_path"])
    return FlashlightDecoder(labels, hparams["blank_index"], options, lm, alpha, beta)


def build_test_decoder(hparams, tokenizer):
    """The test-time decoder the yaml's ``decoding`` asks for (after ``check_decoding``)."""
    mode = check_decoding(hparams)
    if mode == "greedy":
        return GreedyDecoder(tokenizer, hparams["blank_index"])
    alpha, beta = lm_weights(hparams) if mode == "beam_lm" else (0.0, 0.0)
    return make_decoder(hparams, tokenizer, mode, alpha, beta)
