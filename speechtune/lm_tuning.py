"""LM weight tuning: grid-search the n-gram LM weight ``alpha`` and word bonus ``beta`` on the
validation set of a finished CTC run (``tune_lm.py``), for ``decoding: beam_lm`` +
``lm_weights: tuned`` (``speechtune.ctc_decoding``).

The valid log-probs are computed once from the best-WER checkpoint and decoded for every point of
``lm_alpha_grid`` x ``lm_beta_grid`` with the ``decoder_backend``'s beam search and one loaded LM;
the grid points are shared among ``num_workers`` forked processes (on a platform without fork,
and with ``num_workers`` 0 or 1, they run in this one), which inherit the log-probs and the loaded
LM. The results go to ``<output_folder>/lm_tuning/`` (``grid.csv``, ``grid.md``,
``lm_weights.yaml``, which records the backend).
"""

import csv
import logging
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path

import speechbrain as sb
import torch
import yaml

from speechtune.ctc import CTCFamily
from speechtune.ctc_decoding import (
    GreedyDecoder,
    check_decoding,
    lm_file,
    make_decoder,
    tuned_weights_path,
)
from speechtune.recipe import build_experiment, load_hparams

logger = logging.getLogger(__name__)


@dataclass
class Utterance:
    """One utterance's CTC log-probs (frames x labels, padding cut) and reference words."""

    id: str
    log_probs: torch.Tensor
    words: list


def collect_log_probs(brain, dataset, loader_kwargs) -> list[Utterance]:
    """One forward pass over ``dataset`` with the Brain's current weights (eval mode, the
    evaluation precision); the log-probs are kept so every decoder reuses them."""
    loader = brain.make_dataloader(dataset, stage=sb.Stage.VALID, ckpt_prefix=None,
                                   **loader_kwargs)
    brain.modules.eval()
    utterances = []
    with torch.no_grad(), brain.evaluation_ctx:
        for batch in loader:
            log_probs, wav_lens, _ = brain.compute_forward(batch, sb.Stage.VALID)
            frames = (wav_lens * log_probs.shape[1]).round().int().tolist()
            for utt_id, lp, n, words in zip(batch.id, log_probs.float().cpu(), frames,
                                            batch.words, strict=True):
                utterances.append(Utterance(utt_id, lp[:n], words.split()))
    return utterances


def batches(utterances, batch_size):
    """``(log_probs, wav_lens)`` of ``batch_size`` utterances at a time: padded, relative
    lengths (what a decoder takes in a recipe's test stage)."""
    for start in range(0, len(utterances), batch_size):
        chunk = [u.log_probs for u in utterances[start:start + batch_size]]
        frames = torch.tensor([len(lp) for lp in chunk], dtype=torch.float)
        yield torch.nn.utils.rnn.pad_sequence(chunk, batch_first=True), frames / frames.max()


def decode_and_score(decoder, utterances, wer_computer):
    """Decode every utterance (``decoder.batch_size`` at a time) -> ``(WER %, utterances per
    second)``."""
    metric = wer_computer()
    start = time.perf_counter()
    hyps = [hyp for log_probs, wav_lens in batches(utterances, decoder.batch_size)
            for hyp in decoder(log_probs, wav_lens)]
    seconds = time.perf_counter() - start
    metric.append([u.id for u in utterances], hyps, [u.words for u in utterances])
    return metric.summarize("error_rate"), len(utterances) / seconds


_worker = {}  # a tuning process's decoder, log-probs and WER class (set by _start_worker)


def _start_worker(decoder, utterances, wer_computer, threads=None):
    if threads is not None:  # a forked worker: one thread each
        torch.set_num_threads(threads)
    _worker.update(decoder=decoder, utterances=utterances, wer_computer=wer_computer)


def _score_point(point):
    alpha, beta = point
    decoder = _worker["decoder"].with_weights(alpha, beta)
    wer, speed = decode_and_score(decoder, _worker["utterances"], _worker["wer_computer"])
    return {"alpha": alpha, "beta": beta, "WER": wer, "utt_per_s": speed}


def grid_search(decoder, utterances, alphas, betas, wer_computer, num_workers=1) -> list[dict]:
    """Valid WER of every ``(alpha, beta)`` with ``decoder``'s loaded LM, in grid order; the
    points are shared among ``num_workers`` forked processes, which inherit the decoder and the
    log-probs (no copy until written)."""
    points = [(alpha, beta) for alpha in alphas for beta in betas]
    workers = min(num_workers, len(points))
    if workers > 1 and "fork" not in multiprocessing.get_all_start_methods():
        logger.info("no fork on this platform: the grid is decoded in one process")
        workers = 1
    rows = []
    if workers <= 1:
        _start_worker(decoder, utterances, wer_computer)
        results = map(_score_point, points)
    else:
        pool = multiprocessing.get_context("fork").Pool(
            workers, initializer=_start_worker, initargs=(decoder, utterances, wer_computer, 1))
        results = pool.imap(_score_point, points)
    try:
        for row in results:
            rows.append(row)
            logger.info("alpha %.3g  beta %.3g  valid WER %.2f%%  (%.1f utt/s)", row["alpha"],
                        row["beta"], row["WER"], row["utt_per_s"])
    finally:
        if workers > 1:
            pool.terminate()
    return rows


def best_row(rows):
    """Lowest WER; ties go to the smaller ``alpha`` then ``beta`` (the earlier grid point)."""
    return min(rows, key=lambda r: (r["WER"], r["alpha"], r["beta"]))


def write_tuning(folder, rows, best, meta):
    """``grid.csv``, ``grid.md`` (WER: alpha rows x beta columns) and ``lm_weights.yaml``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "grid.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    betas = sorted({r["beta"] for r in rows})
    wer = {(r["alpha"], r["beta"]): r["WER"] for r in rows}
    lines = [f"Valid WER (%) by LM weight alpha (rows) and word bonus beta (columns); LM "
             f"{meta['lm_path']}, checkpoint {meta['checkpoint']}; greedy: "
             f"{meta['greedy_WER']:.2f}%.", "",
             "| alpha \\ beta | " + " | ".join(f"{b:g}" for b in betas) + " |",
             "|---" * (len(betas) + 1) + "|"]
    for alpha in sorted({r["alpha"] for r in rows}):
        cells = [f"**{wer[alpha, b]:.2f}**" if (alpha, b) == (best["alpha"], best["beta"])
                 else f"{wer[alpha, b]:.2f}" for b in betas]
        lines.append(f"| {alpha:g} | " + " | ".join(cells) + " |")
    (folder / "grid.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    weights = {"alpha": float(best["alpha"]), "beta": float(best["beta"]),
               "valid_WER": float(best["WER"]), **meta}
    (folder / "lm_weights.yaml").write_text(yaml.safe_dump(weights, sort_keys=False),
                                            encoding="utf-8")


def load_finished_run(argv, prepare):
    """``hparams.yaml [--key=value ...]`` of a finished CTC run (same yaml and overrides as its
    training) -> ``(hparams, experiment, checkpoint)`` with the best-WER checkpoint loaded. The
    test decoding keys are not applied (the caller decodes), so ``lm_weights: tuned`` may be
    passed before the weights exist."""
    hparams, run_opts = load_hparams(argv, record=False)
    experiment = build_experiment({**hparams, "decoding": "greedy"}, run_opts, prepare,
                                  CTCFamily)
    checkpointer = experiment.brain.checkpointer
    ckpt = checkpointer.find_checkpoint(min_key="WER")
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {hparams['save_folder']}: train first "
                                "(python train.py with the same yaml and overrides)")
    checkpointer.load_checkpoint(ckpt)
    return hparams, experiment, ckpt


def tune(argv, prepare):
    """``tune_lm.py hparams.yaml [--key=value ...]``: from the best-WER checkpoint of a finished
    run, compute the valid log-probs once, decode them with the LM (``lm_path``) for every
    ``lm_alpha_grid`` x ``lm_beta_grid`` point and write ``<output_folder>/lm_tuning/`` (read
    back by ``decoding: beam_lm`` + ``lm_weights: tuned``). Returns the best grid row."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    hparams, experiment, ckpt = load_finished_run(argv, prepare)
    # the LM file, its case, the backend's and the LM's modules (the tuned weights need not exist)
    check_decoding({**hparams, "decoding": "beam_lm", "lm_weights": "fixed",
                    "lm_missing": "error"})
    path, brain = lm_file(hparams), experiment.brain
    utterances = collect_log_probs(brain, experiment.valid, experiment.loader_kwargs["valid"])
    greedy = GreedyDecoder(brain.tokenizer, hparams["blank_index"])
    greedy_wer, _ = decode_and_score(greedy, utterances, hparams["wer_computer"])
    decoder = make_decoder(hparams, brain.tokenizer, "beam_lm")
    rows = grid_search(decoder, utterances, hparams["lm_alpha_grid"], hparams["lm_beta_grid"],
                       hparams["wer_computer"], hparams["num_workers"])
    best = best_row(rows)
    folder = tuned_weights_path(hparams).parent
    write_tuning(folder, rows, best, {"lm_path": str(path.resolve()), "checkpoint": ckpt.path.name,
                                      "greedy_WER": float(greedy_wer),
                                      "decoder_backend": hparams["decoder_backend"]})
    print(f"[speechtune] best valid WER {best['WER']:.2f}% (greedy {greedy_wer:.2f}%) at "
          f"alpha={best['alpha']:g} beta={best['beta']:g}; table in {folder}/grid.md. Test with "
          f"them: rerun the training command with --decoding=beam_lm --lm_path={path}")
    return best
