#!/usr/bin/env bash
# One-step set-up: a virtual environment in .venv with the library and its test tools, a tiny
# random-weight model in tiny-llama/, and a first chat run on it (random text: the weights are random).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -d .venv ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first and pinned: an unpinned torch pulled in by another package can be a multi-GB CUDA build.
# TORCH_SPEC=torch to take your platform's default build instead (e.g. CUDA on a GPU machine).
python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
python -m pip install -q -e ".[test]"
# The real Llama 3 and Llama 2-style tokenizer files that the tests use ship in these packages.
python -m pip install -q --no-deps llama-models mistral-common
python -m llama.tiny --out_dir tiny-llama
python example_chat_completion.py --ckpt_dir tiny-llama --tokenizer_path tiny-llama/tokenizer.model --max_gen_len 16

echo
echo "Set up. The README's commands use this environment's python and torchrun: activate it first with"
echo "  source .venv/bin/activate"
