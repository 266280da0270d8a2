#!/usr/bin/env bash
# Run every fuzz target for SECONDS each (default 300), niced, one after the other.
#   fuzz/fuzz_all.sh [SECONDS] [TARGET ...]        targets: recipe set pipeline data serve
#   FTKIT_FUZZ_RUNS=1000000 fuzz/fuzz_all.sh 0 recipe   # run a number of inputs instead, however long it takes
# A hang is an input over FTKIT_FUZZ_CPU_TIMEOUT CPU seconds (default 2, judged by the harness: a niced
# fuzzer on a busy machine waits for a core); libFuzzer's wall-clock -timeout (30 s) is the backstop.
# Coverage comes from ftkit only (FTKIT_FUZZ_INSTRUMENT=ftkit,yaml adds PyYAML: better guidance, ~3x slower).
# Needs atheris (pip install 'ftkit[fuzz]'); corpora, logs and findings go OUTSIDE the repo, under
# $FTKIT_FUZZ_DIR (default ~/.cache/ftkit-fuzz). A finding is a crash-*/timeout-* file there: replay
# it with `python fuzz/fuzz_TARGET.py FILE`, fix it, and keep it as a regression test in tests/.
set -u
here=$(cd "$(dirname "$0")" && pwd)
repo=$(dirname "$here")
out=${FTKIT_FUZZ_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ftkit-fuzz}
secs=${1:-300}
shift || true
targets=${*:-recipe set pipeline data serve}
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export FTKIT_FUZZ_INSTRUMENT=${FTKIT_FUZZ_INSTRUMENT:-ftkit}
export FTKIT_FUZZ_TOKENIZE=${FTKIT_FUZZ_TOKENIZE:-1}  # the data target tokenizes, as `ftkit data check` does
status=0
for t in $targets; do
  mkdir -p "$out/corpus/$t" "$out/findings/$t"
  if [ -z "$(ls -A "$out/corpus/$t")" ]; then
    python "$here/fuzz_$t.py" --write-seeds "$out/corpus/$t" >/dev/null || exit 1
  fi
  log="$out/$t.log"
  start=$(date +%s)
  export FTKIT_FUZZ_KEEP_GOING="$out/findings/$t"  # exceptions are recorded there and the run goes on
  nice -n 19 python "$here/fuzz_$t.py" "$out/corpus/$t" -max_total_time="$secs" -runs="${FTKIT_FUZZ_RUNS:--1}" \
    -timeout="${FTKIT_FUZZ_WALL_TIMEOUT:-30}" -rss_limit_mb=4096 \
    -artifact_prefix="$out/findings/$t/" -print_final_stats=1 >"$log" 2>&1 || status=1
  secs_taken=$(($(date +%s) - start))
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | grep -o '[0-9]*$')
  to1m=$([ "${rate:-0}" -gt 0 ] && echo "$((1000000 / rate / 60)) min" || echo "?")
  echo "$t: ${runs:-?} inputs in ${secs_taken} s (${rate:-?}/s; 1M inputs ~ $to1m), findings: $(ls "$out/findings/$t" | wc -l) ($log)"
done
exit $status
