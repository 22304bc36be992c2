#!/usr/bin/env bash
# The tuning sweeps of docs/tuning.md ("Batch size, parallel and pool size"), then their plots.
#
# Run from anywhere, alone on the machine (the figures are only as quiet as the machine is):
#
#     benchmarks/run_tuning_sweeps.sh
#
# Writes benchmarks/results/tuning.jsonl (an earlier file is kept as tuning.jsonl.prev) and
# docs/images/tuning-<route>-<setting>.png. Estimated at about 18 minutes on the project's 2-core machine
# from docs/benchmarks.md (memory -> PostgreSQL ~330k rows/s, memory -> S3 ~1M rows/s)
# plus ~25 s of Prefect start-up per invocation. The environment can shrink it for a quick check:
#
#     OUT=/tmp/t.jsonl IMAGES=/tmp/t PG_ROWS=20000 S3_ROWS=20000 READS=1000 REPEAT=1 WARMUP_ROWS=5000 \
#         benchmarks/run_tuning_sweeps.sh
#
# A failed invocation is reported and the others still run; the exit code is 1 if any failed.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-benchmarks/results/tuning.jsonl}
IMAGES=${IMAGES:-docs/images}
PG_ROWS=${PG_ROWS:-1000000}
S3_ROWS=${S3_ROWS:-1000000}
READS=${READS:-10000}
REPEAT=${REPEAT:-3}
WARMUP_ROWS=${WARMUP_ROWS:-65536}

mkdir -p "$(dirname "$OUT")"
if [ -s "$OUT" ]; then
    mv "$OUT" "$OUT.prev"
fi

failed=()
bench() {
    echo "== python -m benchmarks $*" >&2
    # The JSON lines go to $OUT (--out); stdout would repeat them.
    if ! "$PY" -m benchmarks "$@" --repeat "$REPEAT" --warmup-rows "$WARMUP_ROWS" --out "$OUT" >/dev/null; then
        failed+=("$*")
    fi
}
started=$SECONDS

# PostgreSQL writes: batch size, buffer size and partitions in flight, one at a time (parallel 2 otherwise).
bench memory-to-postgres --rows "$PG_ROWS" \
    --vary batch_size=8192,32768,65536,131072 --vary buffer_size=1,4,16 --vary parallel=1,2,4,8
# PostgreSQL pool size with 4 partitions in flight. A replace write holds one pooled connection for its
# run lock, so it refuses max_connections=1.
bench memory-to-postgres --rows "$PG_ROWS" --parallel 4 --vary postgres.max_connections=2,4,8
# PostgreSQL reads: one key-range partition per parallel slot.
bench postgres-to-memory --rows "$PG_ROWS" --vary parallel=1,2,4
# The guide's "5-10x from pooling": single-record reads through the pooled store against a connection per read.
bench records-pooling --rows "$READS" --parallel 8 --vary postgres.max_connections=1,2,4,8 --vary parallel=1,2,4,8
# S3 writes: batch size, buffer size and partitions in flight (parallel 2 otherwise).
bench memory-to-s3 --rows "$S3_ROWS" \
    --vary batch_size=8192,32768,65536,131072 --vary buffer_size=1,4,16 --vary parallel=1,2,4,8
# S3 client pool and transfer concurrency with 4 partitions in flight, writing and reading.
bench memory-to-s3 s3-to-memory --rows "$S3_ROWS" --parallel 4 \
    --vary s3.max_connections=1,2,4,10 --vary s3.max_concurrency=1,2,4,10
# S3 reads by partitions in flight (the input is written at each point with that parallel: P objects).
bench s3-to-memory --rows "$S3_ROWS" --vary parallel=1,2,4

echo "== plots into $IMAGES" >&2
"$PY" -m benchmarks.plot_sweep "$OUT" "$IMAGES" || failed+=("plot_sweep")
echo "== done in $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s; lines in $OUT" >&2
if [ ${#failed[@]} -gt 0 ]; then
    printf 'FAILED: %s\n' "${failed[@]}" >&2
    exit 1
fi
