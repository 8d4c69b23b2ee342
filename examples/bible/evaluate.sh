#!/usr/bin/env bash
# Decode and score every direction of a benchmark, one column per model.
#
#   examples/bible/evaluate.sh DATA OUT_DIR NAME=CHECKPOINT [NAME=CHECKPOINT ...] [-- extra evaluate.py flags]
#
# Writes OUT_DIR/results.md and results.json (BLEU and chrF per direction, single- and
# multi-reference for xx->en, averages per group and resource level). Add --cpu after --
# to decode on the CPU.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
data=$1 out=$2
shift 2
names=() ckpts=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
  case "$1" in
    *=*) names+=("${1%%=*}"); ckpts+=("${1#*=}") ;;
    *) echo "evaluate.sh: error: expected NAME=CHECKPOINT, got '$1'" >&2; exit 2 ;;
  esac
  shift
done
[ "${1:-}" = "--" ] && shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
exec "${PYTHON:-python}" "$repo/scripts/evaluate.py" --data "$data" --output-dir "$out" \
  --checkpoints "${ckpts[@]}" --names "${names[@]}" "$@"
