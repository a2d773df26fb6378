#!/usr/bin/env bash
# One prepared check for a CUDA machine (written for one H200 with 16 CPU cores; torch 2.11, triton 3.6,
# transformers 5.17, no internet). Run from the repository root:
#
#     OUT=gpu_results bash scripts/gpu_check.sh          # everything lands under $OUT (default ./gpu_results)
#
# The GPU machine has no internet: to compare with quanto there, fetch its wheels first (ignored by git,
# carry the folder to the machine):  pip download --no-deps -d .gpu_wheels optimum-quanto==0.2.7 ninja==1.13.2
#
# Almost all of the time goes to compiling (Triton kernels, Inductor graphs), which runs on one CPU core
# per process. The Triton kernels of the timed steps and of the CUDA tests can be compiled beforehand on a
# machine without a GPU, with the GPU machine's Triton release, and carried (the folder is ignored by git):
#     PYTHONPATH=.venv/triton/3.6.0:. .venv/bin/python benchmarks/triton_cache_seed.py build .gpu_triton_cache
# If .gpu_triton_cache/ is there, the script installs it into its Triton cache first ("seed" in the summary).
# Then it runs in two phases under one total budget (BUDGET_S, default 290 s):
#
#   1. compile-bound, in parallel processes (one GPU, shared Triton and Inductor disk caches):
#      tests_<i>     the CUDA correctness tests in TEST_SHARDS (8) shards (pytest --shard i/N, tests/conftest.py):
#                    tests/test_decode_attention.py -k cuda (every interpreter case compiled, real shapes,
#                    CUDA-graph replay), tests/test_paged_decode_attention.py -k cuda (the same kernels
#                    reading vLLM's pages through a block table: real shapes vs the reference and the dense
#                    launch, one CUDA graph replayed with other seq_lens and block tables) and
#                    tests/test_kernels_cuda.py (dequant_project vs its CPU reference,
#                    CUDA graphs, Inductor, backend="xquant" end to end incl. the fused decode path and
#                    mode="reduce-overhead")
#      compile       benchmarks/compile_report.py --check: the kernels compiled for sm_90 by this triton
#                    (wgmma in the SASS, none serialized, no spills in the MMA loops, shared memory)
#      compile_paged the same for the vLLM plugin's decode step (--paged: the sources views of page bytes)
#      warm_attn_<i> benchmarks/decode_attention.py --compile-only in WARM_SHARDS (4) shards: launches every
#                    kernel the timed attention run will launch, once, so that it finds them compiled
#      warm_decode, warm_decode_graphs, warm_rebuild  the decode-step (both modes) and rebuild benchmarks,
#                    shortened: their graphs compiled (Inductor's caches), quanto's extension built (torch's
#                    extension cache)
#   2. timed, one at a time (the GPU to itself), in priority order:
#      attn          decode_attention.py --graph --control --sweep --profile: the fused op vs the unfused path
#                    vs SDPA over a 16-bit cache, eager and replayed from CUDA graphs, TFLOP/s and fraction
#                    of the H200's dense bf16 peak, the fastest of sweep_configs() per shape and length (by
#                    CUDA-graph time), device time per Triton kernel, the K rebuild's tiles as plain matmuls
#      attn_gluon    decode_attention.py --sweep-gluon: the opt-in Gluon scores kernel's variants next to the default,
#                    warp-specialized ones (gluon_ws=1) included (its own process: a kernel never run on a GPU
#                    before cannot take attn down with it)
#      stalls        stall_profile.py: the warps' PC samples (CUPTI through proton) of the op's kernels per source
#                    line with their stall reasons, 7B / GQA / SmolLM2 at n = 8192, default, gluon=auto and
#                    gluon=auto,gluon_ws=1: what holds the scores kernels (the dequantization, the wgmma waits,
#                    W from L2; warp-specialized, the MMA warps waiting for tiles or the others for slots);
#                    not in SMOKE runs
#      attn_s4       decode_attention.py with S = 4 query tokens, default configuration (warm_attn_s4 compiles it)
#      decode_graphs decode_step.py with mode="reduce-overhead" for both compiled models (CUDA graphs: no
#                    launch overhead, as a server runs decode steps), lengths 256, 4096, 32K
#      decode_graphs_gluon  decode_graphs again with a runner whose fused attention uses the Gluon scores kernel
#                    (--attention-config gluon=auto: W resident where it fits, as for SmolLM2)
#      paged         paged_decode.py: the vLLM plugin's decode step (the fused op over the pages) vs the torch
#                    path it replaces and the dense op on the same rows, and replayed from a CUDA graph
#                    (warm_paged compiles it)
#      paged_gluon   paged_decode.py --config gluon=auto: the same with the Gluon scores kernel reading the pages
#      decode        decode_step.py, bf16, lengths up to 32K, vs the compiled StaticCache and quanto's
#                    QuantizedCache (if its wheel is installed)
#      rebuild       rebuild_op.py on CUDA, bf16: dequant_project and the compiled rebuild vs torch.mm
#      rebuild_7b    rebuild_op.py at 4 bits on a 7B-shaped K rebuild (d = N = 4096): the Gluon rebuilds vs the
#                    Triton op vs torch.mm where the channel loop is long
# Every step runs under its own timeout (at most what is left of the budget); each step's rc, seconds and
# status go to $OUT/summary.txt, its output to $OUT/<step>.log. Before that:
#   install     pip install --no-deps --no-build-isolation -e .  (fallback: PYTHONPATH=. plus a temporary
#               symlink xq_compile/passes -> ../passes, the mapping the install would provide); wheels
#               found in .gpu_wheels/ (optimum-quanto, ninja) are installed too
#   env         versions, nvidia-smi
# SMOKE=1 runs the same plumbing on a machine without a GPU (CPU, tiny sizes; the CUDA tests skip).
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

last_line() { grep -v '^[[:space:]]*$' "$1" 2>/dev/null | tail -n 1 | cut -c1-160; }

# step_limit NAME CAP: prints min(CAP, what is left of the budget); fails (and records NAME as skipped)
# when the budget is spent. Called as $(...), a subshell: the caller sets FAILED.
step_limit() {
    local left=$((BUDGET_S - ($(date +%s) - START)))
    if [ "$left" -le 5 ]; then
        echo "$1 SKIPPED (total budget of ${BUDGET_S}s spent)" | tee -a "$SUMMARY" >&2
        return 1
    fi
    echo $(($2 < left ? $2 : left))
}
# execute NAME LIMIT CMD...: CMD's stdout+stderr to $OUT/NAME.log under timeout LIMIT; "rc seconds limit"
# to $OUT/.NAME.status for record.
execute() {
    local name=$1 limit=$2 t0 rc=0
    shift 2
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    echo "$rc $(($(date +%s) - t0)) $limit" > "$OUT/.$name.status"
}
# record NAME: "NAME rc=.. seconds=.. status: last line of its log" in the summary.
record() {
    local name=$1 rc dt limit status=ok
    read -r rc dt limit < "$OUT/.$name.status" || { rc=1 dt=0 limit=0; }
    rm -f "$OUT/.$name.status"
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT after ${limit}s"; elif [ "$rc" -ne 0 ]; then status=FAILED; fi
    [ "$rc" -eq 0 ] || FAILED=1
    echo "$name rc=$rc seconds=$dt $status: $(last_line "$OUT/$name.log")" | tee -a "$SUMMARY"
}
# run_step NAME CAP CMD...: runs CMD now, under timeout min(CAP, what is left of the budget).
run_step() {
    local name=$1 limit
    limit=$(step_limit "$1" "$2") || { FAILED=1; return 0; }
    shift 2
    log "step $name (timeout ${limit}s): $*"
    execute "$name" "$limit" "$@"
    record "$name"
    tail -n 5 "$OUT/$name.log" | sed 's/^/    /' | tee -a "$OUT/gpu_check.log" || true
}
# start_step NAME CAP CMD...: the same in the background; finish_parallel waits for all and records them.
PARALLEL=()
start_step() {
    local name=$1 limit
    limit=$(step_limit "$1" "$2") || { FAILED=1; return 0; }
    shift 2
    PARALLEL+=("$name")
    execute "$name" "$limit" "$@" &
}
finish_parallel() {
    wait
    local name
    for name in "${PARALLEL[@]}"; do record "$name"; done
    PARALLEL=()
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
REMOVE_LINK=0
# Compilation caches: fresh for this run, shared by its processes, outside $OUT (large; never fetched back,
# even when the run is cut short).
CACHES=$(mktemp -d "${TMPDIR:-/tmp}/xq_gpu_check.XXXXXX")
cleanup() {
    rm -rf "$CACHES"
    if [ "$REMOVE_LINK" = 1 ]; then rm -f "$LINK"; fi
}
trap cleanup EXIT
trap "exit 143" TERM INT   # a killed run cleans up too
if ls "$ROOT"/.gpu_wheels/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install --no-deps --no-index "$ROOT"/.gpu_wheels/*.whl > "$OUT/wheels.log" 2>&1 \
        && echo "wheels rc=0 ok ($(ls "$ROOT"/.gpu_wheels | tr '\n' ' '))" | tee -a "$SUMMARY" \
        || echo "wheels rc=1 FAILED (see wheels.log)" | tee -a "$SUMMARY"
fi
# Without ninja quanto's CUDA extension is not built the fast way, and the decode steps with --quanto ran
# past their timeouts on the H200 (first length unfinished after 340 s).
NINJA_CHECK="import sys, torch.utils.cpp_extension as e; sys.exit(not e.is_ninja_available())"
if "$PY" -c "import optimum.quanto" 2>/dev/null && ! "$PY" -c "$NINJA_CHECK" 2>/dev/null; then
    echo "ninja MISSING: quanto's CUDA extension builds slowly and the --quanto decode steps may time out;" \
         "carry it: pip download --no-deps -d .gpu_wheels ninja==1.13.2" | tee -a "$SUMMARY"
fi
if install > "$OUT/install.log" 2>&1; then
    echo "install rc=0 ok (editable)" | tee -a "$SUMMARY"
else
    # Fallback: make xq_compile.passes importable from the source tree with a symlink (removed on exit).
    if [ ! -e "$LINK" ]; then
        ln -s ../passes "$LINK" && REMOVE_LINK=1
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

# ---- the checks ----------------------------------------------------------------------------------
# Kernels compiled by one process are found by the others (and by the timed runs) in these caches.
export TORCHINDUCTOR_CACHE_DIR="$CACHES/inductor" TRITON_CACHE_DIR="$CACHES/triton"
# Triton's cache seeded with the kernels of the timed steps and the CUDA tests, compiled for sm_90 beforehand on a machine
# without a GPU (benchmarks/triton_cache_seed.py; installed only if this machine's Triton built them).
if [ -f "$ROOT/.gpu_triton_cache/TRITON_VERSION" ]; then
    if seeded=$("$PY" benchmarks/triton_cache_seed.py install "$ROOT/.gpu_triton_cache" "$CACHES/triton" 2>&1); then
        echo "seed rc=0 ok: $(echo "$seeded" | tail -n 1)" | tee -a "$SUMMARY"
    else
        echo "seed rc=1 not used: $(echo "$seeded" | tail -n 1)" | tee -a "$SUMMARY"
    fi
fi
TEST_SHARDS=${TEST_SHARDS:-8}
WARM_SHARDS=${WARM_SHARDS:-4}
if [ "${SMOKE:-0}" = 1 ]; then
    DEVICE=cpu DTYPE=float32
    ATTN=(--device cpu --dtype fp32 --lengths 64 128 --shape smollm2 gqa --sweep-min-length 128 --iters 2 --repeats 1)
    MODEL=(--device cpu --dtype "$DTYPE" --layers 2)
    DECODE_LENGTHS=(64 128) GRAPH_LENGTHS=(64 128) MAX_CACHE_LEN=192 REBUILD_N=(64 256)
    REBUILD_7B_N=(64 256) REBUILD_7B_D=256
    PAGED=(--device cpu --dtype fp32 --requests 2 --iters 2 --repeats 1) PAGED_LENGTHS=(64 128)
    ATTN_GPU=() ATTN_S4_GPU=()
else
    DEVICE=cuda DTYPE=bf16
    ATTN=(--device cuda --dtype bf16 --lengths 1024 8192 32768 --shape smollm2 llama7b gqa --batch 1)
    MODEL=(--device cuda --dtype "$DTYPE" --layers 4)
    DECODE_LENGTHS=(256 1024 4096 8192 16384 32768) GRAPH_LENGTHS=(256 4096 32768) MAX_CACHE_LEN=32832
    REBUILD_N=(1024 4096 32768) REBUILD_7B_N=(4096 32768)
    PAGED=(--device cuda --dtype bf16 --requests 8) PAGED_LENGTHS=(1024 8192)
    # also replayed from CUDA graphs (device time, as a compiled server step runs it); the K rebuild's tiles
    # as plain bf16 matmuls next to the scores kernel
    ATTN_GPU=(--graph --control) ATTN_S4_GPU=(--graph)
fi
# S = 4 query tokens (speculative decoding): the target is a step within 1.4x of the S = 1 step of "attn"
ATTN_S4=("${ATTN[@]}" --queries 4)
REBUILD=(benchmarks/rebuild_op.py --device "$DEVICE" --dtype "$DTYPE" --n "${REBUILD_N[@]}")

# ---- phase 1: compile-bound steps in parallel ------------------------------------------------------
PHASE1_S=${PHASE1_S:-170}
log "phase 1 (parallel, at most ${PHASE1_S}s): $TEST_SHARDS test shards, $WARM_SHARDS attention warm-up shards," \
    "compile report, decode and rebuild warm-up"
for ((i = 0; i < TEST_SHARDS; i++)); do
    TORCHINDUCTOR_COMPILE_THREADS=1 start_step "tests_$i" "$PHASE1_S" "$PY" -m pytest -q -p no:cacheprovider \
        tests/test_decode_attention.py tests/test_paged_decode_attention.py tests/test_kernels_cuda.py \
        tests/test_gluon_rebuild.py tests/test_gluon_scores.py -k cuda \
        --shard "$i/$TEST_SHARDS" \
        --junitxml="$OUT/tests_$i.xml" -rfs
done
for ((i = 0; i < WARM_SHARDS; i++)); do
    start_step "warm_attn_$i" "$PHASE1_S" "$PY" benchmarks/decode_attention.py "${ATTN[@]}" "${ATTN_GPU[@]}" \
        --sweep --sweep-gluon --compile-only --shard "$i/$WARM_SHARDS"
done
start_step warm_attn_s4 "$PHASE1_S" "$PY" benchmarks/decode_attention.py "${ATTN_S4[@]}" --compile-only
# (--no-gluon: the Gluon kernels' sm_90 checks are CI's, with this triton too; here they would push the
# step past phase 1, and the warm-up shards compile them for the timed steps anyway)
start_step compile "$PHASE1_S" "$PY" benchmarks/compile_report.py --check --bits 2 3 4 8 --no-gluon \
    --json "$OUT/compile_report.json"
start_step compile_paged "$PHASE1_S" "$PY" benchmarks/compile_report.py --paged --check --bits 2 3 4 8 --no-gluon \
    --json "$OUT/compile_report_paged.json"
TORCHINDUCTOR_COMPILE_THREADS=2 start_step warm_decode "$PHASE1_S" "$PY" benchmarks/decode_step.py "${MODEL[@]}" \
    --quanto --quanto-bits 4 --lengths "${DECODE_LENGTHS[0]}" --max-cache-len "$MAX_CACHE_LEN" --steps 1 \
    --repeats 1 --warmup 2 --no-plot --out "$OUT/_warm_decode"
TORCHINDUCTOR_COMPILE_THREADS=2 start_step warm_decode_graphs "$PHASE1_S" "$PY" benchmarks/decode_step.py \
    "${MODEL[@]}" --mode reduce-overhead --lengths "${DECODE_LENGTHS[0]}" --max-cache-len "$MAX_CACHE_LEN" \
    --steps 1 --repeats 1 --warmup 2 --no-plot --out "$OUT/_warm_decode_graphs"
start_step warm_paged "$PHASE1_S" "$PY" benchmarks/paged_decode.py "${PAGED[@]}" --lengths "${PAGED_LENGTHS[0]}" \
    --iters 1 --repeats 1
TORCHINDUCTOR_COMPILE_THREADS=2 start_step warm_rebuild "$PHASE1_S" "$PY" "${REBUILD[@]}" --repeats 1 \
    --out "$OUT/_warm_rebuild"
finish_parallel
rm -rf "$OUT/_warm_decode" "$OUT/_warm_decode_graphs" "$OUT/_warm_rebuild"
for f in "$OUT"/tests_*.log; do last_line "$f"; done | grep -o '[0-9]\+ \(passed\|failed\|skipped\|errors\?\)' \
    | awk '{n[$2] += $1} END {s = "tests in all:"; for (k in n) s = s " " n[k] " " k; print s}' | tee -a "$SUMMARY" || true

# ---- phase 2: timed, one at a time ------------------------------------------------------------------
run_step attn 180 "$PY" benchmarks/decode_attention.py "${ATTN[@]}" "${ATTN_GPU[@]}" --sweep --profile \
    --out "$OUT/decode_attention.json"
# the Gluon scores kernel (opt-in: gluon=1, W streamed; gluon=2, W resident for SmolLM2) next to the default,
# ranked like the sweep; its own process, after attn: a kernel never run on a GPU before cannot take attn down
run_step attn_gluon 60 "$PY" benchmarks/decode_attention.py "${ATTN[@]}" "${ATTN_GPU[@]}" --sweep-gluon --profile \
    --out "$OUT/decode_attention_gluon.json"
# where the scores kernels stall (PC sampling: eager, each launch serialized; its own process, a CUPTI that
# does not suit the driver can crash it)
if [ "${SMOKE:-0}" != 1 ]; then
    run_step stalls 60 "$PY" benchmarks/stall_profile.py --out "$OUT/stall_profile.json"
fi
run_step attn_s4 30 "$PY" benchmarks/decode_attention.py "${ATTN_S4[@]}" "${ATTN_S4_GPU[@]}" --profile \
    --out "$OUT/decode_attention_s4.json"
# the end-to-end decode step replayed from CUDA graphs (the issue's 1.25x target), then the same with the
# fused attention on the Gluon scores kernel wherever it runs (gluon=auto: W resident where it fits;
# decode_step.py --attention-config: its own runner next to the same baseline, in a process of its own)
run_step decode_graphs 60 "$PY" benchmarks/decode_step.py "${MODEL[@]}" --mode reduce-overhead \
    --lengths "${GRAPH_LENGTHS[@]}" --max-cache-len "$MAX_CACHE_LEN" \
    --steps 5 --repeats 3 --warmup 2 --out "$OUT/decode_graphs"
run_step decode_graphs_gluon 60 "$PY" benchmarks/decode_step.py "${MODEL[@]}" --mode reduce-overhead \
    --lengths "${GRAPH_LENGTHS[@]}" --max-cache-len "$MAX_CACHE_LEN" --attention-config gluon=auto \
    --steps 5 --repeats 3 --warmup 2 --out "$OUT/decode_graphs_gluon"
run_step paged 30 "$PY" benchmarks/paged_decode.py "${PAGED[@]}" --lengths "${PAGED_LENGTHS[@]}" \
    --out "$OUT/paged_decode.json"
# the same step on the opt-in Gluon scores kernel reading the pages (its own process, as attn_gluon)
run_step paged_gluon 30 "$PY" benchmarks/paged_decode.py "${PAGED[@]}" --lengths "${PAGED_LENGTHS[@]}" \
    --config gluon=auto --out "$OUT/paged_decode_gluon.json"
# eager decode steps against quanto's QuantizedCache (measured in the second run; needs ninja, see above)
run_step decode 90 "$PY" benchmarks/decode_step.py "${MODEL[@]}" --quanto --quanto-bits 4 \
    --lengths "${DECODE_LENGTHS[@]}" --max-cache-len "$MAX_CACHE_LEN" --steps 5 --repeats 3 --warmup 2 \
    --out "$OUT/decode"
run_step rebuild 40 "$PY" "${REBUILD[@]}" --repeats 20 --out "$OUT/rebuild"

# the 7B-shaped K rebuild (d = N = 4096): whether the Gluon rebuild's lead over the Triton op on SmolLM2's
# shape holds where the tile loops over 64 channel steps (compiles its graphs here: last, lowest priority)
run_step rebuild_7b 90 "$PY" benchmarks/rebuild_op.py --device "$DEVICE" --dtype "$DTYPE" --bits 4 \
    --hidden "${REBUILD_7B_D:-4096}" --out-features "${REBUILD_7B_D:-4096}" --group-size 128 \
    --n "${REBUILD_7B_N[@]}" --repeats 10 --out "$OUT/rebuild_7b"

log "done in $(($(date +%s) - START))s; summary:"
cat "$SUMMARY"
exit "$FAILED"
