#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a CUDA machine (e.g. the device tool's H100/H200):
#   1. build the csrc/ extension with its CUDA kernels;
#   2. the kernel tests on CUDA (Triton kernels natively, the extension's CUDA ops, dispatch);
#   3. the kernel benchmarks on CUDA (bandwidth against the measured copy ceiling, top-k vs
#      torch.topk(q @ g.T) at G = 1,000,000);
#   4. itm-bench on sd21-arch / sd15-arch across dtype, attention, compile and batch options
#      (each run checks engine == naive == batched on the same noise and fails loudly otherwise);
#   5. every other family's exact architecture in bf16 (SDXL, SD3, SD3.5, Flux, PixArt): items/s
#      and the fraction of the bf16 matmul ceiling, engine == the family's pipeline loop.
# Usage: bash benchmarks/gpu_run.sh OUTDIR [quick|full]
#   device tool: carry .whl (from benchmarks/fetch_gpu_wheels.sh) and run
#   `bash benchmarks/gpu_run.sh $OUT full`; then copy OUTDIR's files to benchmarks/results/.
set -uo pipefail
OUT=${1:?usage: gpu_run.sh OUTDIR [quick|full]}
LEVEL=${2:-full}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"

echo "== 1. build"
TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" ITM_BUILD_CUDA=1 python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; exit 1; }

echo "== 2. kernel tests on CUDA"
python3 -m pytest -q -p no:cacheprovider tests/test_triton.py tests/test_extension.py tests/test_kernels_dispatch.py 2>&1 | tee "$OUT/gpu-tests.log" | tail -5

echo "== 3. kernel benchmarks"
python3 -m pytest -q -p no:cacheprovider benchmarks/test_kernels.py --benchmark-enable --benchmark-json="$OUT/kernels-cuda.json" > "$OUT/kernels-bench.log" 2>&1
python3 benchmarks/summarize.py "$OUT/kernels-cuda.json" | tee "$OUT/kernels-cuda.txt"

echo "== 4. itm-bench"
bench() {  # name, then itm-bench options
    local name=$1; shift
    python3 -m itm_engine.bench --device cuda "$@" --json "$OUT/itm-bench-$name.json" > "$OUT/itm-bench-$name.log" 2>&1
    echo "$name: exit $? $(grep -E '^engine|agree' "$OUT/itm-bench-$name.log" | tr -s ' ' | head -2 | tr '\n' ' ')"
}
TOPK="--workload i2t-topk --images 8 --topk 10 --samples 10 --repeats 3"
bench sd21-bf16 --model sd21-arch --dtype bfloat16 $TOPK --batch-size auto --batch-sweep 8,16,32,64,128,256 --plot "$OUT/itm-bench-sd21-bf16.png"
if [ "$LEVEL" = full ]; then
    ENGINE_ONLY="--methods batched,engine"
    bench sd21-bf16-compile --model sd21-arch --dtype bfloat16 $TOPK $ENGINE_ONLY --batch-size 128 --compile --channels-last
    bench sd21-bf16-graphs --model sd21-arch --dtype bfloat16 $TOPK $ENGINE_ONLY --batch-size 128 --cuda-graphs
    bench sd21-fp16-math --model sd21-arch --dtype float16 $TOPK $ENGINE_ONLY --batch-size 64 --attention math
    bench sd21-fp32 --model sd21-arch --dtype float32 $TOPK $ENGINE_ONLY --batch-size 64
    bench sd21-t2i-bf16 --model sd21-arch --dtype bfloat16 --workload t2i-topk --images 40 --texts 8 --topk 10 --samples 10 --repeats 3 $ENGINE_ONLY --batch-size auto
    bench sd21-bf16-engine-protocol --model sd21-arch --dtype bfloat16 $TOPK $ENGINE_ONLY --protocol engine --batch-size 128
    bench sd15-bf16 --model sd15-arch --dtype bfloat16 $TOPK --batch-size auto
fi

echo "== 5. every family's exact architecture, bf16"
FAMILY="--workload i2t-topk --images 2 --topk 4 --samples 4 --repeats 2 --methods pipeline,engine --batch-size auto"
for arch in sdxl-arch sd3-medium-arch sd35-medium-arch pixart-sigma-arch flux-dev-arch; do
    bench "$arch-bf16" --model "$arch" --dtype bfloat16 $FAMILY
done
ls -la "$OUT"
