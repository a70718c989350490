#!/usr/bin/env bash
# Decode before/after on one GPU, in one session: generate.py run with the previous code, then with
# this checkout, then compare_generate.py.
#   OLD=<PYTHONPATH of the previous code> NEW=<PYTHONPATH of this code> bash benchmarks/decode_before_after.sh OUT_DIR [BATCHES]
set -u
out=$1; batches=${2:-1,64,256}
cd "$(dirname "$0")"
args="--batch $batches --skip-baselines --new-tokens 256"
PYTHONPATH=$OLD timeout 170 python3 generate.py $args --no-breakdown --json "$out/before.json" --tokens "$out/before.pt" > "$out/before.txt" 2>&1
echo "before: rc $?"; tail -n 3 "$out/before.txt"
PYTHONPATH=$NEW timeout 190 python3 generate.py $args --json "$out/after.json" --tokens "$out/after.pt" > "$out/after.txt" 2>&1
echo "after: rc $?"
PYTHONPATH=$NEW python3 compare_generate.py "$out/before.json" "$out/after.json" --tokens "$out/before.pt" "$out/after.pt"
grep -A 20 "Decode step breakdown" "$out/after.txt"
