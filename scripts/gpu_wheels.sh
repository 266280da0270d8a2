#!/usr/bin/env bash
# Fetch the wheels the lent GPU machine lacks, for the device tool's `carry` (64 MiB in all):
#   bash scripts/gpu_wheels.sh            # -> .whl/ (git-ignored), about 29 MB
# The machine has torch 2.11, transformers 5.17, huggingface_hub 1.33, accelerate, triton, typer, rich,
# pyarrow, pandas. ftkit needs transformers >= 5.24 and the rest below. huggingface_hub is left out on
# purpose: 2.x needs httpx2 (absent there) and breaks every import; the image's 1.33 serves transformers
# 5.24. Run here (needs the package registry).
set -euo pipefail
cd "$(dirname "$0")/.."
pip_dl() {
  local dest=$1; shift
  mkdir -p "$dest"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_24_x86_64 -d "$dest" "$@"
  ls -la "$dest"; du -sh "$dest"
}
pip_dl .whl transformers==5.24.0 trl==1.16.0 datasets==5.2.0 peft==0.21.2 liger-kernel==0.8.5 \
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 dill==0.4.1 \
  multiprocess==0.70.19 tokenizers==0.23.3
# bitsandbytes ships a 129 MB wheel of kernels for every CUDA/ROCm release; the image's torch is cu130:
# keep that library (and the CPU one) and drop the rest from the wheel and its RECORD.
pip_dl .whl bitsandbytes==0.50.2
python3 - <<'PY'
import glob, re, zipfile
src = glob.glob(".whl/bitsandbytes-*.whl")[0]
drop = re.compile(r"bitsandbytes/libbitsandbytes_(?!cuda130|cpu)[a-z0-9]+\.(so|dll|dylib)$")
with zipfile.ZipFile(src) as zin:
    items = [(i, zin.read(i)) for i in zin.infolist() if not drop.search(i.filename)]
with zipfile.ZipFile(src, "w", zipfile.ZIP_DEFLATED) as zout:
    for info, data in items:
        if info.filename.endswith(".dist-info/RECORD"):
            data = "".join(l for l in data.decode().splitlines(True) if not drop.search(l.split(",")[0])).encode()
        zout.writestr(info, data)
PY
du -sh .whl
if ls .whl | grep -qi huggingface_hub; then echo "huggingface_hub must not be carried" >&2; exit 1; fi
