#!/usr/bin/env bash
# Train the emoji model (#15) on a lent GPU machine in one call, from a bundle made here beforehand:
#
#   python -m dallecli.training.emoji_source --selection core --bundle build/gpu-bundle/emoji-src
#   python -m dallecli.training.emoji_judge --selection core --out build/gpu-bundle/emoji-judge
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#       -d build/gpu-bundle/wheels diffusers==0.42.1
#
# then, on the device (carry build/gpu-bundle): OUT="$OUT" bash scripts/emoji_gpu_run.sh [extra build_emoji options]
# The machine has torch, transformers and accelerate but no diffusers and no network; what comes back must be a few
# files of at most 16 MiB, so the results are packed into one archive split into 15 MiB parts (the log also comes
# back on its own, as it is written, in case the call is cut short):
#   cat emoji-run.tar.part-* | tar x     ->  model/ (the pipeline), compact/ (to go on), log.txt, curve.jsonl
set -euo pipefail
python=${PYTHON:-python3}  # the device's python3 holds torch
bundle=build/gpu-bundle
out=${OUT:-build/emoji-gpu-out}
work=${WORK:-/tmp/emoji-work}
mkdir -p "$out"
if ! "$python" -c "import diffusers" 2>/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$bundle"/wheels/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/src" PYTHONUNBUFFERED=1
staging=$(mktemp -d)
status=0
"$python" -m dallecli.training.build_emoji --cache "$bundle/emoji-src" --judge "$bundle/emoji-judge" \
    --work "$work" --compact "$staging/compact" --out "$staging/model" \
    --concepts core --images 200000 --ae-steps 6000 --ae-batch-size 64 --ae-channels 48 --latent-channels 8 \
    --batch-size 256 --learning-rate 1e-3 --steps 30000 --eval-every 2000 --save-every 2000 \
    --mixed-precision bf16 --time-limit 7 --pipeline-on-stop "$@" 2>&1 | tee "$staging/log.txt" "$out/log.txt" || status=$?  # the log comes back even if the call is cut
cp "$work/curve.jsonl" "$work"/*.png "$staging/" 2>/dev/null || true
tar cf - -C "$staging" . | split -b 15M - "$out/emoji-run.tar.part-"
ls -la "$out"
exit "$status"
