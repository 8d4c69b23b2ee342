#!/usr/bin/env bash
# Train one method on a benchmark built by prepare.sh.
#
#   examples/bible/train.sh METHOD SIZE DATA SAVE_DIR [extra fairseq-train flags ...]
#
#   METHOD  dense | moe | moec (cosine router, expert clusters) | smoe (stratified experts)
#           | moe+eom, moe+cmr (moe with NLLB-MoE's expert output masking / conditional routing)
#   SIZE    tiny (CPU: 2+2 layers, d=64, 4 experts) | small (CPU: 3+3 layers, d=256, 4 experts)
#           | base (one GPU: transformer-base, 8 experts)
#   DATA    output folder of prepare.sh (holds bin/ and manifest.json)
#
# The multilingual setup follows the SMoE authors' recipe: translation_multi_simple_epoch
# with --encoder-langtok tgt --decoder-langtok, temperature sampling over directions,
# MoE in every other FFN (--moe-freq 2) and gate-loss weight 0.01. Extra flags override
# the defaults below (e.g. --max-update 2000 --lr 1e-3). Re-running with the same SAVE_DIR
# resumes from checkpoint_last.pt.
set -euo pipefail

if [ $# -lt 4 ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
method=$1 size=$2 data=$3 save_dir=$4
shift 4
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-python}

if [ ! -f "$data/manifest.json" ] || [ ! -d "$data/bin" ]; then
  echo "train.sh: error: DATA '$data' has no manifest.json and bin/ (run examples/bible/prepare.sh first)" >&2
  exit 2
fi
lang_pairs=$("$python" -c 'import json,sys; print(json.load(open(sys.argv[1]))["lang_pairs"])' "$data/manifest.json")

case "$size" in
  tiny)
    dims=(--encoder-embed-dim 64 --encoder-ffn-embed-dim 128 --encoder-layers 2 --encoder-attention-heads 4
          --decoder-embed-dim 64 --decoder-ffn-embed-dim 128 --decoder-layers 2 --decoder-attention-heads 4)
    size_flags=(--cpu --max-tokens 4096 --lr 2e-3 --warmup-updates 200 --max-update 600
                --dropout 0.1 --num-workers 0)
    experts=4 ;;
  small)
    dims=(--encoder-embed-dim 256 --encoder-ffn-embed-dim 1024 --encoder-layers 3 --encoder-attention-heads 4
          --decoder-embed-dim 256 --decoder-ffn-embed-dim 1024 --decoder-layers 3 --decoder-attention-heads 4)
    size_flags=(--cpu --max-tokens 4096 --lr 1e-3 --warmup-updates 400 --max-update 20000
                --dropout 0.1 --num-workers 0)
    experts=4 ;;
  base)
    dims=(--encoder-embed-dim 512 --encoder-ffn-embed-dim 2048 --encoder-layers 6 --encoder-attention-heads 8
          --decoder-embed-dim 512 --decoder-ffn-embed-dim 2048 --decoder-layers 6 --decoder-attention-heads 8)
    size_flags=(--fp16 --max-tokens 8192 --lr 7e-4 --warmup-updates 4000 --max-update 50000
                --dropout 0.1 --num-workers 2)
    experts=8 ;;
  *) echo "train.sh: error: SIZE must be tiny, small or base, got '$size'" >&2; exit 2 ;;
esac

case "$method" in
  dense) arch=(--arch transformer) ;;
  moe|moe+eom|moe+cmr)
         arch=(--arch moe_transformer --moe-expert-count "$experts" --moe-freq 2 --moe-top-k 2
               --moe-capacity-factor 1.25 --moe-eval-capacity-token-fraction 1.0)
         # NLLB-MoE (arXiv 2207.04672): EOM 0.2 as their FLORES-200 MoE recipe; CMR budget
         # weight 0.1 and share 0.8 as their sweep script's defaults, gate dropout 0.2.
         case "$method" in
           moe+eom) arch+=(--moe-eom 0.2) ;;
           moe+cmr) arch+=(--moe-cmr --cmr-gate-drop 0.2 --cmr-gate-loss-wt 0.1 --cmr-gate-loss-p 0.8) ;;
         esac ;;
  # The method presets (models/moec_transformer.py, models/smoe_transformer.py) set the
  # authors' routing flags; the sizes above override the presets' sizes.
  # small takes the tiny presets' routing (2 clusters; strata 2,2), with its own dims.
  moec)  arch=(--arch "moec_transformer_${size/small/tiny}" --moe-eval-capacity-token-fraction 1.0) ;;
  smoe)  arch=(--arch "smoe_transformer_${size/small/tiny}" --moe-eval-capacity-token-fraction 1.0) ;;
  *) echo "train.sh: error: METHOD must be dense, moe, moec, smoe, moe+eom or moe+cmr, got '$method'" >&2; exit 2 ;;
esac

# --bf16 among the extra flags replaces base's --fp16 (bf16 is the fast path on
# Hopper GPUs: torch's grouped expert GEMM has a bf16 kernel, fp16 a per-expert loop).
for flag in "$@"; do
  if [ "$flag" = "--bf16" ]; then
    kept=()
    for f in "${size_flags[@]}"; do [ "$f" = "--fp16" ] || kept+=("$f"); done
    size_flags=("${kept[@]}")
  fi
done

mkdir -p "$save_dir"
exec "$python" -m fairseq_cli.train "$data/bin" \
  --user-dir "$repo/moe_fairseq" \
  --task translation_multi_simple_epoch --lang-pairs "$lang_pairs" --lang-dict "$data/bin/langs.txt" \
  --encoder-langtok tgt --decoder-langtok \
  --sampling-method temperature --sampling-temperature 5 \
  "${arch[@]}" "${dims[@]}" --share-all-embeddings \
  --criterion moe_label_smoothed_cross_entropy --label-smoothing 0.1 --moe-gate-loss-wt 0.01 \
  --optimizer adam --adam-betas '(0.9, 0.98)' --lr-scheduler inverse_sqrt --clip-norm 1.0 \
  --attention-dropout 0.1 --weight-decay 0.0001 \
  --seed 1 --log-format simple --log-interval 50 \
  --save-dir "$save_dir" --no-epoch-checkpoints --tensorboard-logdir "$save_dir/tb" \
  "${size_flags[@]}" "$@"
