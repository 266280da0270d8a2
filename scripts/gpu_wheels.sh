#!/usr/bin/env bash
# Fetch the wheels the lent GPU machine lacks into .whl/ (git-ignored), for the device tool's `carry`.
# The machine has torch, transformers 5.17, peft, accelerate, triton, typer, rich, pyarrow, pandas;
# ftkit needs transformers >= 5.24 and the rest below. Run here (needs the package registry).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
pip_dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$@"
}
pip_dl transformers==5.24.0 trl==1.16.0 datasets==5.2.0 peft==0.21.2 liger-kernel==0.8.5 \
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2 dill==0.4.1 \
  multiprocess==0.70.19 tokenizers==0.23.3 huggingface-hub==2.4.0
ls -la .whl
