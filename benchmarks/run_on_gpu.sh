#!/usr/bin/env bash
# Everything a session with a lent GPU checks, as one command that fits the device tool's call
# (10 minutes a command, 15 minutes of device time per task, the machine's start included):
#
#   bash benchmarks/run_on_gpu.sh                          # every stage, on a machine with a CUDA GPU
#   bash benchmarks/run_on_gpu.sh cuda-tests memcheck      # the build, then only the stages named
#
# Stages, most important first:
#   build                     the extension with its CUDA kernels (a failed build falls back to a
#                             CPU-only one, so that the Triton stages still run)
#   cuda-tests                the GPU tests of the cuda backend
#   bench-attention           benchmarks/bench_attention.py, which judges issue 6's targets
#   bench-correspondence      benchmarks/bench_correspondence.py
#   verify                    the user's `sketchcolor verify --quick` on the GPU
#   memcheck, racecheck       compute-sanitizer over one small call of every cuda kernel
#                             (benchmarks/cuda_smoke.py); memcheck runs right after cuda-tests
#                             instead when they fail, to say where
#   profile                   Nsight Compute's throughput and memory sections of the forward and
#                             one key chunk's backward kernels at the target shape
#                             (benchmarks/attention_target_step.py)
#   bench-attention-mma-sync  the cuda backend again with the mma.sync forward (on H100/H200 the
#                             default is wgmma)
#   bench-attention-compact   and with the compact (2-stage) mma.sync kernels that GPUs granting
#                             99 KiB per block run (SKETCHCOLOR_CUDA_STAGES=compact)
#   triton-tests              the Triton backend's GPU tests (with every autotune config pinned in
#                             turn, each one compiled: hence its longer limit; not yet timed)
#   bench-train               one training step's peak GPU memory and time at 512x512 and
#                             1024x1024 with SCFT at 1/4 (16,384 and 65,536 tokens), reference
#                             vs triton vs cuda (benchmarks/bench_train_memory.py)
# One deadline (GPU_SESSION_SECONDS, default 540) bounds the whole run: each stage gets its own
# limit or what is left of the deadline, whichever is less, so a hang costs one stage, not the
# run. A failed stage does not stop the next ones.
#
# Output, in $OUT (the device tool brings that folder back; ./gpu-run elsewhere): summary.txt
# (versions, each stage's exit status and seconds), stages.log (every stage's output under its
# name) and benchmarks/RESULTS.md with the sections the benchmarks wrote.
set -uo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-gpu-run}"
mkdir -p "$out"
summary="$out/summary.txt"
only=" $* "   # stage names to run (the build always runs); none: all
deadline=$((SECONDS + ${GPU_SESSION_SECONDS:-540}))
export PYTHONUNBUFFERED=1
python=python3

# stage NAME LIMIT_SECONDS COMMAND...: COMMAND's output goes to stages.log under NAME, its exit
# status and duration to the summary (124: stopped at its limit).
stage() {
  local name=$1 limit=$2
  shift 2
  if [[ $name != build* && $only != "  " && $only != *" $name "* ]]; then return 0; fi
  local left=$((deadline - SECONDS - 10))
  if ((left < 30)); then
    echo "$name: not run, ${left} s left before the deadline" | tee -a "$summary"
    return 1
  fi
  ((limit > left)) && limit=$left
  local start=$SECONDS rc=0
  echo "===== $name =====" >>"$out/stages.log"
  timeout --signal=INT --kill-after=10 "$limit" "$@" >>"$out/stages.log" 2>&1 || rc=$?
  echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$summary"
  return "$rc"
}

sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
# The caching allocator off, so that memcheck sees each tensor's own bounds.
memcheck() {
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 stage memcheck 120 \
    "$sanitizer" --tool memcheck --error-exitcode 1 --print-limit 20 "$python" benchmarks/cuda_smoke.py
}

{
  date -u '+%Y-%m-%d %H:%M UTC'
  git log -1 --format='commit %h %s' 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
  nvcc --version | tail -1
  "$python" -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
} >"$summary" 2>&1

# setup.py builds the CUDA kernels when torch is a CUDA build and nvcc is present. No package is
# fetched (the machine has no registry): --no-deps leaves out what only the data pipeline needs.
install=("$python" -m pip install --no-deps --no-build-isolation --no-index -e .)
if ! MAX_JOBS=16 stage build 240 "${install[@]}"; then
  SKETCHCOLOR_NO_CUDA=1 stage build-cpu-only 120 "${install[@]}"
fi

cuda_tests_rc=0
stage cuda-tests 150 "$python" -m pytest -q -rfE --tb=short -p no:cacheprovider -m "not slow" \
  tests/test_cuda_attention.py tests/test_cuda_correspondence.py || cuda_tests_rc=$?
((cuda_tests_rc != 0)) && memcheck
stage bench-attention 180 "$python" benchmarks/bench_attention.py --device cuda --sizes 4096,16384
stage bench-correspondence 90 "$python" benchmarks/bench_correspondence.py --device cuda --sizes 4096,16384
stage verify 90 "$python" -m sketchcolor verify --quick --device cuda
((cuda_tests_rc == 0)) && memcheck
stage racecheck 90 "$sanitizer" --tool racecheck --error-exitcode 1 --print-limit 20 "$python" benchmarks/cuda_smoke.py
ncu=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
stage profile 120 "$ncu" --set basic --section MemoryWorkloadAnalysis \
  -k regex:"scft_attn_fwd|scft_attn_bwd_probs|scft_gemm" -c 4 "$python" benchmarks/attention_target_step.py
SKETCHCOLOR_CUDA_MMA=mma_sync stage bench-attention-mma-sync 60 \
  "$python" benchmarks/bench_attention.py --device cuda --impl cuda --sizes 16384 --no-write
SKETCHCOLOR_CUDA_MMA=mma_sync SKETCHCOLOR_CUDA_STAGES=compact stage bench-attention-compact 60 \
  "$python" benchmarks/bench_attention.py --device cuda --impl cuda --sizes 16384 --no-write
stage triton-tests 240 "$python" -m pytest -q -rfE --tb=short -p no:cacheprovider -m "not slow" \
  tests/test_triton_attention.py tests/test_triton_correspondence.py
stage bench-train 150 "$python" benchmarks/bench_train_memory.py --device cuda --sizes 512 1024 --strides 4 \
  --attn reference triton cuda --steps 2 --timeout 60

cp benchmarks/RESULTS.md "$out/RESULTS.md"
echo "done after $SECONDS s" >>"$summary"
