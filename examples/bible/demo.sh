#!/usr/bin/env bash
# The demo (README's main command, `make demo`): on CPU, build a small m4 subset of the
# Bible benchmark, train a tiny dense and a tiny MoE transformer for the same number of
# updates, evaluate both and print the BLEU/chrF table side by side and the MoE model's
# expert load per layer. A second run reuses what is already built.
#
# Knobs (environment): DEMO_DIR (default runs/demo), DEMO_UPDATES (default 1000).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
export PYTHON=${PYTHON:-$repo/.venv/bin/python}
dir=${DEMO_DIR:-runs/demo}
updates=${DEMO_UPDATES:-1000}
data=$dir/data
start=$(date +%s)

step() { printf '\n=== [%s] %s (%ds elapsed)\n' "$1" "$2" "$(( $(date +%s) - start ))"; }

step 1/5 "data: m4 demo subset (de, ru, sw, tl <-> en)"
bash examples/bible/prepare.sh m4 "$data" --demo

for method in dense moe; do
  n=$([ $method = dense ] && echo 2 || echo 3)
  step $n/5 "train tiny $method for $updates updates"
  done_mark=$dir/$method/.trained-$updates
  if [ -f "$done_mark" ]; then
    echo "already trained: $dir/$method/checkpoint_last.pt"
  else
    bash examples/bible/train.sh $method tiny "$data" "$dir/$method" \
      --max-update "$updates" --log-interval 100 --no-progress-bar
    touch "$done_mark"
  fi
done

step 4/5 "evaluate both (beam 4, CPU)"
bash examples/bible/evaluate.sh "$data" "$dir/eval" \
  dense="$dir/dense/checkpoint_last.pt" moe="$dir/moe/checkpoint_last.pt" \
  -- --cpu --beam 4 --batch-size 64 --reuse

step 5/5 "MoE expert load on the test set"
"$PYTHON" scripts/expert_load.py --path "$dir/moe/checkpoint_last.pt" --data "$data/bin" \
  --split test --cpu --json "$dir/eval/expert_load.json" 2>&1 \
  | grep -v -e tensorboardX -e Warning -e _canonical_mask -e "super().__init__"

printf '\ndemo finished in %ds; results: %s/eval/results.md\n' "$(( $(date +%s) - start ))" "$dir"
