#!/bin/sh
# What both images need from the distribution: Python (the virtual environment's python is a link to
# this interpreter), the libraries the opencv-python wheel links against (libgl1, glib, libsm6, libxext6:
# it is the one OpenCV the face detector's package allows; the -headless build needs none of them), and
# the service's user, numeric so a host or an orchestrator can tell it is not root.
# Distribution packages are not version-pinned: the base image's tag fixes the release.
set -eu
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends python3 python3-venv libgl1 libglib2.0-0t64 libsm6 libxext6
rm -rf /var/lib/apt/lists/*
groupadd --gid 10001 fer
useradd --create-home --uid 10001 --gid fer fer
mkdir -p /app/weights
chown fer:fer /app/weights
