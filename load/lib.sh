# Shared by the load scripts: a demo PKI, the demo origin and an edge config in a temp dir.
# Everything listens on 127.0.0.1 only; `cleanup` (installed as the EXIT trap) stops it all.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
cargo build --release --locked -q
BIN=${BIN:-$PWD/target/release/mtls-edge}
D=$(mktemp -d)
PIDS=()
# TCP congestion control, the host's for both servers: it weighs on large objects (see "BBR's
# pacing timers" in load/README.md). TCP_CC=cubic (root) sets it for the run, restored at exit.
CC_HOST=$(cat /proc/sys/net/ipv4/tcp_congestion_control 2>/dev/null || echo unknown)
if [ -n "${TCP_CC:-}" ] && [ "$TCP_CC" != "$CC_HOST" ]; then
  echo "$TCP_CC" > /proc/sys/net/ipv4/tcp_congestion_control || { echo "TCP_CC=$TCP_CC: cannot set it (root?)" >&2; exit 1; }
  CC_RESTORE=$CC_HOST
fi
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  [ -f "$D/nginx.pid" ] && kill "$(cat "$D/nginx.pid")" 2>/dev/null
  [ -n "${CC_RESTORE:-}" ] && echo "$CC_RESTORE" > /proc/sys/net/ipv4/tcp_congestion_control
  rm -rf "$D"
}
trap cleanup EXIT


wait_port() { for _ in $(seq 1000); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.01; done; echo "port $1 not up" >&2; exit 1; }

# The demo writes the PKI (device, edge server/client, origin server, CAs, CRLs).
timeout 5 "$BIN" demo --dir "$D" >/dev/null 2>&1 || true
cat "$D/device.pem" "$D/device.key" > "$D/ab-client.pem"

start_origin() {
  "$BIN" origin --listen 127.0.0.1:9443 --cert "$D/origin-server.pem" --key "$D/origin-server.key" \
    --client-ca "$D/edge-ca.pem" >"$D/origin.log" 2>&1 &
  ORIGIN=$!
  PIDS+=("$ORIGIN")
  wait_port 9443
}

# start_edge THREADS [CACHE_MAX_BYTES [MAX_OBJECT_BYTES]]: the edge on 8443 with /files/ cached.
# EDGE_PORT, ADMIN_PORT and EXTRA_YAML (appended to the config) start a second, different edge;
# CACHE_YAML replaces the cache section's value; DEVICE_CAS and DEVICE_CRLS the device trust
# store's files (comma-separated).
start_edge() {
  local threads=$1 max=${2:-1073741824} obj=${3:-134217728}
  local port=${EDGE_PORT:-8443} admin=${ADMIN_PORT:-9100}
  local cache=${CACHE_YAML:-"{ max_bytes: $max, max_object_bytes: $obj, lock_timeout_secs: 60 }"}
  cat > "$D/edge-$port.yaml" <<YAML
server: { threads: $threads, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 0, pid_file: $D/edge-$port.pid, upgrade_sock: $D/edge-$port.sock }
listeners:
  - { address: 127.0.0.1:$port, server_cert: edge-server.pem, server_key: edge-server.key, mtls: { mode: required, trust_store: devices } }
trust_stores:
  devices: { ca_files: [${DEVICE_CAS:-device-ca.pem}], crl_files: [${DEVICE_CRLS:-device-crl.pem}] }
origins:
  files: { address: 127.0.0.1:9443, sni: origin.internal, ca_file: origin-ca.pem, client_cert: edge-client.pem, client_key: edge-client.key }
routes:
  - { path_prefix: /files/, origin: files, cache: { default_ttl_secs: 3600 } }
  - { path_prefix: /, origin: files }
cache: $cache
admin: { address: 127.0.0.1:$admin }
${EXTRA_YAML:-}
YAML
  RUST_LOG=${RUST_LOG:-warn} ${EDGE_CPU:+taskset -c $EDGE_CPU} "$BIN" -c "$D/edge-$port.yaml" >"$D/edge-$port.log" 2>&1 &
  EDGE=$!
  PIDS+=("$EDGE")
  wait_port "$port"
}

# stop_edge / stop_nginx: stop what start_edge / nginx -c started, to start it again with other
# settings (the worker count).
stop_edge() { [ -n "${EDGE:-}" ] || return 0; kill "$EDGE" 2>/dev/null || true; wait "$EDGE" 2>/dev/null || true; }
stop_nginx() {
  local pid; pid=$(cat "$D/nginx.pid" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || true
  while kill -0 "$pid" 2>/dev/null; do sleep 0.05; done
}

# h2_get PORT PATH N USERS: k6 (Go's HTTP/2, one connection per virtual user, the device's
# certificate) sends N GETs of PATH, each required to be a 200 over HTTP/2; its summary goes to
# $D/h2.json. h2load cannot present a client certificate.
cat > "$D/h2.js" <<'JS'
import http from 'k6/http';
export const options = {
  scenarios: { get: { executor: 'shared-iterations', vus: Number(__ENV.VUS), iterations: Number(__ENV.N), maxDuration: '300s' } },
  insecureSkipTLSVerify: true,
  tlsAuth: [{ domains: ['localhost'], cert: open(__ENV.CERT), key: open(__ENV.KEY) }],
};
export default function () {
  const r = http.get(`https://localhost:${__ENV.PORT}${__ENV.OBJ}`, { responseType: 'none' });
  if (r.status !== 200 || r.proto !== 'HTTP/2.0') { throw new Error(`status ${r.status} ${r.proto}`); }
}
JS
h2_get() {
  PORT=$1 OBJ=$2 N=$3 VUS=$4 CERT=$D/device.pem KEY=$D/device.key \
    k6 run -q --no-color --summary-export "$D/h2.json" "$D/h2.js" >/dev/null 2>&1 || true
}

# ticks PID...: user+system CPU of the processes, in clock ticks (HZ per second).
ticks() { local t=0; for p in "$@"; do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat" 2>/dev/null || echo 0))); done; echo $t; }
HZ=$(getconf CLK_TCK)
# nginx_pids: nginx's master and workers (after nginx was started with pid $D/nginx.pid).
nginx_pids() { echo "$(cat "$D/nginx.pid") $(pgrep -P "$(cat "$D/nginx.pid")" | tr '\n' ' ')"; }

# The same access line as the edge's (JSON, the same fields), buffered as the edge buffers its
# own (64 KiB or 100 ms): logging every request is part of the job. ACCESS_LOG=off for a script
# whose edge logs none.
nginx_access_log() {
  [ "${ACCESS_LOG:-on}" = off ] && { echo "  access_log off;"; return; }
  cat <<NGINX
  log_format edge escape=json '{"time":"\$time_iso8601","level":"info","log":"access","listener":"\$server_addr:\$server_port",'
    '"client_ip":"\$remote_addr","sni":"\$ssl_server_name","cert_serial":"\$ssl_client_serial","cert_subject":"\$ssl_client_s_dn",'
    '"protocol":"\$server_protocol","method":"\$request_method","host":"\$host","path":"\$uri","status":\$status,'
    '"bytes_sent":\$body_bytes_sent,"cache":"\$upstream_cache_status","origin":"\$upstream_addr",'
    '"origin_ms":"\$upstream_response_time","duration_ms":\$request_time,"rules":[],"answered":null}';
  access_log $D/nginx-access.log edge buffer=64k flush=100ms;
NGINX
}

# The start of every nginx.conf here: NGINX_WORKERS workers (default 1), files in $D, the access
# log above (an open http block); the error log at LEVEL (default warn).
nginx_prelude() {
  cat <<NGINX
worker_processes ${NGINX_WORKERS:-1};
pid $D/nginx.pid;
error_log $D/nginx-error.log ${1:-warn};
events { worker_connections 1024; }
http {
$(nginx_access_log)
NGINX
}

# nginx directives for the same viewer mTLS as the edge, and for origin mTLS to the same origin.
nginx_viewer_tls() {
  cat <<NGINX
    ssl_protocols TLSv1.2 TLSv1.3;   # nginx 1.22's default has no TLS 1.3
    ssl_certificate $D/edge-server.pem;
    ssl_certificate_key $D/edge-server.key;
    ssl_client_certificate $D/${NGINX_CA:-device-ca.pem};
    ssl_crl $D/${NGINX_CRL:-device-crl.pem};
    ssl_verify_client on;
    ssl_verify_depth 2;
NGINX
}
nginx_origin_tls() {
  cat <<NGINX
      proxy_pass https://origin;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_ssl_certificate $D/edge-client.pem;
      proxy_ssl_certificate_key $D/edge-client.key;
      proxy_ssl_trusted_certificate $D/origin-ca.pem;
      proxy_ssl_verify on;
      proxy_ssl_name origin.internal;
      proxy_ssl_server_name on;
NGINX
}

# start_nginx_proxy WORKERS CONNECTIONS [SERVER_LINES]: nginx on 8444 doing the edge's job (viewer
# mTLS, every path proxied to the origin over origin mTLS), SERVER_LINES in its server block.
start_nginx_proxy() {
  cat > "$D/nginx.conf" <<NGINX
worker_processes $1;
worker_rlimit_nofile 65536;
pid $D/nginx.pid;
error_log $D/nginx-error.log crit;
events { worker_connections $2; }
http {
$(nginx_access_log)
  upstream origin { server 127.0.0.1:9443; keepalive 32; }
  server {
    listen 127.0.0.1:8444 ssl;
$(nginx_viewer_tls)
${3:-}
    location / {
$(nginx_origin_tls)
    }
  }
}
NGINX
  nginx -c "$D/nginx.conf"
  wait_port 8444
}

# origin_count PATH: how many requests for PATH reached the origin.
origin_count() {
  curl -sS --cacert "$D/origin-ca.pem" --cert "$D/edge-client.pem" --key "$D/edge-client.key" \
    --resolve origin.internal:9443:127.0.0.1 "https://origin.internal:9443/__origin/count?path=$1"
}

# The crypto floors of this CPU, for issue 15's goals, measured with openssl speed in the run:
#   aes_floor: ms of AES-128-GCM per MiB, at 16 KiB (a TLS record);
#   handshake_floor: ms of one mTLS handshake's public-key work (one P-256 sign, three
#   verifies: the client's CertificateVerify and its two-certificate chain, one P-256 ECDH).
aes_floor() {
  openssl speed -evp aes-128-gcm -bytes 16384 -seconds 2 2>/dev/null \
    | awk '/^AES-128-GCM/ { sub(/k$/, "", $2); printf "%.3f\n", 1048576 / ($2 * 1000) * 1000 }'
}
handshake_floor() {
  openssl speed -seconds 2 ecdsap256 ecdhp256 2>/dev/null | awk '
    /ecdsa \(nistp256\)/ { sign = $(NF - 1); verify = $NF }
    /ecdh \(nistp256\)/ { ecdh = $NF }
    END { printf "%.3f\n", (1 / sign + 3 / verify + 1 / ecdh) * 1000 }'
}
