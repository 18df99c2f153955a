#!/usr/bin/env bash
# Install the project and everything it needs into the active Python (use a venv).
#
#   python3.11 -m venv .venv && . .venv/bin/activate && bash scripts/install.sh
#
# Why two steps: fairseq comes from `fairseq-fixed` (upstream fairseq 0.12.2 does
# not import on Python 3.11), which compiles C++/Cython extensions against the
# installed torch. So torch is installed first, with the pinned versions, and the
# project (with fairseq-fixed) is then built with --no-build-isolation, against it.
# Set EXTRAS to install fewer extras (default: all = fairseq, timm, robustness, graph (PyTorch Geometric),
# transformers, dev).
# torchattacks (the robustness extra: el-analyze --attack, timm-el-train --adv-train) is installed with
# --no-deps: its metadata pins requests~=2.25.1, which would downgrade idna below what huggingface_hub needs,
# and it never imports requests (setup.py's robustness extra lists what it does import).
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${EXTRAS:-all}"
TORCH="${TORCH:-torch==2.14.1 torchvision==0.29.1}"
python -m pip install --upgrade pip
# shellcheck disable=SC2086
python -m pip install $TORCH numpy cython wheel "setuptools>=64"
python -m pip install --no-build-isolation -e ".[${EXTRAS}]"
case ",$EXTRAS," in
  *,all,*|*,robustness,*) python -m pip install --no-deps "torchattacks==3.5.1" ;;
esac
python -c "import encouraging_loss, torch; print('encouraging_loss', encouraging_loss.__version__, 'torch', torch.__version__)"
