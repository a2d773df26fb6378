#!/usr/bin/env bash
# The test suite: README's test command, and what .ci/run runs first. Sets up .venv (scripts/setup.sh),
# then runs pytest as one process per core (at most 8), each on every N-th selected test (pytest --shard
# i/N, tests/conftest.py). The tests spend most of their time in Inductor's and Triton's compilers, which
# run single-threaded in the process that compiles, so N processes of one thread each take about 1/N of
# the time one process takes. Arguments go to every pytest process.
#
#   bash scripts/test.sh                        # the default selection (all but the real-model tests)
#   bash scripts/test.sh -m real_model          # the tests that load the real SmolLM2
#   XQ_TEST_PROCESSES=1 bash scripts/test.sh    # one ordinary pytest process (its output live, --lf works)
#
# The first shard's output is shown live, the others' once all have finished. Exits with the first
# failing shard's status (a shard left without tests by a narrow -k is not a failure unless all are).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

processes=${XQ_TEST_PROCESSES:-$(nproc)}
processes=$(( processes < 1 ? 1 : processes > 8 ? 8 : processes ))
if (( processes == 1 )); then
    exec .venv/bin/python -m pytest -q "$@"
fi

logs=$(mktemp -d)
trap 'kill $(jobs -p) 2> /dev/null || true; rm -rf "$logs"' EXIT
pids=()
for ((i = 0; i < processes; i++)); do
    # no cache provider: the shards would overwrite each other's record of the last failures
    run=(env OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q -p no:cacheprovider --shard "$i/$processes" "$@")
    if (( i == 0 )); then
        "${run[@]}" > >(tee "$logs/$i.log") 2>&1 &
    else
        "${run[@]}" > "$logs/$i.log" 2>&1 &
    fi
    pids+=("$!")
done

status=0 empty=0
for ((i = 0; i < processes; i++)); do
    shard_status=0
    wait "${pids[$i]}" || shard_status=$?
    if (( i > 0 )); then
        echo "== tests, shard $i/$processes"
        cat "$logs/$i.log"
    fi
    if (( shard_status == 5 )); then  # pytest: no tests collected (or all deselected) in this shard
        empty=$((empty + 1))
    elif (( shard_status != 0 && status == 0 )); then
        status=$shard_status
    fi
done
if (( status == 0 && empty == processes )); then
    status=5
fi
echo "== tests: $processes shards, $([ $status = 0 ] && echo passed || echo "FAILED (status $status)")"
exit $status
