#!/usr/bin/env bash
# Item-feature extraction on one GPU, ready for a 10-minute window: the Qwen2-VL-2B shapes, then the 7B shapes, each
# under its own time limit (a shape that runs out is reported as missing, the other still runs), then one table.
# usage: bash bench/gpu_run.sh            (JSON to $OUT if set, else bench/results/; PYTHON=... picks the interpreter)
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(), '|', torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
for spec in 2b:230 7b:320; do
  shape=${spec%%:*}; limit=${spec##*:}
  echo "=== $shape (limit ${limit} s) ==="
  timeout --kill-after=10 "$limit" "$PY" bench/gpu_extract.py --shapes "$shape" --out "$DEST"
  rc=$?
  [ $rc -eq 0 ] || echo "=== $shape: exit $rc$( [ $rc -eq 124 ] && echo ' (time limit)') ==="
done
echo "=== summary ($DEST) ==="
"$PY" bench/gpu_extract.py --summary "$DEST"
