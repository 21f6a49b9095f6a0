#!/usr/bin/env bash
# The GPU checks of one short device session, in one script: the hot shard on CUDA and its gather
# rate against index_select (issue 5), training and generation on CUDA with the fetch overlap
# profiled, the Engram kernels. Run from the repository root on the GPU machine, with $OUT the
# folder whose files come back:
#
#   here, once:  make wheels          # .wheels/: lmdb, grpcio, grpcio-health-checking, protobuf (8 MB)
#   device run:  bash bench/gpu_session.sh      carrying .wheels
#
# The machine has python3 with torch (CUDA), triton, numpy, tokenizers, msgpack, rich and
# prometheus_client, and no network; what it lacks comes from .wheels. Ray is not carried (its
# wheel alone is over the carry limit), so nothing here needs it: tests that start Ray are not
# collected, and the benches run their shards as local processes (--cluster processes).
#
# Steps, most wanted first, each under `timeout`, each continuing past a failure; no step starts
# with less than its time left in SESSION_BUDGET_S (default 540 s, under the run's 600 s limit):
#   pytest -m gpu          -> pytest.log
#   bench_hot_gather       -> hot_gather.json   (device-tier gather vs index_select, 4M x 64 fp32)
#   corpus                 (the stdlib corpus the next two benches train on, built once)
#   bench_train_overhead   -> train_overhead.json, trace/trace.json.gz (profiled prefetch steps)
#   bench_generate         -> generate.json
#   bench_kernels          -> kernels.json
# Everything a step prints on stderr goes to session.log; a table of steps, exit codes and
# seconds ends the output.
set -u -o pipefail

OUT=${OUT:-gpu-session-out}
PY=${PY:-python3}
BUDGET=${SESSION_BUDGET_S:-540}
mkdir -p "$OUT/trace"
LOG="$OUT/session.log"
SUMMARY=()
export PYTHONUNBUFFERED=1 PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"

# step NAME TIMEOUT_S OUTFILE CMD...: runs CMD under timeout, stdout to OUTFILE (and the console)
step() {
    local name=$1 limit=$2 out=$3 left=$((BUDGET - SECONDS)) start=$SECONDS rc
    shift 3
    if ((left < limit)); then
        SUMMARY+=("$(printf '%-16s skipped: %ss left of the budget, it needs %ss' "$name" "$left" "$limit")")
        return
    fi
    echo "=== $name (timeout ${limit}s): $*" | tee -a "$LOG"
    timeout "$limit" "$@" 2>>"$LOG" | tee "$out"
    rc=$?
    SUMMARY+=("$(printf '%-16s rc %-4s %4ss  %s' "$name" "$rc" "$((SECONDS - start))" "$out")")
}

echo "=== environment" | tee -a "$LOG"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  $PY -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
          "cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.is_available())'
} 2>&1 | tee -a "$LOG"

if compgen -G ".wheels/*.whl" >/dev/null; then  # the README's way: a target dir, ahead on PYTHONPATH
    step wheels 60 /dev/null $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target /tmp/site .wheels/*.whl
else
    echo "no .wheels/: lmdb, grpcio-health-checking and the pinned grpcio/protobuf must be installed" | tee -a "$LOG"
fi

# Only files holding GPU tests are collected: the others may import Ray, which is not here.
GPU_TESTS=$(grep -rl --include='test_*.py' "mark\.gpu" tests)
step pytest-gpu 150 "$OUT/pytest.log" $PY -m pytest -m gpu -q --tb=short -p no:cacheprovider $GPU_TESTS
step hot-gather 60 "$OUT/hot_gather.json" $PY bench/bench_hot_gather.py --device cuda --json
step corpus 150 /dev/null $PY -c 'from trainer.data import Corpus, CorpusConfig; print(Corpus.load(CorpusConfig()).summary())'
step train-overhead 150 "$OUT/train_overhead.json" $PY bench/bench_train_overhead.py --device cuda \
    --cluster processes --steps 16 --profile "$OUT/trace" --profile-steps 4 --json
step generate 60 "$OUT/generate.json" $PY bench/bench_generate.py --device cuda --cluster processes --json
step kernels 120 "$OUT/kernels.json" $PY bench/bench_kernels.py --json

echo "=== profile summary and the last lines of session.log"
grep "^profile:" "$LOG" || echo "no profile summary (see train-overhead)"
tail -n 20 "$LOG"
echo "=== steps (${SECONDS}s of ${BUDGET}s)"
printf '%s\n' "${SUMMARY[@]}"
