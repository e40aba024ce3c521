#!/usr/bin/env bash
# One-command set-up of sclatent from this clone, into the active Python environment:
#   bash install.sh            # the package and its test tools (extra "dev")
#   bash install.sh bench      # any extras, comma-separated: dev,bench,gtf
# A torch that is already installed is kept (any torch>=2.2 works). Without one, the CPU
# build torch==2.13.0 is installed first: a bare torch requirement can pull a multi-GB
# CUDA build. For a GPU build, install the torch of your choice first, then run this.
set -euo pipefail
cd "$(dirname "$0")"
extras="${1:-dev}"
python -m pip install -q --upgrade pip
if python -c "import torch" 2>/dev/null; then
  echo "install.sh: keeping torch $(python -c 'import torch; print(torch.__version__)')"
else
  echo "install.sh: no torch found; installing the CPU build torch==2.13.0"
  python -m pip install -q torch==2.13.0
fi
python -m pip install -q -e ".[${extras}]"
python -c "import sclatent, torch; print(f'install.sh: sclatent {sclatent.__version__} with torch {torch.__version__}')"
