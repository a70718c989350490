#!/usr/bin/env bash
# Decode before/after on one GPU, in one session: generate.py run with the previous code, then with
# this checkout (and once at batch 1 without the fused kernel), then compare_generate.py.
#   OLD=<PYTHONPATH of the previous code> NEW=<PYTHONPATH of this code> bash benchmarks/decode_before_after.sh OUT_DIR [BATCHES]
set -u
out=$1; batches=${2:-1,64,256}
cd "$(dirname "$0")"
args="--batch $batches --skip-baselines --new-tokens 256"
PYTHONPATH=$OLD timeout 170 python3 generate.py $args --no-breakdown --json "$out/before.json" --tokens "$out/before.pt" > "$out/before.txt" 2>&1
echo "before: rc $?"; tail -n 3 "$out/before.txt"
PYTHONPATH=$NEW timeout 190 python3 generate.py $args --json "$out/after.json" --tokens "$out/after.pt" > "$out/after.txt" 2>&1
echo "after: rc $?"
[ -n "${SKIP_UNFUSED:-}" ] || PYTHONPATH=$NEW timeout 80 python3 generate.py --batch 1 --skip-baselines --new-tokens 256 --no-breakdown --fused off --json "$out/unfused.json" > "$out/unfused.txt" 2>&1
echo "after, unfused b1: rc $?"
PYTHONPATH=$NEW python3 compare_generate.py "$out/before.json" "$out/after.json" --tokens "$out/before.pt" "$out/after.pt"
[ -n "${SKIP_UNFUSED:-}" ] || PYTHONPATH=$NEW python3 compare_generate.py "$out/before.json" "$out/unfused.json"
grep "fused vs unfused" "$out/after.txt"
grep -A 20 "Decode step breakdown" "$out/after.txt"
