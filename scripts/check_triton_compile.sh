#!/usr/bin/env bash
# The compile check (benchmarks/compile_report.py --check: sm_90, and sm_89 for the GPUs with 99 KB of shared
# memory per program and mma.sync) under the supported Triton releases other than the one CI pins (3.9 in
# .venv, checked by tests/test_compile_report.py).
#
#   bash scripts/check_triton_compile.sh            # 3.6.0 and 3.7.0: torch 2.11's and 2.12's Triton
#   bash scripts/check_triton_compile.sh 3.6.0      # only these
#
# Whether a dot keeps its MMAs in flight, spills or compiles at all is decided by Triton's passes, which
# change between releases (3.6's thread-locality pass, for one, asserted on a softmax loop that 3.9
# compiles). Each release is installed alone (no dependencies) under .venv/triton/VERSION and put first on
# PYTHONPATH: torch and xq_compile come from .venv, only the compiler differs. Nothing runs on a GPU.
# Prints one line per release and check; exits 1 if any failed.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x .venv/bin/python ]; then
    echo "no .venv: run scripts/setup.sh first" >&2
    exit 2
fi
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(3.6.0 3.7.0)

# the default decode step (S = 1) at every width, 16 query tokens, and the vLLM plugin's paged step (also
# a Gemma layer's: window, soft cap, key norm, in the 256-feature tile of the GQA shape, where the
# epilogue is tightest)
CHECKS=(
    "--bits 2 3 4 8"
    "--queries 16 --bits 4 --no-dequant-project --no-gluon"
    "--paged --bits 3 4"
    "--paged --gemma --bits 4 --shape gqa"
    "--arch 89 --bits 2 3 4 8"
)

status=0
for version in "${VERSIONS[@]}"; do
    dir=.venv/triton/$version
    mkdir -p .venv/triton
    if [ ! -d "$dir/triton" ]; then
        if ! .venv/bin/python -m pip install -q --no-deps --target "$dir" "triton==$version" > "$dir.log" 2>&1; then
            grep -v "is ignored" "$dir.log" >&2
            status=1
            continue
        fi
    fi
    for check in "${CHECKS[@]}"; do
        log=$dir/compile_report.$(echo "$check" | tr -c 'a-z0-9\n' '_').log
        # shellcheck disable=SC2086
        if PYTHONPATH="$dir:." .venv/bin/python benchmarks/compile_report.py --check $check > "$log" 2>&1 &&
            grep -q "^triton $version," "$log"; then
            echo "triton $version, compile_report.py --check $check: ok"
        else
            echo "triton $version, compile_report.py --check $check: FAILED" >&2
            grep -v "warn" "$log" | tail -30 >&2
            status=1
        fi
    done
done
exit $status
