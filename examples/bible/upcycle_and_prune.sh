#!/usr/bin/env bash
# From dense to MoE and back, on a prepare_bible.py data folder (CPU, tiny models):
#  1. continue the dense model for UPDATES more updates (the baseline);
#  2. upcycle it into an MoE model (4 experts, top-2, every 2nd FFN; the same MoE flags
#     train.sh uses) and check that it scores exactly as the dense model before training;
#  3. fine-tune the upcycled model for the same UPDATES;
#  4. prune the fine-tuned MoE to KEEP experts per layer for one DIRECTION;
#  5. score everything (BLEU/chrF; the pruned model on its direction only).
#
#   examples/bible/upcycle_and_prune.sh DATA DENSE_CKPT OUT [UPDATES=500] [DIRECTION=en-de] [KEEP=2]
#   e.g. after make demo: examples/bible/upcycle_and_prune.sh runs/demo/data \
#            runs/demo/dense/checkpoint_last.pt runs/upcycle
# A rerun reuses the models and hypotheses OUT holds: use a new OUT for other settings.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n 2,13p "$0" >&2
  exit 2
fi
data=$1 dense=$2 out=$3 updates=${4:-500} direction=${5:-en-de} keep=${6:-2}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHON=${PYTHON:-$repo/.venv/bin/python}
moe_flags=(--arch moe_transformer --moe-expert-count 4 --moe-freq 2 --moe-top-k 2
           --moe-capacity-factor 1.25 --moe-eval-capacity-token-fraction 1.0)
train=(--max-update "$updates" --log-interval 100 --no-progress-bar)
quiet() { grep -v -e tensorboardX -e Warning -e _canonical_mask -e "super().__init__" || true; }
# finetune METHOD NAME INIT: train.sh METHOD tiny from INIT for UPDATES into OUT/NAME (kept if
# already there), its log in OUT/NAME.log
finetune() {
  if [ ! -f "$out/$2/checkpoint_last.pt" ]; then
    bash "$repo/examples/bible/train.sh" "$1" tiny "$data" "$out/$2" "${train[@]}" \
      --finetune-from-model "$3" > "$out/$2.log" 2>&1 || { tail -20 "$out/$2.log"; exit 1; }
  fi
  grep -s "done training" "$out/$2.log" || true
}
mkdir -p "$out"

echo "=== 1. dense: $updates more updates (--finetune-from-model: new optimizer and schedule)"
finetune dense dense_cont "$dense"

echo "=== 2. upcycle into an MoE model"
"$PYTHON" "$repo/scripts/upcycle.py" "$dense" "${moe_flags[@]}" --out "$out/upcycled.pt" 2>&1 | quiet

echo "=== 3. fine-tune the upcycled MoE model for $updates updates"
finetune moe moe_up "$out/upcycled.pt"

echo "=== 4. prune the fine-tuned MoE model to $keep experts per layer for $direction"
"$PYTHON" "$repo/scripts/prune_experts.py" "$out/moe_up/checkpoint_last.pt" --data "$data/bin" \
  --lang-pairs "$direction" --split valid --keep "$keep" \
  --out "$out/moe_up_${direction}_${keep}experts.pt" 2>&1 | quiet

echo "=== 5. score (beam 4, CPU)"
bash "$repo/examples/bible/evaluate.sh" "$data" "$out/eval" dense="$dense" \
  upcycled_untrained="$out/upcycled.pt" dense_cont="$out/dense_cont/checkpoint_last.pt" \
  moe_upcycled="$out/moe_up/checkpoint_last.pt" -- --cpu --beam 4 --batch-size 64 --reuse --quiet
bash "$repo/examples/bible/evaluate.sh" "$data" "$out/eval_$direction" \
  moe_upcycled="$out/moe_up/checkpoint_last.pt" \
  "pruned_${keep}experts=$out/moe_up_${direction}_${keep}experts.pt" \
  -- --cpu --beam 4 --batch-size 64 --reuse --quiet --directions "$direction"
ls -l "$out/moe_up/checkpoint_last.pt" "$out/moe_up_${direction}_${keep}experts.pt"
echo "results: $out/eval/results.md, $out/eval_$direction/results.md"
