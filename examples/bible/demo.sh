#!/usr/bin/env bash
# The demo (README's main command, `make demo`): on CPU, build a small m4 subset of the
# Bible benchmark, train a tiny dense, a tiny MoE and a tiny SMoE transformer for the same
# number of updates, evaluate them and print the BLEU/chrF table side by side, the MoE
# model's expert load per layer and the SMoE model's requested capacity per target
# language, and end with a routing report of the MoE models side by side (figures:
# expert x language heat maps, load, I(expert; language); DIR/eval/routing_report/report.md).
# A second run reuses what is already built.
#
# Knobs (environment): DEMO_DIR (default runs/demo), DEMO_UPDATES (default 1000),
# DEMO_METHODS (default "dense moe smoe"; any of dense moe moec smoe).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo"
export PYTHON=${PYTHON:-$repo/.venv/bin/python}
dir=${DEMO_DIR:-runs/demo}
updates=${DEMO_UPDATES:-1000}
read -r -a methods <<< "${DEMO_METHODS:-dense moe smoe}"
data=$dir/data
non_dense=0
for m in "${methods[@]}"; do [ "$m" = dense ] || non_dense=$((non_dense + 1)); done
total=$(( 2 + ${#methods[@]} + non_dense + (non_dense > 0 ? 1 : 0) ))
start=$(date +%s)

step() { printf '\n=== [%s] %s (%ds elapsed)\n' "$1" "$2" "$(( $(date +%s) - start ))"; }

step 1/$total "data: m4 demo subset (de, ru, sw, tl <-> en)"
bash examples/bible/prepare.sh m4 "$data" --demo

n=1
models=()
for method in "${methods[@]}"; do
  n=$((n + 1))
  models+=("$method=$dir/$method/checkpoint_last.pt")
  step $n/$total "train tiny $method for $updates updates"
  done_mark=$dir/$method/.trained-$updates
  if [ -f "$done_mark" ]; then
    echo "already trained: $dir/$method/checkpoint_last.pt"
  else
    bash examples/bible/train.sh $method tiny "$data" "$dir/$method" \
      --max-update "$updates" --log-interval 100 --no-progress-bar
    touch "$done_mark"
  fi
done

step $((n + 1))/$total "evaluate ${methods[*]} (beam 4, CPU)"
bash examples/bible/evaluate.sh "$data" "$dir/eval" "${models[@]}" \
  -- --cpu --beam 4 --batch-size 64 --reuse --samples 3 --one-process
printf '\nSample verses, every model (%s/eval/samples.md):\n\n' "$dir"
tail -n +5 "$dir/eval/samples.md"
printf '%s\n' "These are pipeline-check models (tiny, $updates updates on CPU): their BLEU is near 1 and the gaps between them are noise. The comparison at a size that translates: make quality (CPU, 100 minutes) or make gpu-compare (one GPU); README, Translation quality."

for method in "${methods[@]}"; do
  [ "$method" = dense ] && continue
  n=$((n + 1))
  step $((n + 1))/$total "$method: expert load (and SMoE requested capacity) on the test set"
  "$PYTHON" scripts/expert_load.py --path "$dir/$method/checkpoint_last.pt" --data "$data/bin" \
    --split test --cpu --json "$dir/eval/expert_load_$method.json" 2>&1 \
    | grep -v -e tensorboardX -e Warning -e _canonical_mask -e "super().__init__"
done

report_paths=()
for method in "${methods[@]}"; do
  [ "$method" = dense ] || report_paths+=(--path "$dir/$method/checkpoint_last.pt" --label "$method")
done
if [ "${#report_paths[@]}" -gt 0 ]; then
  n=$((n + 1))
  step $((n + 1))/$total "routing report of the MoE models, side by side (test set)"
  "$PYTHON" scripts/routing_report.py "${report_paths[@]}" --data "$data/bin" --split test \
    --cpu --out "$dir/eval/routing_report" 2>&1 \
    | grep -v -e tensorboardX -e Warning -e _canonical_mask -e "super().__init__"
fi

printf '\ndemo finished in %ds; results: %s/eval/results.md\n' "$(( $(date +%s) - start ))" "$dir"
if [ "${#report_paths[@]}" -gt 0 ]; then
  printf 'routing report (figures): %s/eval/routing_report/report.md\n' "$dir"
fi
