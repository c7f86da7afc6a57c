#!/usr/bin/env bash
# The benchmark, the train command's own timings, the scaling sweep and the parity suite on
# a GPU (an H100 or H200), from a working tree, with no network and nothing to install:
#
#   OUT=/some/dir bash scripts/gpu_bench.sh        # default OUT: runs/gpu-bench
#
# Needs python with jax (CUDA), flax, optax, torch (CUDA), numpy, safetensors, matplotlib.
# Writes $OUT/gpu-bench.tgz holding env.txt (nvidia-smi, versions), bench/ (bench.json,
# bench.txt, bench.{png,svg}: every loop on the lecture workload), minibatch/, ensemble/,
# devices/ (the same for the mini-batch, ensemble and data-parallel workloads), train/ (the
# command at 500 and 1000 epochs: time per epoch from the difference), sweep/ (sweep.json,
# sweep.{png,svg}), the GPU parity suite's log, and a log of each step; beside it steps.log
# and bench.txt. A failing step does not stop the others; the exit status is the first
# failure's (124: a step ran out of time, even if it had to be killed after ignoring SIGINT
# for 15 s, or was skipped for lack of it). The parity step needs pytest and hypothesis.
#
# Built for a GPU that is had for a few minutes at a time, so that a run cut short still
# leaves what it measured:
# - the archive is rewritten after every step (and the sweep saves sweep.json after every
#   point);
# - BUDGET_S (default 480: one call of 8 minutes) bounds the whole script; each step also
#   has its own cap (BENCH_S 110, MINIBATCH_S 60, ENSEMBLE_S 45, DEVICES_S 45, TRAIN_S 20
#   each run, SWEEP_S 80, PARITY_S 120) and gets at most what the budget has left; a step
#   with under MIN_STEP_S (default 20) left is skipped and logged;
# - STEPS picks the steps, in order (default "bench minibatch ensemble devices train sweep
#   parity"); two calls on one machine can split them, e.g. STEPS="bench minibatch
#   ensemble devices" then STEPS="train sweep parity".
# Only a few files are wanted back from a remote machine, so OUT receives one archive of
# everything, the step log and the benchmark table.
#
# Rehearsal on a machine without a GPU (the test suite runs this): GPU_BENCH_DEVICE=cpu
# runs the same steps on the CPU; GPU_BENCH_QUICK=1 shrinks every step to seconds.
set -u
FINAL="${OUT:-runs/gpu-bench}"
DEVICE="${GPU_BENCH_DEVICE:-gpu}"
QUICK="${GPU_BENCH_QUICK:-0}"
STEPS="${STEPS:-bench minibatch ensemble devices train sweep parity}"
BUDGET_S="${BUDGET_S:-480}"
MIN_STEP_S="${MIN_STEP_S:-20}"
WORK="$(mktemp -d /tmp/gpu-bench.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT  # everything is in the archive by then
PY="${PYTHON:-python3}"  # the python that has jax and torch
cd "$(dirname "$0")/.."
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # torch shares the GPU with JAX
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor-gpu-bench}"
mkdir -p "$FINAL"
case "$FINAL" in /*) ;; *) FINAL="$(pwd)/$FINAL" ;; esac

if [ "$QUICK" = 1 ]; then
  BENCH_ARGS=(--variants jax:scan,torch:eager --epochs 20 --chunk-epochs 10 --check float32
              --peak-size 256)
  EPOCHS=(20 40)
  SWEEP_ARGS=(--variants jax:scan,torch:eager --points 64,128 --widths 16 --repeat-seconds 0.01
              --peak-size 256)
  PARITY_TARGET=parity_tests/test_criterion.py
  TINY=(--preset none --n-points 64 --width 8 --epochs 4 --chunk-epochs 2 --repeats 1
        --peak-size 256 --check float32)
  MINIBATCH_ARGS=("${TINY[@]}" --batch-size 16 --optimizer adam --variants jax:scan,torch:optim)
  ENSEMBLE_ARGS=("${TINY[@]}" --ensemble 2 --variants jax:ensemble,torch:ensemble)
  DEVICES_ARGS=("${TINY[@]}" --data-parallel 1,2 --variants jax:scan)
else
  BENCH_ARGS=()
  EPOCHS=(500 1000)
  # Each framework's fastest loop, with and without rematerialisation (on a CPU torch's
  # fastest, no-autograd, has no remat: eager draws that line). On a GPU the benchmark also
  # times JAX's scan unrolled by 10, to settle its unroll there (1 from the CPU).
  if [ "$DEVICE" = gpu ]; then
    BENCH_ARGS=(--unroll 1,10)
    SWEEP_VARIANTS=jax:scan,torch:cudagraph
  else SWEEP_VARIANTS=jax:scan,torch:no-autograd,torch:eager; fi
  SWEEP_ARGS=(--variants "$SWEEP_VARIANTS" --remat --repeat-seconds 0.1
              --points 500,10000,100000,1000000 --widths 64,512,4096)
  PARITY_TARGET=parity_tests
  # The workloads beyond the lecture's, each against its own floor (docs/performance.md)
  MINIBATCH_ARGS=(--preset none --n-points 20000 --width 128 --batch-size 250 --optimizer adam
                  --epochs 10 --chunk-epochs 10 --repeats 3)
  ENSEMBLE_ARGS=(--preset none --n-points 500 --width 64 --ensemble 16 --epochs 200
                 --repeats 3)
  # 1, 2 and 4 devices where there are as many (counts the train command refuses, more
  # devices than the machine has, are skipped and named)
  DEVICES_ARGS=(--data-parallel 1,2,4 --epochs 500 --repeats 2 --variants jax:scan,torch:optim)
fi

status=0
fail() { if [ "$status" -eq 0 ]; then status=$1; fi; }

archive() {  # the whole scratch directory as one archive, replaced whole
  tar -czf "$FINAL/gpu-bench.tgz.part" -C "$WORK" . && mv -f "$FINAL/gpu-bench.tgz.part" \
    "$FINAL/gpu-bench.tgz"
  cp "$WORK/steps.log" "$FINAL/" 2>/dev/null
  cp "$WORK/bench/bench.txt" "$FINAL/" 2>/dev/null
  return 0
}

step() {  # step NAME CAP_S COMMAND...: run within the budget, log, remember the first failure
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET_S - SECONDS))
  if [ "$left" -lt "$MIN_STEP_S" ] || [ "$left" -lt 1 ]; then  # timeout 0 would not limit
    echo "== $name: skipped, ${left} s of BUDGET_S=${BUDGET_S} left" | tee -a "$WORK/steps.log"
    fail 124
    return
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  echo "== $name (at most ${cap} s): $*" | tee -a "$WORK/steps.log"
  local t0=$SECONDS
  # SIGINT first: pytest then prints its summary so far, Python its traceback.
  timeout --signal=INT --kill-after=15 "$cap" "$@" > "$WORK/$name.log" 2>&1
  local rc=$? took=$((SECONDS - t0))
  local why=""
  # 137: killed 15 s after an ignored SIGINT (Python drops a KeyboardInterrupt that lands in
  # a gc callback, as JAX's) if the cap was reached, else killed by something else (OOM)
  if [ $rc -eq 124 ] || { [ $rc -eq 137 ] && [ "$took" -ge "$cap" ]; }; then
    why=" (out of time)"
  fi
  echo "   exit $rc after ${took} s$why" | tee -a "$WORK/steps.log"
  tail -n 25 "$WORK/$name.log"
  if [ -n "$why" ]; then fail 124; elif [ $rc -ne 0 ]; then fail $rc; fi
  archive
}

{ timeout 60 nvidia-smi; timeout 120 "$PY" -c "
import flax, jax, numpy, optax, torch
print('jax', jax.__version__, jax.devices())
print('torch', torch.__version__, torch.version.cuda,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')
print('flax', flax.__version__, 'optax', optax.__version__, 'numpy', numpy.__version__)
import hypothesis, pytest; print('pytest', pytest.__version__, 'hypothesis', hypothesis.__version__)"
} > "$WORK/env.txt" 2>&1
echo "device $DEVICE, quick $QUICK, steps: $STEPS, budget ${BUDGET_S} s" > "$WORK/steps.log"
archive

for s in $STEPS; do
  case $s in
    bench)  # every loop on the lecture workload (true float32), float64 agreement included
      step bench "${BENCH_S:-110}" "$PY" scripts/bench.py --device "$DEVICE" \
        ${BENCH_ARGS[@]+"${BENCH_ARGS[@]}"} --out "$WORK/bench" ;;
    minibatch)  # 20,000 points in batches of 250 with Adam: every loop, against its floor
      step minibatch "${MINIBATCH_S:-60}" "$PY" scripts/bench.py --device "$DEVICE" \
        "${MINIBATCH_ARGS[@]}" --out "$WORK/minibatch" ;;
    ensemble)  # 16 members at width 64: the ensemble programs against 16 single runs
      step ensemble "${ENSEMBLE_S:-45}" "$PY" scripts/bench.py --device "$DEVICE" \
        "${ENSEMBLE_ARGS[@]}" --out "$WORK/ensemble" ;;
    devices)  # the train command on 1, 2, 4 devices
      step devices "${DEVICES_S:-45}" "$PY" scripts/bench.py --device "$DEVICE" \
        "${DEVICES_ARGS[@]}" --out "$WORK/devices" ;;
    train)  # the train command as the issue's check times it: two epoch counts, default loops
      for fw in jax torch; do
        for e in "${EPOCHS[@]}"; do
          step "train-$fw-$e" "${TRAIN_S:-20}" "$PY" scripts/train.py --framework "$fw" \
            --device "$DEVICE" --epochs "$e" --no-progress --overwrite --out "$WORK/train/$fw-$e"
        done
      done ;;
    sweep)  # the platform allocator hands JAX's memory back after each program, so that
            # torch's points are not starved by JAX's pool (and the other way round)
      step sweep "${SWEEP_S:-80}" env XLA_PYTHON_CLIENT_ALLOCATOR=platform "$PY" \
        scripts/bench.py --device "$DEVICE" --sweep --repeats 5 "${SWEEP_ARGS[@]}" \
        --out "$WORK/sweep" ;;
    parity)  # the parity suite on the device; its log says what passed
      step parity "${PARITY_S:-120}" env HET_DEVICE="$DEVICE" "$PY" -m pytest -v -rfE \
        -p no:cacheprovider --continue-on-collection-errors --junitxml="$WORK/parity.xml" \
        "$PARITY_TARGET" ;;
    *) echo "== $s: unknown step (bench, minibatch, ensemble, devices, train, sweep, parity)" | tee -a "$WORK/steps.log"
       fail 2 ;;
  esac
done
archive
echo "wrote $FINAL/gpu-bench.tgz (exit $status)"
exit $status
