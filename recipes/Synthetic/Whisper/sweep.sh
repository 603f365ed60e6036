#!/bin/bash
# The sweep behind the choice of the tiny Whisper default (docs/results.md): eight
# variants of hparams/whisper_tiny.yaml trained side by side on one GPU, each to its own folder
# under $SWEEP_OUT, then one line per run with its test WER/CER.
#
#     cd recipes/Synthetic/Whisper && bash sweep.sh            # needs a CUDA GPU (H100: ~3 min)
#     DEVICE=cpu bash sweep.sh                                  # works, but takes hours
set -u
DEVICE=${DEVICE:-cuda:0}
SWEEP_OUT=${SWEEP_OUT:-results/sweep}
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=2
# tiny_config (the tiny:whisper preset's values): d_model, encoder layers, decoder layers, ffn width, init std
cfg() { echo "{multilingual: True, bpe_vocab_size: 500, chunk_length: 4, num_mel_bins: 80," \
  "d_model: $1, encoder_layers: $2, decoder_layers: $3, encoder_attention_heads: 4," \
  "decoder_attention_heads: 4, encoder_ffn_dim: $4, decoder_ffn_dim: $4," \
  "max_target_positions: 64, init_std: $5, dropout: 0.1, attention_dropout: 0.0," \
  "activation_dropout: 0.0}"; }
run() {
  local name=$1; shift
  ( python train.py hparams/whisper_tiny.yaml --device="$DEVICE" \
      --output_folder="$SWEEP_OUT/$name" "$@" > "$SWEEP_OUT/$name.log" 2>&1
    echo "$name: $(grep -h '\[speechtune\] test' "$SWEEP_OUT/$name.log" | cut -d' ' -f2-6)" ) &
}
mkdir -p "$SWEEP_OUT"
L="--lr=0.002 --warmup_steps=100"
# d256, 4+2 layers, LR 1e-3 (the first default), with the HF init std and larger ones
run d256_i02_x20 --number_of_epochs=20 --lr=0.001 --warmup_steps=200 \
  --tiny_config="$(cfg 256 4 2 1024 0.02)"
run d256_i10_x8 --number_of_epochs=8 --lr=0.001 --warmup_steps=200 \
  --tiny_config="$(cfg 256 4 2 1024 0.1)"
# d128, 2+1 layers: init std, LR, depth, batch size
run d128_i05_x30 --number_of_epochs=30 $L --tiny_config="$(cfg 128 2 1 512 0.05)"
run d128_i10_x30 --number_of_epochs=30 $L --tiny_config="$(cfg 128 2 1 512 0.1)"
run d128_i02_lr3_x30 --number_of_epochs=30 --lr=0.003 --warmup_steps=100 \
  --tiny_config="$(cfg 128 2 1 512 0.02)"
run d128_enc3_i10_x30 --number_of_epochs=30 $L --tiny_config="$(cfg 128 3 1 512 0.1)"
run d128_dec2_i10_x30 --number_of_epochs=30 $L --tiny_config="$(cfg 128 2 2 512 0.1)"
run d128_i10_b20_x30 --number_of_epochs=30 $L --max_batch_seconds=20 \
  --tiny_config="$(cfg 128 2 1 512 0.1)"
wait
