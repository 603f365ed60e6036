#!/usr/bin/env bash
# The GPU half of docs/performance.md in one run: the training step's throughput against the plain
# transformers loop, its host syncs, compile time and CUDA graphs, on one CUDA GPU.
#
#   bash tools/gpu_checks.sh OUT_DIR
#
# Stages, most wanted first; each runs tools/benchmark.py under its own time limit (seconds) and
# writes OUT_DIR/<stage>/results.{jsonl,md}, its profiles and OUT_DIR/<stage>.log; a stage cut off
# at its limit keeps the rows it finished (the benchmark appends one per variant):
#   step      WavLM-Large CTC: hf, sdpa, sdpa+buckets, with profiles and host syncs (150 s)
#   whisper   whisper-medium with its encoder frozen: hf, cache (90 s)
#   compile   WavLM-Large: hf, then torch.compile per bucket, then CUDA graphs (240 s)
# 8 minutes at most; OUT_DIR/summary.txt lists each stage's exit status
# (124: cut off at its limit). STAGES="step whisper" runs a subset; PYTHON names the interpreter.
#
# Smoke run on a machine without a GPU (tiny models, two steps; checks the script, not speed):
#   GPU_CHECKS_CTC=wavlm-tiny GPU_CHECKS_WHISPER=whisper-tiny \
#   GPU_CHECKS_ARGS="--steps 2 --warmup 1" bash tools/gpu_checks.sh /tmp/gpu_checks
set -u -o pipefail
out=${1:?usage: bash tools/gpu_checks.sh OUT_DIR}
ctc=${GPU_CHECKS_CTC:-wavlm-large}
whisper=${GPU_CHECKS_WHISPER:-whisper-medium}
read -r -a extra <<<"${GPU_CHECKS_ARGS:-}"
stages=${STAGES:-step whisper compile}
py=${PYTHON:-python}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
out=$(cd "$out" && pwd)
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# cold compiles: compile time is one of the numbers
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-$(mktemp -d)}

{
  date -u
  # a copied working tree has no .git: then the caller names the commit it sent
  echo "commit: $(git -C "$here/.." rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  "$py" -c 'import torch, transformers, speechbrain; print("torch", torch.__version__,
"transformers", transformers.__version__, "speechbrain", speechbrain.__version__,
"cuda", torch.cuda.is_available())'
} >"$out/summary.txt" 2>&1

stage() {  # stage NAME LIMIT_S BENCHMARK_ARGS...
  local name=$1 limit=$2
  shift 2
  case " $stages " in *" $name "*) ;; *) return 0 ;; esac
  local start=$SECONDS
  timeout "$limit" "$py" "$here/benchmark.py" "$@" "${extra[@]}" --out "$out/$name" \
    >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$out/summary.txt"
}

stage step 150 --model "$ctc" --utterances 400 --variants hf,sdpa,sdpa+buckets --profile
stage whisper 90 --model "$whisper" --utterances 400 --variants hf,cache
stage compile 240 --model "$ctc" --utterances 400 \
  --variants hf,sdpa+compile-auto+buckets,sdpa+compile-graphs+buckets
cat "$out"/*/results.md 2>/dev/null
