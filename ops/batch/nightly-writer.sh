#!/usr/bin/env bash
# Nightly batch job: run one day's writer inputs through the fleet at batch priority.
#
#   nightly-writer.sh [YYYY-MM-DD]        # default: today (UTC)
#
# Reads   $FLEET_BATCH_DIR/in/writer-<date>.jsonl          (one writer input per line)
# Writes  $FLEET_BATCH_DIR/out/writer-<date>.results.jsonl (one result line per input line)
#
# Resumable: run it again with the same date after a stop, a crash or a deploy, and it skips
# the lines already written and picks up the runs still in flight; no input ever runs twice
# (idempotency keys scoped by --batch-id writer-<date>). SIGINT/SIGTERM stop it cleanly.
# Exit codes: 0 every line has a result (failed runs are reported in the results, not here),
# 130 interrupted, 1 the fleet could not be reached, 2 bad arguments.
#
# Settings come from FLEET_* variables (FLEET_REDIS_URL, ...), as for every fleet process.
set -euo pipefail

date_=${1:-$(date -u +%F)}
if [[ ! $date_ =~ ^[0-9]{4}-[0-9]{2}-[0-9]{2}$ ]]; then
  echo "usage: $0 [YYYY-MM-DD]" >&2
  exit 2
fi
batch_dir=${FLEET_BATCH_DIR:-/var/lib/fleet/batch}
input="$batch_dir/in/writer-$date_.jsonl"
results="$batch_dir/out/writer-$date_.results.jsonl"

if [[ ! -f $input ]]; then
  echo "nightly-writer: no input for $date_ ($input); nothing to do"
  exit 0
fi
mkdir -p "$(dirname "$results")"

args=(batch run "$input" --agent writer --out "$results"
      --batch-id "writer-$date_"
      --max-in-flight "${FLEET_BATCH_MAX_IN_FLIGHT:-64}")
# Per-run deadline in seconds; unset: FLEET_BATCH_DEADLINE_S (a day).
if [[ -n ${FLEET_BATCH_RUN_DEADLINE_S:-} ]]; then
  args+=(--deadline "$FLEET_BATCH_RUN_DEADLINE_S")
fi

echo "nightly-writer: $input -> $results"
# exec: the scheduler's stop signal reaches fleet itself, which stops between two lines.
exec "${FLEET_BIN:-fleet}" "${args[@]}"
