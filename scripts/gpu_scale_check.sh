#!/usr/bin/env bash
# Prepared check for docs/scale.md on a machine with >= 2 CUDA GPUs (not run yet: no multi-GPU machine
# was lent). Same preparation as scripts/gpu_check.sh (.whl/ wheels, .gpu/base config + tokenizer), then:
#   run(command="bash scripts/gpu_scale_check.sh", carry=[".whl", ".gpu"], timeout_s=560)
# Each case trains a tiny random model (built from .gpu/base's config) for 3 steps on 2 GPUs and records
# world_size, the adapter and the peak memory next to `ftkit plan`'s estimate, in $OUT/scale.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/ftkit-gpu-out}"; mkdir -p "$OUT"
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
if [ "$NGPU" -lt 2 ]; then echo "needs 2 GPUs, found $NGPU" | tee "$OUT/scale.txt"; exit 0; fi
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
W=$(mktemp -d)
python3 - "$W" <<'PY'
import json, sys
from pathlib import Path
sys.path.insert(0, "tests")
from conftest import CHAT_ROWS, build_tiny
w = Path(sys.argv[1])
build_tiny(w / "tiny", Path(".gpu/base"))
(w / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS))
PY
case_run() {  # name, then --set overrides
  local name=$1; shift
  python3 -m ftkit plan recipes/fsdp_qlora.yaml --set model.name="$W/tiny" --set data.train="$W/chat.jsonl" \
    "$@" --gpus 2 --json > "$OUT/plan-$name.json" 2>> "$OUT/scale.log"
  timeout 150 python3 -m ftkit sft recipes/fsdp_qlora.yaml -n 2 --json -o "$W/$name" --set model.name="$W/tiny" \
    --set data.train="$W/chat.jsonl" --set train.max_steps=3 "$@" > "$OUT/run-$name.json" 2>> "$OUT/scale.log"
  echo "{\"case\": \"$name\", \"rc\": $?}" >> "$OUT/scale.jsonl"
}
case_run fsdp_qlora
case_run ddp_qlora --set distributed=ddp
case_run fsdp_lora --set "method={type: lora, target_modules: all-linear}"
case_run zero2_lora --set "method={type: lora, target_modules: all-linear}" --set distributed=deepspeed --set zero_stage=2
case_run zero3_qlora --set distributed=deepspeed --set zero_stage=3
cat "$OUT/scale.jsonl"
