#!/usr/bin/env bash
# Reloads under load, mtls-edge against nginx `-s reload` doing the same job (1 and then 2
# workers each, WORKERS="1 2 4" for more; viewer mTLS with a CRL, a cached route to the same
# mTLS origin):
#  1. load from a valid device, ab over new connections (TLS 1.2) and ab -k over keep-alive at once:
#     20 s without reloads, then 60 s with a reload every 2 s that cycles through a CRL update,
#     a server certificate rotation and a rule change (nginx: an included snippet). Reported:
#     failed requests, requests per second with and without reloads, RSS along the run;
#  2. revocation (at the last worker count): 20 times, the time from a CRL write to the revoked device's first refusal (on
#     its open keep-alive connection, or on a new one when the server closed that): the edge by
#     its file watch, the edge by SIGHUP, nginx by `-s reload`.
#   load/reload.sh [seconds-with-reloads] [tries]
source "$(dirname "$0")/lib.sh"
ACCESS_LOG=off # neither server logs requests here: the edge has access_log: false below
RELOAD_SECONDS=${1:-60}
TRIES=${2:-20}
WORKERS=${WORKERS:-1 2}
command -v ab >/dev/null && command -v nginx >/dev/null || { echo "needs ab (apache2-utils) and nginx" >&2; exit 1; }
python3 -c "import cryptography" 2>/dev/null || python3 -m pip install -q cryptography
python3 load/reload.py pki "$D"
cp "$D/server-a.pem" "$D/server.pem"; cp "$D/server-a.key" "$D/server.key"
mkdir -p "$D/rules"
rule() { # the rule file, version $1 (edge) and the nginx snippet
  printf 'rules:\n  - { name: tag, phase: request, set_headers: { X-Rule: %s } }\n' "'\"v$1\"'" > "$D/rules/r.yaml.tmp"
  mv "$D/rules/r.yaml.tmp" "$D/rules/r.yaml"
  printf 'proxy_set_header X-Rule "v%s";\n' "$1" > "$D/rule.conf.tmp"; mv "$D/rule.conf.tmp" "$D/rule.conf"
}
rule 0
start_origin

URL=/files/small.bin?size=1024
start_servers() { # workers: the edge and nginx, both answering
  local workers=$1
  cat > "$D/reload-edge.yaml" <<YAML
server: { threads: $workers, grace_period_seconds: 0, graceful_shutdown_timeout_seconds: 0, pid_file: $D/edge.pid, upgrade_sock: $D/edge.sock }
listeners:
  - { address: 127.0.0.1:8443, server_cert: server.pem, server_key: server.key, mtls: { mode: required, trust_store: devices } }
trust_stores:
  devices: { ca_files: [bench-ca.pem], crl_files: [bench-crl.pem] }
origins:
  files: { address: 127.0.0.1:9443, sni: origin.internal, ca_file: origin-ca.pem, client_cert: edge-client.pem, client_key: edge-client.key }
routes:
  - { path_prefix: /files/, origin: files, cache: { default_ttl_secs: 3600 } }
  - { path_prefix: /, origin: files }
cache: { max_bytes: 268435456, max_object_bytes: 16777216 }
admin: { address: 127.0.0.1:9100 }
rules: { dir: rules }
logging: { access_log: false }
YAML
  RUST_LOG=warn "$BIN" -c "$D/reload-edge.yaml" >"$D/edge.log" 2>&1 &
  EDGE=$!
  PIDS+=("$EDGE")
  wait_port 8443

  chmod 755 "$D" && mkdir -p "$D/nginx-cache" && chmod 777 "$D/nginx-cache"
  cat > "$D/nginx.conf" <<NGINX
$(NGINX_WORKERS=$workers nginx_prelude)
  proxy_cache_path $D/nginx-cache keys_zone=fw:10m max_size=1g inactive=1h use_temp_path=off;
  upstream origin { server 127.0.0.1:9443; keepalive 32; }
  server {
    listen 127.0.0.1:8444 ssl;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate $D/server.pem;
    ssl_certificate_key $D/server.key;
    ssl_client_certificate $D/bench-ca.pem;
    ssl_crl $D/bench-crl.pem;
    ssl_verify_client on;
    ssl_verify_depth 1;
    keepalive_requests 1000000;
    location /files/ {
      proxy_cache fw;
      proxy_cache_key \$host\$request_uri;
      proxy_cache_lock on;
      proxy_cache_valid 200 1h;
      include $D/rule.conf;
$(nginx_origin_tls)
    }
  }
}
NGINX
  nginx -c "$D/nginx.conf" -e "$D/nginx-error.log" 2>/dev/null
  wait_port 8444

  for port in 8443 8444; do
    code=$(curl -sS -o /dev/null -w '%{http_code}' --insecure --cert "$D/good.pem" --key "$D/good.key" "https://localhost:$port$URL")
    [ "$code" = 200 ] || { echo "port $port answered $code" >&2; exit 1; }
  done
}

rss_kib() { local t=0; for p in "$@"; do t=$((t + $(awk '/^VmRSS/ {print $2}' "/proc/$p/status" 2>/dev/null || echo 0))); done; echo $t; }

# load NAME PORT SECONDS: ab over new connections and ab -k over keep-alive, at once.
load() {
  local name=$1 port=$2 secs=$3
  # TLS 1.2 for the new connections: over TLS 1.3 ab's request waits 40 ms on the edge (see
  # "New mTLS handshakes" in load/README.md), which would leave the edge idle and not compare.
  ab -q -r -f TLS1.2 -t "$secs" -n 100000000 -c 4 -E "$D/good-both.pem" "https://localhost:$port$URL" >"$D/ab-new.out" 2>&1 &
  local a=$!
  ab -q -r -k -t "$secs" -n 100000000 -c 4 -E "$D/good-both.pem" "https://localhost:$port$URL" >"$D/ab-ka.out" 2>&1 &
  local b=$!
  wait $a $b || true # ab -r counts socket errors as failed requests instead of stopping
  for kind in new ka; do
    awk -v n="$name" -v k="$kind" -v secs="$secs" '
      /Complete requests/ {done = $3} /Failed requests/ {failed = $3} /Non-2xx responses/ {non2xx = $3}
      /Requests per second/ {rps = $4}
      /^Total of .* requests completed/ {done = $3; rps = done / secs}
      END {printf "%-26s %-10s %10d %8d %8d %10.1f\n", n, k, done, failed, non2xx + 0, rps}' "$D/ab-$kind.out"
    grep -q "Complete requests" "$D/ab-$kind.out" || echo "  ab stopped: $(grep -v '^$' "$D/ab-$kind.out" | tail -2 | tr '\n' ' ')"
  done
}

edge_rss() { rss_kib "$EDGE"; }
nginx_rss() { rss_kib $(nginx_pids); }

# cycle SECONDS RSS RELOAD...: every 2 s, the next change (CRL, server certificate, rule) and
# RELOAD (none: the edge's watch); RSS (a function) is sampled after each.
cycle() {
  trap - EXIT # a background subshell must not run the cleanup
  local secs=$1 rss=$2; shift 2
  local i=0 end=$((SECONDS + secs))
  : > "$D/rss"
  while ((SECONDS < end - 1)); do
    sleep 2
    case $((i % 3)) in
      0) cp "$D/crl-clean-$((i / 3 % 3 + 1)).pem" "$D/bench-crl.pem.tmp" && mv "$D/bench-crl.pem.tmp" "$D/bench-crl.pem" ;;
      1) v=$([ $((i / 3 % 2)) = 0 ] && echo b || echo a)
         cp "$D/server-$v.key" "$D/server.key.tmp" && cp "$D/server-$v.pem" "$D/server.pem.tmp"
         mv "$D/server.key.tmp" "$D/server.key" && mv "$D/server.pem.tmp" "$D/server.pem" ;;
      2) rule $((i / 3 + 1)) ;;
    esac
    if (($#)); then "$@"; fi
    $rss >> "$D/rss"
    i=$((i + 1))
  done
}

report_rss() { sort -n "$D/rss" | awk -v n="$1" '{v[NR] = $1} END {printf "%-26s RSS MiB over %d reloads: min %.1f, max %.1f\n", n, NR, v[1] / 1024, v[NR] / 1024}'; }

last=${WORKERS##* }
for workers in $WORKERS; do
  start_servers "$workers"
  echo "# $workers workers each: load from a valid device, $(nproc) cores; ab over new connections (new) and keep-alive (ka), concurrency 4 each"
  printf "%-26s %-10s %10s %8s %8s %10s\n" server load requests failed non-2xx "req/s"
  load "mtls-edge, no reloads" 8443 20
  echo "edge RSS before the reloads: $(( $(rss_kib $EDGE) / 1024 )) MiB"
  cycle "$RELOAD_SECONDS" edge_rss & CYCLE=$!
  load "mtls-edge, reload every 2 s" 8443 "$RELOAD_SECONDS"
  wait $CYCLE
  report_rss "mtls-edge"
  echo "edge reloads: $(curl -s http://127.0.0.1:9100/metrics | awk '/^mtls_edge_reloads_total/ {printf "%s ", $0}')"

  load "nginx, no reloads" 8444 20
  echo "nginx RSS before the reloads: $(( $(nginx_rss) / 1024 )) MiB"
  nginx_reload() { nginx -c "$D/nginx.conf" -e "$D/nginx-error.log" -s reload 2>/dev/null; }
  cycle "$RELOAD_SECONDS" nginx_rss nginx_reload & CYCLE=$!
  load "nginx, -s reload every 2 s" 8444 "$RELOAD_SECONDS"
  wait $CYCLE
  report_rss "nginx (master + workers)"
  [ "$workers" = "$last" ] && break # the revocation runs at the last worker count
  stop_edge; stop_nginx
done
echo
echo "# from a CRL write to the revoked device's first refusal, $TRIES tries each"
echo -n "mtls-edge, file watch:   "; python3 load/reload.py latency 8443 "$D" "$D/bench-crl.pem" "$TRIES" | tail -1
echo -n "mtls-edge, SIGHUP:       "; python3 load/reload.py latency 8443 "$D" "$D/bench-crl.pem" "$TRIES" kill -HUP "$EDGE" | tail -1
echo -n "nginx, -s reload:        "; python3 load/reload.py latency 8444 "$D" "$D/bench-crl.pem" "$TRIES" nginx -c "$D/nginx.conf" -e "$D/nginx-error.log" -s reload 2>/dev/null | tail -1
