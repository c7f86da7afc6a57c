#!/usr/bin/env bash
# The benchmark and the scaling sweep on a GPU (an H100 or H200), in one call of a few
# minutes, from a working tree with no network and nothing installed by us:
#
#   OUT=/some/dir bash scripts/gpu_bench.sh        # default OUT: runs/gpu-bench
#
# Needs python with jax (CUDA), flax, optax, torch (CUDA), numpy, safetensors, matplotlib.
# Writes $OUT/gpu-bench.tgz holding env.txt (nvidia-smi, versions), bench/ (bench.json, bench.txt,
# bench.{png,svg}: every loop on the lecture workload), sweep/ (sweep.json,
# sweep.{png,svg}), train/ (the train command's own timings at 500 and 1000 epochs, the
# check the issue describes), the GPU parity suite's log, and a log of each step. A failing step does not stop the
# others; the exit status is the first failure's.
set -u
FINAL="${OUT:-runs/gpu-bench}"
# The device tool brings back at most 8 files from $OUT: work in a scratch directory and
# leave in $OUT one archive of everything plus the step log and the benchmark table.
OUT="$(mktemp -d /tmp/gpu-bench.XXXXXX)"
PY="${PYTHON:-python}"
cd "$(dirname "$0")/.."
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # torch shares the GPU with JAX
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/torchinductor-gpu-bench}"
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: run, log, remember the first failure
  local name=$1; shift
  echo "== $name: $*" | tee -a "$OUT/steps.log"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   exit $rc after $((SECONDS - t0)) s" | tee -a "$OUT/steps.log"
  tail -n 25 "$OUT/$name.log"
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then status=$rc; fi
}
{ nvidia-smi; "$PY" -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.version.cuda, torch.cuda.get_device_name())"; } > "$OUT/env.txt" 2>&1

# 1. Every loop on the lecture workload (true float32), float64 agreement check included.
step bench "$PY" scripts/bench.py --device gpu --out "$OUT/bench"

# 2. The train command as the issue's check times it: two epoch counts, default loops.
for fw in jax torch; do
  for e in 500 1000; do
    step "train-$fw-$e" "$PY" scripts/train.py --framework "$fw" --device gpu --epochs "$e" \
      --no-progress --overwrite --out "$OUT/train/$fw-$e"
  done
done

# 3. The sweep: each framework's fastest loop, with and without rematerialisation. The
# platform allocator hands JAX's memory back after each program, so that torch's points
# are not starved by JAX's pool (and the other way round).
step sweep env XLA_PYTHON_CLIENT_ALLOCATOR=platform "$PY" scripts/bench.py --device gpu --sweep \
  --variants jax:scan,torch:cudagraph --remat --repeats 5 --repeat-seconds 0.1 \
  --points 500,10000,100000,1000000 --widths 64,512,4096 --out "$OUT/sweep"

# 4. The parity suite on the GPU (never run on one yet): bounded, so that a slow compile
# cannot eat the device's time; its log says what passed.
step parity-gpu env HET_DEVICE=gpu timeout "${PARITY_TIMEOUT_S:-240}" "$PY" -m pytest -q \
  -p no:cacheprovider parity_tests
mkdir -p "$FINAL"
tar -czf "$FINAL/gpu-bench.tgz" -C "$OUT" .
cp "$OUT/steps.log" "$FINAL/" 2>/dev/null
cp "$OUT/bench/bench.txt" "$FINAL/" 2>/dev/null
echo "wrote $FINAL/gpu-bench.tgz"
exit $status
