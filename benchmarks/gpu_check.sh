#!/usr/bin/env bash
# Issue 5's GPU figures and GPU tests in prepared calls to a one-GPU machine (H100 or H200),
# written for this project's `device` tool (15 minutes of device time a session, start included):
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=600)          # the goals (about 9.5 min)
#   run(command="bash benchmarks/gpu_check.sh tests", timeout_s=330)    # at once after it, while warm
#   run(command="bash benchmarks/gpu_check.sh speed", timeout_s=600)    # what might make the step faster
#   run(command="bash benchmarks/gpu_check.sh autotune", timeout_s=600) # max-autotune; RandAugment input
#   run(command="bash benchmarks/gpu_check.sh more", timeout_s=600)     # fine-tuning's step, batch 512
# (the step limits of goals add up to 550 s, of tests 285 s, of speed 550 s, of autotune 290 s, of more
# 470 s, plus at most 30 s for machine.txt, so the summary and logs.txt are written even if every step
# runs to its limit; the limits are sized from the first H200 run, 2026-11-30, BENCHMARKS.md, where the
# goals took 541 s and the tests 234 s: two sets fit one session's 900 s only when they run short of their
# limits and the machine starts fast (about 30 s then). Since the goals were measured once, speed is the
# set to run first: the step is short of its goal)
# It needs nothing beyond the GPU image's torch, torchvision, timm, transformers, pytest
# (no Ray, no dataset). Each step has its own time limit, so a slow one cannot starve the
# rest; steps run in order of importance. Results go to $OUT (the device tool's folder),
# else results/gpu_check/: machine.txt, JSON per benchmark and logs.txt (at most 7 files); the summary comes last.
set -u
set_name=${1:-goals}
case $set_name in goals|tests|speed|autotune|more) ;; *) echo "usage: bash benchmarks/gpu_check.sh [goals|tests|speed|autotune|more]" >&2; exit 2 ;; esac
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

if [ "$set_name" = goals ]; then
names="throughput_vit_b throughput_vit_l input_pipeline profile_vit_b"
# 1. ViT-B/16: ours compiled and eager vs HF eager, then the loss-curve check (bf16 compiled vs fp32 eager,
#    with bf16 eager on the same batches and masks as the noise yardstick); JSON after every timed round and
#    every 10 check steps (on the H200: 71 s of compile, about 220 s in all)
step throughput_vit_b 235 "$py" benchmarks/throughput.py --model mae_vit_base_patch16 --img-size 224 \
  --in-chans 3 --batch-size 256 --variants ours-compiled,ours-eager,hf-eager --check-steps 200 \
  --json "$out/throughput_vit_b.json"
# 2. ViT-L/16 at batch 128 (a cold compile: its shapes are new; 125 s did not reach a timed round on the H200)
step throughput_vit_l 200 "$py" benchmarks/throughput.py --model mae_vit_large_patch16 --img-size 224 \
  --in-chans 3 --batch-size 128 --variants ours-compiled,hf-eager --steps 20 --json "$out/throughput_vit_l.json"
# 3. JPEG input: a pre-decoded store and GPU decode, then PIL workers (all three prefetched on a side stream,
#    as the engine does on CUDA), alone and feeding the compiled ViT-B step (step 1's graph, from Inductor's
#    cache; 70 s on the H200)
step input_pipeline 80 "$py" benchmarks/input_pipeline.py --num-images 4096 --model mae_vit_base_patch16 \
  --img-size 224 --batch-size 256 --workers 16 --steps 30 --input-batches 30 --warmup 10 --compile \
  --arms predecoded+prefetch,device+prefetch,cpu+prefetch --json "$out/input_pipeline.json"
# 4. where the compiled ViT-B step's time goes (kernel categories, GPU busy fraction): what to fix if 1 falls short
step profile_vit_b 35 "$py" benchmarks/profile_step.py --model mae_vit_base_patch16 --img-size 224 --in-chans 3 \
  --batch-size 256 --compile --top 20 --json "$out/profile_vit_b.json"
elif [ "$set_name" = tests ]; then
names="test_gpu"
# the GPU tests (bf16, compile, CUDA graphs, nvJPEG decode, prefetching under CUDA graphs; 234 s on the H200,
# most of it compiling); -v names each test as it starts, so a cut-off log still says which ran
step test_gpu 285 "$py" -m pytest -v -rA --durations=0 -m gpu tests/test_gpu.py tests/test_device_input.py \
  tests/test_predecoded.py
elif [ "$set_name" = speed ]; then
names="attention_vit_b step_vit_b sdpa_flash sdpa_efficient"
# 1. attention alone at the ViT-B step's shapes, forward and backward, per kernel: cuDNN (torch's choice on
#    Hopper: 8.2 ms of a 55 ms step on the H200 for 4% of its FLOPs), flash, memory-efficient, flex_attention,
#    and the decoder's 32-dim heads padded to 64; no model compile (flex_attention compiles, the others do not)
step attention_vit_b 100 "$py" benchmarks/attention.py --model mae_vit_base_patch16 --img-size 224 --batch-size 256 \
  --json "$out/attention_vit_b.json"
# 2. the step as it is now (the encoder embeds only its visible patches since the first H200 run) and replayed as
#    CUDA graphs (9% of that step's GPU time was idle); each a cold compile (the compile mode is part of
#    Inductor's cache key), HF eager as the yardstick
step step_vit_b 210 "$py" benchmarks/throughput.py --model mae_vit_base_patch16 --img-size 224 --in-chans 3 \
  --batch-size 256 --variants ours-compiled,ours-graphs,hf-eager --steps 20 --json "$out/step_vit_b.json"
# 3-4. the whole step with each other attention kernel family (1 says which might pay)
step sdpa_flash 120 "$py" benchmarks/throughput.py --model mae_vit_base_patch16 --img-size 224 --in-chans 3 \
  --batch-size 256 --variants ours-compiled,hf-eager --sdpa flash --steps 20 --json "$out/sdpa_flash.json"
step sdpa_efficient 120 "$py" benchmarks/throughput.py --model mae_vit_base_patch16 --img-size 224 --in-chans 3 \
  --batch-size 256 --variants ours-compiled,hf-eager --sdpa efficient --steps 20 --json "$out/sdpa_efficient.json"
elif [ "$set_name" = autotune ]; then
names="autotune_vit_b input_randaug"
# 1. the ViT-B step under Inductor's max-autotune without CUDA graphs (its matmul templates can fuse the
#    pointwise work around them: 16 ms of the H200's 55 ms step); a cold compile with autotuning
step autotune_vit_b 190 "$py" benchmarks/throughput.py --model mae_vit_base_patch16 --img-size 224 --in-chans 3 \
  --batch-size 256 --variants ours-autotune,hf-eager --steps 20 --json "$out/autotune_vit_b.json"
# 2. fine-tuning's CPU input (RandAugment in 16 workers) against plain crops: read the input column
step input_randaug 100 "$py" benchmarks/input_pipeline.py --num-images 4096 --model mae_vit_base_patch16 \
  --img-size 224 --batch-size 256 --workers 16 --steps 10 --input-batches 30 --arms cpu+randaug,cpu \
  --json "$out/input_randaug.json"
else
names="finetune_vit_b finetune_vit_l throughput_b512_graphs"
# 1-2. fine-tuning's step (random erasing, mixup/cutmix, forward, backward, fused AdamW over layer-decayed
#      groups), eager and compiled, ViT-B/16 and ViT-L/16 at 224, batch 128, 1000 classes; one process each
step finetune_vit_b 150 "$py" benchmarks/finetune_step.py --model mae_vit_base_patch16 --img-size 224 --in-chans 3 \
  --batch-size 128 --classes 1000 --json "$out/finetune_vit_b.json"
step finetune_vit_l 170 "$py" benchmarks/finetune_step.py --model mae_vit_large_patch16 --img-size 224 --in-chans 3 \
  --batch-size 128 --classes 1000 --json "$out/finetune_vit_l.json"
# 3. the pretraining step at batch 512 (the other anchor) replayed as CUDA graphs, against HF eager
step throughput_b512_graphs 150 "$py" benchmarks/throughput.py --model mae_vit_base_patch16 --img-size 224 \
  --in-chans 3 --batch-size 512 --variants ours-compiled,hf-eager --compile-mode reduce-overhead --steps 20 \
  --json "$out/throughput_b512_graphs.json"
fi

# the device tool brings back at most 8 files: the logs go back as one
for name in $names; do
  { echo "==================== $name"; cat "$out/$name.log"; } >> "$out/logs.txt" && rm -f "$out/$name.log"
done
for name in $names; do  # (torch's profiler logs "USDT:" lines on stderr: not in the summary)
  echo "---- $name"
  sed -n "/^==================== $name\$/,/^====================/p" "$out/logs.txt" | grep -v -e '^====================' -e '^USDT:' \
    | tail -n "$(case $name in profile_vit_b|attention_vit_b) echo 32 ;; *) echo 12 ;; esac)"
done
