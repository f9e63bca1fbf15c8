#!/usr/bin/env bash
# What only a CUDA GPU can show, in one go: the CUDA tests (the Triton kernels compiled for the GPU, the
# model against transformers there, CUDA graphs and the other fast paths), the kernel benchmark, and
# generation speed on the Llama 3 8B shape. Run from the repository root; logs go to $LOGS (default: .).
#   bash benchmarks/gpu_checks.sh [tests] [generate] [int8] [kernels]   (default: all four)
set -uo pipefail
logs=${LOGS:-.}
export PYTHONUNBUFFERED=1
python3 -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name())'
for step in ${*:-tests generate int8 kernels}; do
  case $step in
    tests) timeout 270 python3 -m pytest tests/test_cuda.py tests/kernels -q -rfE -p no:cacheprovider \
             2>&1 | tee "$logs/tests.log" | tail -25 ;;
    # (torch.compile of the 8B step took 175 s on an H100; CUDA graphs are the GPU's fast path)
    generate) timeout 200 python3 benchmarks/bench_generate.py --model llama3-8b --batch_sizes 1,4 \
                --systems ours,graphs,hf,generate 2>&1 | tee "$logs/bench_generate.txt" ;;
    int8) timeout 150 python3 benchmarks/bench_generate.py --model llama3-8b --batch_sizes 1 \
            --systems ours,int8,int8+graphs,int8+compiled 2>&1 | tee "$logs/bench_generate_int8.txt" ;;
    kernels) timeout 240 python3 benchmarks/bench_kernels.py 2>&1 | tee "$logs/bench_kernels.md" ;;
    *) echo "unknown step $step: use tests, generate, int8 or kernels" >&2; exit 2 ;;
  esac
done
