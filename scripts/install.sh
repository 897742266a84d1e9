#!/usr/bin/env bash
# Installs everything backmix needs on a fresh Debian/Ubuntu machine with Python 3.10+:
# system libraries for FFCV, PyTorch, then the project itself with its extras.
# Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO=sudo; fi

need_apt=0
# iproute2: `ss`, with which the tests check that a local Ray listens on loopback only
for pkg in libopencv-dev libturbojpeg0-dev pkg-config iproute2; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt=1
done
if [ "$need_apt" = 1 ]; then
  echo "install: apt packages for FFCV and the tests (libopencv-dev libturbojpeg0-dev pkg-config iproute2)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libopencv-dev libturbojpeg0-dev pkg-config iproute2 >/dev/null
fi

echo "install: torch and torchvision"
$PY -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
echo "install: backmix with every optional backend (DALI, FFCV, Ray) and the test tools"
$PY -m pip install -q --disable-pip-version-check -e '.[all,test]'
echo "install: done ($($PY -c 'import torch, nvidia.dali as d; print("torch", torch.__version__, "dali", d.__version__)'))"
