#!/usr/bin/env bash
# The prepared GPU check for a session lent the device (about 8 minutes). Before calling it, here:
#   bash scripts/gpu_wheels.sh                    # wheels the GPU machine lacks, into .whl/
#   mkdir -p .gpu/base && cp ~/.cache/ftkit/models/smollm2-135m-instruct/{config.json,tokenizer*,chat_template.jinja} .gpu/base/
#   echo /.gpu/ >> .git/info/exclude
# then: run(command="bash scripts/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=600)
# Results land in $OUT: gpu.txt, test_speed.log, sft_speed.log, sft_speed_gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" FTKIT_TEST_BASE="$PWD/.gpu/base" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/ftkit-gpu-out}"; mkdir -p "$OUT"
{ nvidia-smi -L; python3 -c "import torch, transformers, trl, peft, liger_kernel as L; print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft', peft.__version__)"; } 2>&1 | tee "$OUT/gpu.txt"
# The fast paths learn what the plain path learns (liger on the GPU; compile + auto batch).
timeout 170 python3 -m pytest -q -x -p no:cacheprovider tests/test_speed.py 2>&1 | tee "$OUT/test_speed.log"
# Throughput against plain TRL on the Llama-1B-shaped workload, one process per variant.
timeout 390 python3 benchmarks/sft_speed.py --device cuda --base .gpu/base --steps 20 --warmup 5 \
  --variants trl_defaults,trl_tuned,trl_liger,ftkit,ftkit_packing,ftkit_lowmem \
  --json "$OUT/sft_speed_gpu.json" 2>&1 | tee "$OUT/sft_speed.log"
