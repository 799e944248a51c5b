#!/usr/bin/env bash
# The human-in-the-loop ablations of benchmarks/results/TRAINING.md, run side by side on one device
# (a GPU takes them all at once; budgets in steps, so that the device's speed does not change them).
#   bash benchmarks/hitl_sweep.sh ISBI_FOLDER OUT_FOLDER [STEPS] [DEVICE]
set -uo pipefail
DATA=$1; OUT=$2; STEPS=${3:-240}; DEVICE=${4:-auto}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export OMP_NUM_THREADS=2 PYTHONUNBUFFERED=1
run() {  # name, seed, then human_in_the_loop.py options
    local name=$1 seed=$2; shift 2
    $PY benchmarks/human_in_the_loop.py --data "$DATA" --steps "$STEPS" --device "$DEVICE" --seed "$seed" \
        --start-cache "$OUT/start_seed$seed.pt" --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1
}
# the start models first (one per seed), with the reference runs
run reference_seed0 0 --mode none & run reference_seed1 1 --mode none & wait
run fixed_noreplay 0 --no-replay --no-reference &
run fixed_replay 0 --no-reference &
run guided_noreplay 0 --guided --no-replay --no-reference &
run guided_replay 0 --guided --no-reference &
run guided_replay25 0 --guided --replay-share 0.25 --no-reference &
run guided_replay75 0 --guided --replay-share 0.75 --no-reference &
run guided_replay_anchor0 0 --guided --anchor-weight 0 --no-reference &
run guided_replay_lr3e-3 0 --guided --learning-rate 3e-3 --no-reference &
run control_seed0 0 --mode none --control --no-reference &
run guided_noreplay_seed1 1 --guided --no-replay --no-reference &
run guided_replay_seed1 1 --guided --no-reference &
run control_seed1 1 --mode none --control --no-reference &
wait
$PY - "$OUT" <<'PYEOF'
import json, sys, pathlib
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    if path.name.startswith("start_"):
        continue
    r = json.loads(path.read_text())
    runs = {k: (v["membrane_dice"], v.get("membrane_dice_gain_over_start")) for k, v in r["runs"].items()}
    print(path.stem, "start", r["start"]["membrane_dice"], "ref", r.get("reference", {}).get("membrane_dice"),
          "slices", r.get("corrected_slices"), runs)
PYEOF
