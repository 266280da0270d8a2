#!/usr/bin/env bash
# The prepared GPU check for a session lent the device: at most 8 minutes in one call.
# Prepare here (once; nothing of it is committed):
#   bash scripts/gpu_wheels.sh      # wheels the GPU image lacks (bitsandbytes trimmed to cu130), into .whl/
#   mkdir -p .gpu/base && cp ~/.cache/ftkit/models/smollm2-135m-instruct/{config.json,tokenizer*,chat_template.jinja} .gpu/base/
# The device call (docs/performance.md):
#   run(command="bash scripts/gpu_check.sh", carry=[".whl", ".gpu"], timeout_s=560)
# Phases, in order, each cut to the time left: tier (pytest -m gpu), 1b (LoRA throughput against plain TRL on the
# Llama-3.2-1B-shaped workload), 7b (QLoRA on a Llama-2-7B-shaped model against plain TRL + bitsandbytes).
# Name phases to run fewer: bash scripts/gpu_check.sh 7b. Results, as they come: $OUT/*.log and $OUT/*.json.
set -uo pipefail
cd "$(dirname "$0")/.."
T0=$SECONDS
BUDGET=${GPU_CHECK_BUDGET_S:-470}
OUT="${OUT:-/tmp/ftkit-gpu-out}"; mkdir -p "$OUT"
PHASES="${*:-tier 1b 7b}"
left() { echo $(( BUDGET - (SECONDS - T0) )); }
# A warm machine keeps /tmp/site from an earlier call: start clean.
rm -rf /tmp/site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" FTKIT_TEST_BASE="$PWD/.gpu/base" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 \
  TOKENIZERS_PARALLELISM=false
quiet() { grep --line-buffered -v -e "Warning" -e "warnings.warn" -e "^\s*$"; }
{ nvidia-smi -L; python3 -c "
import torch, transformers, trl, peft, bitsandbytes
print('torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'peft',
      peft.__version__, 'bitsandbytes', bitsandbytes.__version__)"; } 2>&1 | quiet | tee "$OUT/gpu.txt"

bench() {  # name, seconds, then sft_speed.py arguments
  local name=$1 secs=$2; shift 2
  (( secs > 30 )) || { echo "$name: skipped, $secs s left"; return; }
  echo "== $name ($secs s)"
  timeout "$secs" python3 benchmarks/sft_speed.py --device cuda --base .gpu/base --json "$OUT/$name.json" "$@" 2>&1 \
    | quiet | tee "$OUT/$name.log"
}
for phase in $PHASES; do
  case $phase in
    tier)  # every method, QLoRA, rm/dpo/kto/orpo/rl, varlen and Liger against plain, auto batch after an OOM;
           # and a CPU-only test that must also pass on a machine with a GPU
      echo "== tier"
      timeout $(( $(left) < 170 ? $(left) : 170 )) python3 -m pytest -q -p no:cacheprovider -o addopts="-ra" \
        --durations=15 --junitxml="$OUT/gpu_tier.xml" tests/test_gpu.py \
        tests/test_speed.py::test_liger_true_on_a_cpu_is_exit_2_before_the_model_loads 2>&1 | quiet | tee "$OUT/gpu_tier.log" ;;
    1b) reserve=0; [[ " $PHASES " == *" 7b "* ]] && reserve=170  # the 7b phase needs about that
        t=$(( $(left) - reserve )); bench sft_speed_1b $(( t > 170 ? 170 : t )) --steps 14 --warmup 4 \
          --variants trl_defaults,ftkit,ftkit_lowmem,ftkit_padded ;;
    7b) bench sft_speed_7b_qlora "$(left)" --model 7b --steps 8 --warmup 3 \
          --variants trl_qlora_defaults,ftkit_qlora_lowmem,ftkit_qlora ;;
    *) echo "unknown phase $phase (tier, 1b, 7b)"; exit 2 ;;
  esac
done
echo "== done in $(( SECONDS - T0 )) s"
