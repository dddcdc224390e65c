#!/usr/bin/env bash
# Install the optional mmsegmentation backend of the artifact detector (extra `mmseg`) into the
# active environment. mmsegmentation 1.2.2 asserts mmcv < 2.2.0, and mmcv 2.1.0 has no wheels
# for recent torch, so it is built from source (about 7 minutes on 2 cores, CPU ops only).
# mmcv 2.1.0's setup.py compiles with -std=c++17, but torch >= 2.10 headers need C++20: the
# flag is patched before building. Tested with torch 2.14.1, Python 3.11, gcc 12.
#   pipelines/install_mmseg.sh
# Then: raim mask ... --segmenter mmseg:CONFIG.py:CHECKPOINT.pth
set -euo pipefail
python -m pip install "setuptools<70" wheel ninja psutil
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python -m pip download --no-deps --no-build-isolation --no-binary :all: "mmcv==2.1.0" -d "$work"
tar -xzf "$work"/mmcv-2.1.0.tar.gz -C "$work"
if python -c 'import torch, sys; v = tuple(int(p) for p in torch.__version__.split(".")[:2]); sys.exit(v < (2, 10))'; then
  sed -i "s/'-std=c++17'/'-std=c++20'/g" "$work"/mmcv-2.1.0/setup.py
fi
MAX_JOBS=${MAX_JOBS:-2} MMCV_WITH_OPS=1 python -m pip install --no-build-isolation "$work"/mmcv-2.1.0
python -m pip install "mmsegmentation==1.2.2" "mmengine>=0.10" ftfy regex
python -c 'import mmcv, mmseg; print("mmcv", mmcv.__version__, "mmseg", mmseg.__version__)'
