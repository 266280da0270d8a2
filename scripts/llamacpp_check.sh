#!/usr/bin/env bash
# Build llama-cpp-python once into a cache dir (outside the repo), install it, and run the tests that
# need llama.cpp itself (marked `llamacpp`; CI skips them). Usage:
#   scripts/llamacpp_check.sh            # the tiny-model checks (a few minutes once built)
#   scripts/llamacpp_check.sh --e2e      # also the embedded-model exports (every quantization measured)
# The first build compiles llama.cpp: ~10-20 minutes on 2 cores. FTKIT_LLAMACPP_CACHE picks the cache.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE="${FTKIT_LLAMACPP_CACHE:-$HOME/.cache/ftkit/llamacpp}"
PY="${PYTHON:-python}"
mkdir -p "$CACHE/wheels"

if ! "$PY" -c "import llama_cpp" 2>/dev/null; then
  if ! ls "$CACHE"/wheels/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "building llama-cpp-python into $CACHE/wheels (once) ..."
    CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" nice "$PY" -m pip wheel --no-deps -w "$CACHE/wheels" \
      "llama-cpp-python>=0.3.16" 2>&1 | tail -3
  fi
  "$PY" -m pip install --no-deps "$(ls -t "$CACHE"/wheels/llama_cpp_python-*.whl | head -1)"
  "$PY" -m pip install "diskcache>=5.6.1" "jinja2>=2.11.3" "numpy>=1.20.0" "typing-extensions>=4.5.0" >/dev/null
fi
"$PY" -c "import llama_cpp; print('llama_cpp', llama_cpp.__version__)"

MARK="llamacpp and not e2e"
[[ "${1:-}" == "--e2e" ]] && MARK="llamacpp"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -m pytest -m "$MARK" tests/test_export.py tests/test_gguf_archs.py -q -p no:cacheprovider
if [[ "${1:-}" == "--e2e" ]]; then
  "$PY" scripts/llamacpp_measure.py   # next-token agreement per quantization on the embedded model
fi
