#!/usr/bin/env bash
# Installs napari-unet into ./.venv on a fresh Debian/Ubuntu machine.
#   bash scripts/install.sh           -> the plugin with PyQt5 (to run napari)
#   bash scripts/install.sh testing   -> plus what the test suite needs
set -euo pipefail
cd "$(dirname "$0")/.."
extra="${1:-pyqt5}"

# Qt's xcb platform and a virtual X server (for headless machines and the tests).
X_PACKAGES="xvfb xauth libgl1 libegl1 libglib2.0-0 libfontconfig1 libdbus-1-3 libxkbcommon0 \
  libxkbcommon-x11-0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 libxcb-randr0 libxcb-render-util0 \
  libxcb-xinerama0 libxcb-xfixes0 libxcb-shape0 libxcb-cursor0"
if command -v apt-get >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  # shellcheck disable=SC2086
  if ! dpkg -s $X_PACKAGES >/dev/null 2>&1; then
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $X_PACKAGES >/dev/null
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: on this machine that is a CPU wheel already on disk (any other spec may pull
# a multi-GB CUDA build). Elsewhere pip picks the right wheel for the platform.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[${extra}]"
if [ "$extra" = testing ]; then
  # the official bioimage.io validator, for the package tests. bioimageio.core 0.11 pins
  # bioimageio.spec 0.5.12, which cannot build a model description under pydantic 2.14 (a serializer
  # TypeError); core 0.11 runs fine beside spec 0.5.14, so it is installed without its pin.
  .venv/bin/python -m pip install -q --no-deps "bioimageio.core==0.11.0"
  .venv/bin/python -m pip install -q xarray imagecodecs
fi
echo "napari-unet installed in $(pwd)/.venv"
