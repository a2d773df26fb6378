#!/usr/bin/env bash
# One prepared check for a CUDA machine (written for one H200; torch 2.11, triton 3.6, transformers 5.17,
# no internet). Run from the repository root:
#
#     OUT=gpu_results bash scripts/gpu_check.sh          # everything lands under $OUT (default ./gpu_results)
#
# The GPU machine has no internet: to compare with quanto there, fetch its wheels first (ignored by git,
# carry the folder to the machine):  pip download --no-deps -d .gpu_wheels optimum-quanto==0.2.7 ninja==1.13.2
#
# Steps, in priority order, each under its own timeout and all under one total budget (BUDGET_S,
# default 290 s, so that a 5-minute slot runs the most important ones; every step takes ~10 min with
# compilation, BUDGET_S=600); a failing, timed-out or skipped step is recorded in $OUT/summary.txt:
#   install     pip install --no-deps --no-build-isolation -e .  (fallback: PYTHONPATH=. plus a temporary
#               symlink xq_compile/passes -> ../passes, the mapping the install would provide); wheels
#               found in .gpu_wheels/ (optimum-quanto, ninja: the machine has no internet) are installed too
#   env         versions, nvidia-smi
#   compile     benchmarks/compile_report.py --check: the kernels compiled for sm_90 by this triton
#               (wgmma in the SASS, no spills in the MMA loops, shared memory), no GPU needed
#   attn_tests  pytest tests/test_decode_attention.py -k cuda  (every interpreter case, compiled; CUDA graphs)
#   attn        benchmarks/decode_attention.py --sweep: the fused decode-attention op vs. the unfused path
#               vs. SDPA over a 16-bit cache, TFLOP/s and fraction of the H200's dense bf16 peak, and the
#               fastest of sweep_configs() per shape and length; --profile: device time per Triton kernel
#   cuda_ops    pytest tests/test_kernels_cuda.py  (dequant_project vs. its CPU reference, CUDA graphs,
#               Inductor, end to end through the backend incl. the fused decode path and reduce-overhead)
#   decode      benchmarks/decode_step.py, bf16, lengths up to 32K, with quanto's QuantizedCache if installed
#   rebuild     benchmarks/rebuild_op.py on CUDA, bf16
# Exit status: 0 if every step passed, 1 otherwise (the summary says which).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/gpu_results}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null 2>&1 || PY=python
BUDGET_S=${BUDGET_S:-290}
START=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

log() { echo "[gpu_check $(($(date +%s) - START))s] $*" | tee -a "$OUT/gpu_check.log"; }

# run_step NAME CAP_SECONDS CMD...: runs CMD with stdout+stderr to $OUT/NAME.log under
# timeout min(CAP, what is left of the budget); records "NAME rc=.. seconds=.." in the summary.
run_step() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -le 5 ]; then
        echo "$name SKIPPED (total budget of ${BUDGET_S}s spent)" | tee -a "$SUMMARY"
        FAILED=1
        return 0
    fi
    local limit=$((cap < left ? cap : left))
    log "step $name (timeout ${limit}s): $*"
    local t0=$(date +%s) rc=0
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    local dt=$(($(date +%s) - t0))
    local status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT after ${limit}s"; elif [ "$rc" -ne 0 ]; then status=FAILED; fi
    [ "$rc" -eq 0 ] || FAILED=1
    echo "$name rc=$rc seconds=$dt $status" | tee -a "$SUMMARY"
    tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/gpu_check.log" || true
    return 0
}

# ---- install -------------------------------------------------------------------------------------
# passes/ is importable as xq_compile.passes only through the package-dir mapping of the install.
install() {
    if "$PY" -m pip install --no-deps --no-build-isolation -e . ; then
        "$PY" -c "import xq_compile.passes, xq_compile.kernels.dequant_project" && return 0
        echo "editable install succeeded but xq_compile.passes does not import"
    fi
    echo "pip install -e . failed: falling back to PYTHONPATH=. plus a symlink xq_compile/passes -> ../passes"
    return 1
}
LINK="$ROOT/xq_compile/passes"
if ls "$ROOT"/.gpu_wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --no-deps --no-index "$ROOT"/.gpu_wheels/*.whl > "$OUT/wheels.log" 2>&1 \
        && echo "wheels rc=0 ok ($(ls "$ROOT"/.gpu_wheels | tr '\n' ' '))" | tee -a "$SUMMARY" \
        || echo "wheels rc=1 FAILED (see wheels.log)" | tee -a "$SUMMARY"
fi
if install > "$OUT/install.log" 2>&1; then
    echo "install rc=0 ok (editable)" | tee -a "$SUMMARY"
else
    # Fallback: make xq_compile.passes importable from the source tree with a symlink (removed on exit).
    if [ ! -e "$LINK" ]; then
        ln -s ../passes "$LINK" && trap 'rm -f "$LINK"' EXIT
    fi
    export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
    if "$PY" -c "import xq_compile.passes, xq_compile.kernels.dequant_project" >> "$OUT/install.log" 2>&1; then
        echo "install rc=1 FAILED (pip, see install.log); using PYTHONPATH=$ROOT + symlink xq_compile/passes (works)" \
            | tee -a "$SUMMARY"
    else
        echo "install rc=1 FAILED: neither pip install -e . nor PYTHONPATH + symlink make xq_compile importable;" \
             "see install.log" | tee -a "$SUMMARY"
    fi
    FAILED=1
fi
# tests import conftest/test_kernels from tests/; benchmarks import common from benchmarks/
export PYTHONPATH="$ROOT/tests${PYTHONPATH:+:$PYTHONPATH}"

# ---- environment ---------------------------------------------------------------------------------
{
    date -u
    nvidia-smi || echo "nvidia-smi unavailable"
    "$PY" - <<'EOF' || true
import importlib, platform
print("python", platform.python_version())
for m in ("torch", "triton", "transformers", "matplotlib", "psutil", "optimum.quanto"):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, "missing:", type(e).__name__, e)
import torch
print("cuda available", torch.cuda.is_available(), torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
import xq_compile
print("xq_compile", xq_compile.__file__, "backends:", "xquant" in torch._dynamo.list_backends())
EOF
} > "$OUT/env.txt" 2>&1 || true
log "environment written to $OUT/env.txt"

export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR="$OUT/_inductor_cache"   # fresh, local; not carried back (large)

# ---- the checks ----------------------------------------------------------------------------------
# In priority order (first H200 run: test_kernels_cuda.py alone took ~130 s, mostly compiling).
# 0. what the kernels compile to (wgmma, spills, shared memory) under this machine's triton: ~30 s, no GPU
run_step compile 60 "$PY" benchmarks/compile_report.py --check --bits 2 3 4 8 --json "$OUT/compile_report.json"
# 1. the decode-attention kernels against their reference, compiled (every interpreter case + real shapes)
run_step attn_tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_decode_attention.py -k cuda \
    --junitxml="$OUT/attn_tests.xml" -rfs
# 2. the fused op vs the unfused path vs SDPA, and the configuration sweep (fastest config per shape)
run_step attn 120 "$PY" benchmarks/decode_attention.py --device cuda --dtype bf16 --lengths 1024 8192 32768 \
    --shape smollm2 llama7b gqa --batch 1 --sweep --profile --out "$OUT/decode_attention.json"
# 3. dequant_project on the GPU, CUDA graphs, Inductor, end to end through the backend (fused decode path,
#    reduce-overhead)
run_step cuda_ops 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_kernels_cuda.py \
    --junitxml="$OUT/cuda_ops.xml" -rfs
# 4. decode step vs the compiled StaticCache and quanto's QuantizedCache, up to 32K cached tokens
run_step decode 150 "$PY" benchmarks/decode_step.py --device cuda --dtype bf16 --layers 4 --quanto --quanto-bits 4 \
    --lengths 256 1024 4096 8192 16384 32768 --max-cache-len 32832 --steps 5 --repeats 3 --warmup 2 \
    --out "$OUT/decode"
# 5. the rebuild op vs torch.mm
run_step rebuild 40 "$PY" benchmarks/rebuild_op.py --device cuda --dtype bf16 --n 1024 4096 32768 \
    --repeats 20 --out "$OUT/rebuild"

rm -rf "$OUT/_inductor_cache" 2>/dev/null || true
log "done in $(($(date +%s) - START))s; summary:"
cat "$SUMMARY"
exit "$FAILED"
