#!/usr/bin/env bash
# A multi-seed study on the embedded model: one single-threaded demo process per seed, side by side, then one
# combined table. Usage: bash scripts/study.sh OUT_DIR "0,1,2" "sft,selfdistill,..." [more demo flags]
# Logs: OUT_DIR/seed-<s>.log. Seeds that finished are kept if another fails; rerun the failed one and combine again
# with `trl-selfdistill demo --combine OUT_DIR/seed-* --output_dir OUT_DIR`.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$1 seeds=$2 methods=$3
shift 3
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=1
mkdir -p "$out"
pids=()
for seed in ${seeds//,/ }; do
  .venv/bin/trl-selfdistill demo --seed "$seed" --methods "$methods" --output_dir "$out/seed-$seed" "$@" \
    > "$out/seed-$seed.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
dirs=()
for seed in ${seeds//,/ }; do [ -f "$out/seed-$seed/seed_results.json" ] && dirs+=("$out/seed-$seed"); done
.venv/bin/trl-selfdistill demo --combine "${dirs[@]}" --output_dir "$out"
exit $status
