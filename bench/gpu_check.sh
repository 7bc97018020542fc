#!/usr/bin/env bash
# GPU check for mg, under 5 minutes on one H200. For a session that is lent a GPU machine
# with a fresh copy of the repo, where torch is already installed. It installs nothing: the
# repo goes on PYTHONPATH (`pip install -e . --no-deps` only if that somehow is not enough).
#
#   1. bench/speed.py --device cuda --quick: images/s of template vs plain training steps
#      (2 x WRN-28-5 members and the grown WRN-28-10, bf16 autocast, channels_last), folded
#      eval vs plain, joint vs sequential members, growth time, whole `mg train` template
#      vs plain.
#   2. `mg train` with train.compile=true vs without: 2 epochs each, epoch 2's images/s
#      (epoch 1 pays for compilation).
#
# Results: JSON in $OUT if set, else bench/results/; tables and a summary on stdout.
#   bash bench/gpu_check.sh                 # DEVICE=cpu SKIP_COMPILE=1 for a dry run on CPU
set -uo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
DEVICE=${DEVICE:-cuda}
BUDGET=${BUDGET:-285}  # seconds for the whole script
DEST=${OUT:-bench/results}
mkdir -p "$DEST"
if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
elif command -v python >/dev/null; then PY=python
else PY=python3; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PY" -c 'import torch' || { echo "gpu_check: 'import torch' fails with $PY" >&2; exit 1; }
"$PY" -c 'import typer, pydantic' || { echo "gpu_check: typer/pydantic missing" >&2; exit 1; }
"$PY" -c 'import mg, mg_lib.train' 2>/dev/null || "$PY" -m pip install -q -e . --no-deps
"$PY" - "$DEVICE" <<'EOF' || exit 1
import sys, torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, "
      + (torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"))
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device (DEVICE=cpu for a dry run)")
EOF

fail=0
echo "## 1. bench/speed.py --device $DEVICE --quick"
timeout 170 "$PY" bench/speed.py --device "$DEVICE" --quick --out "$DEST/speed_$DEVICE.json" \
    || { echo "gpu_check: speed.py failed or timed out" >&2; fail=1; }

if [ "${SKIP_COMPILE:-0}" != 1 ]; then
    echo "## 2. mg train, train.compile = true vs false (2 epochs, epoch 2 images/s)"
    tmp=$(mktemp -d)
    size=(--set data.synthetic_images=11520 --set model.depth=28 --set model.width=5)
    [ "$DEVICE" = cpu ] && size=(--set data.synthetic_images=320 --set model.depth=10
                                 --set model.width=1 --set data.batch_size=32)
    sets=(--set 'data.dataset="synthetic"' --set data.val_fraction=0.1 "${size[@]}"
          --set 'train.members="joint"' --set train.epochs=2 --device "$DEVICE")
    for c in false true; do
        left=$((BUDGET - (SECONDS - start)))  # the whole script stays under BUDGET seconds
        if [ "$left" -lt 20 ]; then echo "gpu_check: no time left for compile=$c" >&2; fail=1
            continue; fi
        timeout "$left" "$PY" -m mg train recipes/small.toml --out "$tmp/compile-$c" \
            --set "train.compile=$c" "${sets[@]}" >/dev/null \
            || { echo "gpu_check: mg train (compile=$c) failed or timed out" >&2; fail=1; }
    done
    "$PY" - "$tmp" "$DEST/gpu_compile.json" <<'EOF' || fail=1
import json, sys
from pathlib import Path
tmp, out = Path(sys.argv[1]), Path(sys.argv[2])
res = {}
for c in ("false", "true"):
    log = tmp / f"compile-{c}" / "metrics.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    res[f"compile={c}"] = [round(x["images_per_s"]) for x in lines]
out.write_text(json.dumps({"images_per_s_by_epoch": res}, indent=1) + "\n")
print("mg train images/s per epoch (joint members, synthetic data):", res)
EOF
    rm -rf "$tmp"
fi
echo "gpu_check: done in $((SECONDS - start)) s; JSON in $DEST (exit $fail)"
exit $fail
