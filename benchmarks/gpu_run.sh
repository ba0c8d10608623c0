#!/usr/bin/env bash
# Every GPU check in one short run (for a lent GPU machine with PyTorch, transformers and pytest
# installed; moekit is used from this checkout). Writes one log (run.log) and the benchmarks' JSON
# to $OUT (default benchmarks/results/gpu): tests/test_gpu.py, the CUDA kernel probe
# (gpu_probe.py), then the CUDA modes of lm_step,
# moe_layer, hf_generate and expert_parallel (NCCL, world size 1). Each step has its own time
# limit, so one slow step cannot starve the rest.
#   OUT=/tmp/gpu bash benchmarks/gpu_run.sh
set -u
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 MPLBACKEND=Agg
PY=${PYTHON:-python3}
LOG=$OUT/run.log
: >"$LOG"
step() {  # step NAME SECONDS CMD...: run CMD with a limit, append its output and exit status to run.log
    local name=$1 limit=$2; shift 2
    echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local start=$SECONDS
    timeout "$limit" "$@" >>"$LOG" 2>&1
    echo "== $name rc=$? $((SECONDS - start))s" | tee -a "$LOG"
}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    $PY -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee -a "$LOG"
step test_gpu 170 $PY -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py
step gpu_probe 60 $PY benchmarks/gpu_probe.py --out "$OUT/gpu_probe.json"
step lm_step 80 $PY benchmarks/lm_step.py --device cuda --repeats 5 --out "$OUT/lm_step_cuda.json"
step moe_layer 110 $PY benchmarks/moe_layer.py --device cuda --out "$OUT/moe_layer_cuda.json"
step hf_generate_b1 45 $PY benchmarks/hf_generate.py --device cuda --batch 1 --out "$OUT/hf_generate_cuda_b1.json"
step hf_generate_b4 45 $PY benchmarks/hf_generate.py --device cuda --batch 4 --out "$OUT/hf_generate_cuda_b4.json"
step expert_parallel 45 $PY benchmarks/expert_parallel.py --device cuda --ep 1 --out "$OUT/expert_parallel_cuda.json"
tail -n 60 "$LOG"
