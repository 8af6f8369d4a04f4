#!/usr/bin/env bash
# Issue 5's GPU figures and GPU tests in one prepared call to a one-GPU machine (H100 or H200),
# about 9 minutes, written for this project's `device` tool:
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=600)
# (the step limits add up to 570 s, plus at most 30 s for machine.txt, so the summary and logs.txt are written
# even if every step runs to its limit)
# It needs nothing beyond the GPU image's torch, torchvision, timm, transformers, pytest
# (no Ray, no dataset). Each step has its own time limit, so a slow one cannot starve the
# rest; steps run in order of importance. Results go to $OUT (the device tool's folder),
# else results/gpu_check/: machine.txt, JSON per benchmark and logs.txt (6 files); the summary comes last.
set -u
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
# the GPU image's interpreter is python3 (its `python`, if any, may lack torch)
py=${PYTHON:-python3}
out=${OUT:-results/gpu_check}
mkdir -p "$out"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  timeout 30 "$py" -c "import torch, torchvision, timm, transformers as t; print('torch', torch.__version__, \
'torchvision', torchvision.__version__, 'timm', timm.__version__, 'transformers', t.__version__)"
  date -u +%FT%TZ
  echo "cpus $(nproc)"
  df -h /dev/shm | tail -n 1  # 16 loader workers x 2 batches of 256 float32 224px images: about 5 GB
} | tee "$out/machine.txt"

step() {  # step NAME SECONDS CMD...: run CMD with a time limit, log to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "   exit $? after ${SECONDS}s total"
}

# 1. ViT-B/16: ours compiled and eager vs HF eager, the loss-curve check (bf16 compiled vs fp32 eager)
step throughput_vit_b 230 "$py" benchmarks/throughput.py --model mae_vit_base_patch16 --img-size 224 \
  --in-chans 3 --batch-size 256 --variants ours-compiled,ours-eager,hf-eager --check-steps 200 \
  --json "$out/throughput_vit_b.json"
# 2. JPEG input: PIL workers vs GPU decode vs a pre-decoded store (both prefetched on a side stream),
#    alone and feeding the compiled ViT-B step
step input_pipeline 110 "$py" benchmarks/input_pipeline.py --num-images 4096 --model mae_vit_base_patch16 \
  --img-size 224 --batch-size 256 --workers 16 --steps 30 --input-batches 30 --warmup 10 --compile \
  --arms cpu,device+prefetch,predecoded+prefetch --json "$out/input_pipeline.json"
# 3. where the compiled ViT-B step's time goes (kernel categories, GPU busy fraction): what to fix if 1 falls short
step profile_vit_b 55 "$py" benchmarks/profile_step.py --model mae_vit_base_patch16 --img-size 224 --in-chans 3 \
  --batch-size 256 --compile --top 20 --json "$out/profile_vit_b.json"
# 4. ViT-L/16 at batch 128
step throughput_vit_l 105 "$py" benchmarks/throughput.py --model mae_vit_large_patch16 --img-size 224 \
  --in-chans 3 --batch-size 128 --variants ours-compiled,hf-eager --steps 20 --json "$out/throughput_vit_l.json"
# 5. the GPU tests (bf16, compile, CUDA graphs, nvJPEG decode, prefetching under CUDA graphs)
step test_gpu 70 "$py" -m pytest -q -m gpu tests/test_gpu.py tests/test_device_input.py tests/test_predecoded.py

# the device tool brings back at most 8 files: the logs go back as one
for name in throughput_vit_b input_pipeline profile_vit_b throughput_vit_l test_gpu; do
  { echo "==================== $name"; cat "$out/$name.log"; } >> "$out/logs.txt" && rm -f "$out/$name.log"
done
for name in throughput_vit_b input_pipeline profile_vit_b throughput_vit_l test_gpu; do
  echo "---- $name"
  sed -n "/^==================== $name\$/,/^====================/p" "$out/logs.txt" | grep -v '^====================' \
    | tail -n "$([ "$name" = profile_vit_b ] && echo 32 || echo 12)"
done
