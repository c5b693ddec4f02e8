#!/usr/bin/env bash
# The GPU check of issue 19 on a lent GPU machine, which reaches no package registry: it installs nothing.
# It runs through the gpu-kit (../shared/gpu-kit/README.md), built beforehand on the dev machine:
#   EXTRA_PKGS="torchao" bash ../shared/gpu-kit/make_kit.sh        # dev machine: writes .gpukit/ (~55 MB)
#   device call: carry [".gpukit"], command: bash bench/gpu_check.sh  (timeout_s 600)
# Stages run most valuable first, each in its own process under its own time cap (`timeout`), each with its
# own log under $OUT; their table rows are gathered in $OUT/summary.md (8 files at most come back from a device
# call: setup + 6 stage logs + the summary). The whole check stops within BUDGET_S seconds (default 455: under
# 8 minutes with the kit's setup); a stage whose cap no longer fits is cut to what is left, under 20 s skipped.
#   bash bench/gpu_check.sh --smoke               # CPU, tiny pipelines, every stage (the test suite runs this)
#   STAGES="checks eager" bash bench/gpu_check.sh  # some stages only
# Without .gpukit/ it runs with $PYTHON (default: .venv/bin/python, else python3), e.g. for --smoke.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
SMOKE=""
[ "${1:-}" = "--smoke" ] && SMOKE="--smoke" && shift
if [ -f .gpukit/on_device.sh ] && [ -z "$SMOKE" ]; then
  # install the kit into /tmp/site once (about 15 s), then run python3 with it as on_device.sh does,
  # without its per-call import check
  bash .gpukit/on_device.sh true >"$OUT/00-setup.log" 2>&1 || { cat "$OUT/00-setup.log"; exit 1; }
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
  RUN=(python3)
else
  PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
  RUN=("$PY")
  export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} PYTHONUNBUFFERED=1
fi
BUDGET_S=${BUDGET_S:-455}
STAGES=${STAGES:-"checks:60 eager:70 savings:70 job:150 compiled:120 compile_cache:50"}
START=$SECONDS
SUMMARY="$OUT/summary.md"
printf '# GPU check%s\n\n| stage | model | what | result |\n|---|---|---|---|\n' "${SMOKE:+ (smoke: CPU, tiny pipelines)}" >"$SUMMARY"
n=0
for item in $STAGES; do
  stage=${item%%:*}; cap=${item#*:}; [ "$cap" = "$item" ] && cap=120
  n=$((n + 1)); log="$OUT/$(printf %02d $n)-$stage.log"
  left=$((BUDGET_S - (SECONDS - START)))
  if [ "$left" -lt 20 ]; then
    echo "| $stage | | | not run: the ${BUDGET_S} s budget is spent |" >>"$SUMMARY"; continue
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  t0=$SECONDS
  timeout -k 10 "$cap" "${RUN[@]}" bench/gpu_check.py --stage "$stage" $SMOKE "$@" >"$log" 2>&1
  rc=$?
  grep '^| ' "$log" >>"$SUMMARY"
  case $rc in
    0) ;;
    124|137) echo "| $stage | | | stopped at its ${cap} s cap (rows above are what it finished) |" >>"$SUMMARY" ;;
    *) echo "| $stage | | | failed (exit $rc): $(grep -v -e '^|' -e '^[[:space:]]*$' "$log" | tail -1 | cut -c1-200) |" >>"$SUMMARY" ;;
  esac
  echo "$stage: exit $rc in $((SECONDS - t0)) s ($log)"
done
echo "total $((SECONDS - START)) s" | tee -a "$SUMMARY"
cat "$SUMMARY"
