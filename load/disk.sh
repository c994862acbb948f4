#!/usr/bin/env bash
# The disk tier against nginx proxy_cache on disk, the same job side by side in one run:
#  1. a 1 GiB image served from disk, hot (in the page cache) and cold (the page cache dropped
#     before each run, where /proc/sys/vm/drop_caches can be written): MiB/s and the server's
#     CPU ms per MiB;
#  2. restart to first hit with 10,000 objects on disk: from the start of the process until a
#     stored object is served as a hit (and whether the origin was asked for it), and until the
#     cache index is fully loaded.
# Both servers: viewer mTLS required, origin mTLS to the same origin; the image rows at 1 and then
# 2 workers (WORKERS="1 2 4" for more), each over HTTP/1.1 and then HTTP/2 (PROTOCOLS), the same
# protocol for both servers in a row; the restart at 1. The edge's memory tier (64 MiB,
# objects up to 16 MiB) cannot hold the image: it is read from disk every time.
#   load/disk.sh [rounds]       (SIZE=bytes of the image, OBJECTS=count for the restart)
source "$(dirname "$0")/lib.sh"
ROUNDS=${1:-2}
SIZE=${SIZE:-1073741824}
NOBJ=${OBJECTS:-10000}
WORKERS=${WORKERS:-1 2}
PROTOCOLS=${PROTOCOLS:-http1.1 http2}
command -v nginx >/dev/null || { echo "needs nginx" >&2; exit 1; }
start_origin
mkdir -p "$D/edge-disk" "$D/nginx-cache"
chmod 755 "$D" && chmod 777 "$D/nginx-cache" # nginx's workers run as www-data
export CACHE_YAML="{ max_bytes: 67108864, max_object_bytes: 16777216, disk: { path: $D/edge-disk, max_bytes: 8589934592, max_object_bytes: 4294967296, min_free_bytes: 0 } }"
start_edge 1
write_nginx() { # workers; notice: nginx's cache loader says when it is done
cat > "$D/nginx.conf" <<NGINX
$(NGINX_WORKERS=$1 nginx_prelude notice)
  proxy_cache_path $D/nginx-cache levels=1:2 keys_zone=fw:10m max_size=8g inactive=1d use_temp_path=off;
  upstream origin { server 127.0.0.1:9443; keepalive 32; }
  server {
    listen 127.0.0.1:8444 ssl http2;   # nginx 1.22: http2 on the listen line
$(nginx_viewer_tls)
    keepalive_requests 100000;
    location /files/ {
      proxy_cache fw;
      proxy_cache_key \$host\$request_uri;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 600s;
      proxy_cache_valid 200 1d;
      add_header Cache-Status \$upstream_cache_status;
$(nginx_origin_tls)
    }
  }
}
NGINX
}
write_nginx 1
nginx -c "$D/nginx.conf"
wait_port 8444

get() { # port path [curl args]: the status, bytes and cache status of one request
  local port=$1 path=$2; shift 2
  curl -sS --http1.1 -o /dev/null -D "$D/headers" -w '%{http_code} %{size_download}' "$@" --cacert "$D/edge-ca.pem" \
    --cert "$D/device.pem" --key "$D/device.key" "https://localhost:$port$path"
  echo " $(tr -d '\r' < "$D/headers" | awk -F': ' 'tolower($1) == "cache-status" {print $2}')"
}
server_pids() { if [ "$1" = nginx ]; then nginx_pids; else echo "$EDGE"; fi; }
port_of() { if [ "$1" = nginx ]; then echo 8444; else echo 8443; fi; }

IMAGE="/files/image.bin?size=$SIZE&max_age=86400"
echo "# filling both caches with the $((SIZE >> 20)) MiB image"
for s in mtls-edge nginx; do get "$(port_of $s)" "$IMAGE" >/dev/null; done
for s in mtls-edge nginx; do
  read -r code bytes status < <(get "$(port_of $s)" "$IMAGE")
  [ "$code $bytes" = "200 $SIZE" ] || { echo "$s answered $code with $bytes bytes" >&2; exit 1; }
  echo "$s: second request $code, cache status: $status"
done
echo "origin fetches of the image: $(origin_count /files/image.bin) (one per server)"

COLD=no
if (echo 1 > /proc/sys/vm/drop_caches) 2>/dev/null; then COLD=yes; else
  echo "# cold runs skipped: /proc/sys/vm/drop_caches cannot be written here"; fi

download() { # server mode round protocol: 4 downloads of the image, 2 at a time
  local s=$1 mode=$2 proto=$4 port; port=$(port_of "$s")
  if [ "$mode" = cold ]; then sync; echo 3 > /proc/sys/vm/drop_caches
  else get "$port" "$IMAGE" >/dev/null; fi # hot: in the page cache whatever ran before
  local pids; pids=$(server_pids "$s")
  local before start end after
  before=$(ticks $pids); start=$(date +%s.%N)
  seq 4 | xargs -P 2 -I{} curl -sS "--$proto" -o /dev/null -w '%{http_code} %{size_download}\n' --cacert "$D/edge-ca.pem" \
    --cert "$D/device.pem" --key "$D/device.key" "https://localhost:$port$IMAGE" > "$D/dl.out"
  end=$(date +%s.%N); after=$(ticks $pids)
  local bad; bad=$(grep -vc "^200 $SIZE\$" "$D/dl.out" || true)
  awk -v s="$s" -v m="$mode" -v p="$proto" -v w="$workers" -v r="$3" -v n=4 -v size="$SIZE" -v t="$(echo "$end - $start" | bc)" \
    -v cpu=$((after - before)) -v hz="$HZ" -v bad="$bad" 'BEGIN {
      mib = n * size / 1048576
      printf "%-10s %-5s %-8s %7s %5s %10.0f %14.2f %6s\n", s, m, p, w, r, mib / t, cpu / hz * 1000 / mib, bad }' | tee -a "$D/rows"
}

echo
echo "# the image from disk: 4 downloads, 2 at a time, $(nproc) cores, TCP $(cat /proc/sys/net/ipv4/tcp_congestion_control)"
printf "%-10s %-5s %-8s %7s %5s %10s %14s %6s\n" server mode protocol workers round "MiB/s" "cpu ms/MiB" errors
for workers in $WORKERS; do
  if [ "$workers" != 1 ]; then # the image stays on both disks across the restarts
    stop_edge; start_edge "$workers"
    stop_nginx; write_nginx "$workers"; nginx -c "$D/nginx.conf"; wait_port 8444
  fi
  # The first cold read after a start runs slower, whichever server makes it (0.75x to 0.8x in
  # earlier runs, for nginx when it went first): one untimed cold read each, before the rows.
  if [ $COLD = yes ]; then
    for s in mtls-edge nginx; do sync; echo 3 > /proc/sys/vm/drop_caches; get "$(port_of $s)" "$IMAGE" >/dev/null; done
  fi
  for round in $(seq "$ROUNDS"); do
    for proto in $PROTOCOLS; do
      for mode in hot $([ $COLD = yes ] && echo cold); do
        if ((round % 2)); then download mtls-edge $mode $round $proto; download nginx $mode $round $proto
        else download nginx $mode $round $proto; download mtls-edge $mode $round $proto; fi
      done
    done
  done
done
if [ "${WORKERS##* }" != 1 ]; then # the restart runs at 1 worker
  stop_edge; start_edge 1
  stop_nginx; write_nginx 1; nginx -c "$D/nginx.conf"; wait_port 8444
fi

echo
echo "# restart to first hit with $NOBJ objects on disk"
for s in mtls-edge nginx; do
  { for i in $(seq "$NOBJ"); do echo "url = \"https://localhost:$(port_of $s)/files/o/$i.bin?size=4096&max_age=86400\""; echo "output = /dev/null"; done; } > "$D/urls-$s"
  curl -sS --cacert "$D/edge-ca.pem" --cert "$D/device.pem" --key "$D/device.key" -K "$D/urls-$s"
  get "$(port_of $s)" "/files/o/probe-$s.bin?size=4096&max_age=86400" >/dev/null
done
echo "objects on disk: mtls-edge $(find "$D/edge-disk/objects" -name '*.meta' | wc -l), nginx $(find "$D/nginx-cache" -type f | wc -l)"
printf "%-10s %14s %22s %22s %20s\n" server listening-ms first-hit-ms index-loaded-ms "origin asked again"
first_hit() { # server: polls the probe until it is a hit; prints ms since $T0
  local s=$1 port; port=$(port_of "$s")
  while :; do
    read -r code _ status < <(get "$port" "/files/o/probe-$s.bin?size=4096&max_age=86400" 2>/dev/null || echo "0 0 -")
    [ "$code" = 200 ] && { echo $(( ($(date +%s%N) - T0) / 1000000 )) "$status"; return; }
    sleep 0.01
  done
}
# mtls-edge
kill "$EDGE"; wait "$EDGE" 2>/dev/null || true
T0=$(date +%s%N)
RUST_LOG=info start_edge 1
listening=$(( ($(date +%s%N) - T0) / 1000000 ))
read -r ms status < <(first_hit mtls-edge)
for _ in $(seq 600); do grep -q "cache disk: .* loaded" "$D/edge-8443.log" && break; sleep 0.05; done
loaded=$(grep -o 'loaded from [^ ]* in [0-9]* ms' "$D/edge-8443.log" | awk '{print $(NF-1)}' || true)
printf "%-10s %14s %22s %22s %20s\n" mtls-edge "$listening" "$ms ($status)" "${loaded:-?}" "$(( $(origin_count /files/o/probe-mtls-edge.bin) - 1 ))"
# nginx: its cache loader logs when done ("http file cache: ..."), to the second
kill "$(cat "$D/nginx.pid")"; while [ -f "$D/nginx.pid" ]; do sleep 0.05; done
: > "$D/nginx-error.log"
T0=$(date +%s%N); start_s=$(date +%s)
nginx -c "$D/nginx.conf"
wait_port 8444
listening=$(( ($(date +%s%N) - T0) / 1000000 ))
read -r ms status < <(first_hit nginx)
for _ in $(seq 2400); do grep -q "http file cache: $D/nginx-cache" "$D/nginx-error.log" && break; sleep 0.05; done
done_at=$(grep "http file cache: $D/nginx-cache" "$D/nginx-error.log" | head -1 | awk '{print $1" "$2}' || true)
loaded=$([ -n "$done_at" ] && echo "$(( ($(date -d "$done_at" +%s) - start_s) * 1000 )) (1 s steps)" || echo "?")
printf "%-10s %14s %22s %22s %20s\n" nginx "$listening" "$ms ($status)" "$loaded" "$(( $(origin_count /files/o/probe-nginx.bin) - 1 ))"
