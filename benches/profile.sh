#!/usr/bin/env bash
# Profiles gatehouse's request path on loopback: an nginx backend (the peer benchmark's
# "hello" origin), gatehouse from benches/peerbench-candidate.sh, and a fixed load.
#
#   benches/profile.sh callgrind [SCENARIO] [REQUESTS]  # instructions per request (repeatable)
#   benches/profile.sh perf [SCENARIO] [SECONDS]        # sampled call graph (perf, cpu-clock)
#   benches/profile.sh split [SCENARIO] [REQUESTS]      # syscalls and user/kernel CPU per request
#   benches/profile.sh newconn http|https [SECONDS]     # CPU per request on a new connection each
#   PROXY=nginx benches/profile.sh split [SCENARIO]     # the same figures for nginx as the proxy
#   PROXY=haproxy benches/profile.sh split [SCENARIO]   # ... or for HAProxy (configured as peerbench does)
#   PB_THREADS=2 benches/profile.sh split h2            # gatehouse with two workers (default one, as in the peer benchmark)
#   benches/profile.sh ceiling [PLACEMENT] [SECONDS]    # large-1m: what each core pays per MiB
#
# SCENARIO: http (default), https, h2, tcp, post (a 600-byte form over HTTP/1.1), upload (1 MiB PUT over HTTP/1.1). PLACEMENT
# (ceiling): direct (wrk on the backend's core), direct-cross (wrk on the other core),
# gatehouse or nginx (the proxy on the other core, wrk on the backend's, as in the peer
# benchmark). Needs nginx, h2load (nghttp2-client), valgrind or perf, and a release build (`cargo build --release`). Output goes to $OUT (default
# /tmp/gatehouse-profile): callgrind.out / perf.data plus a summary printed here.
set -euo pipefail
mode="${1:?usage: profile.sh callgrind|perf|split [http|https|h2|tcp|post] [amount] | newconn [http|https] [seconds] | ceiling [placement] [seconds]}"
scenario="${2:-http}"
here="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-/tmp/gatehouse-profile}"
rm -rf "$OUT" && mkdir -p "$OUT/backend/www/up"
export PB_WORKDIR="$OUT" PB_THREADS="${PB_THREADS:-1}"
export PB_HTTP_PORT=18080 PB_HTTPS_PORT=18443 PB_TCP_PORT=18081
export PB_B1=127.0.0.1:18901 PB_B2=127.0.0.1:18902
export PB_CERT="$OUT/cert.pem" PB_KEY="$OUT/key.pem"
head -c 1048576 /dev/zero >"$OUT/backend/www/1m"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=localhost \
  -keyout "$PB_KEY" -out "$PB_CERT" 2>/dev/null

cat >"$OUT/backend/nginx.conf" <<EOF
worker_processes 1; daemon off; master_process off; pid $OUT/backend/nginx.pid;
error_log $OUT/backend/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; default_type text/plain;
  client_body_temp_path $OUT/backend/cb; proxy_temp_path $OUT/backend/px;
  fastcgi_temp_path $OUT/backend/fc; uwsgi_temp_path $OUT/backend/uw; scgi_temp_path $OUT/backend/sc;
  keepalive_requests 100000000; keepalive_timeout 300s; sendfile on; tcp_nopush on; tcp_nodelay on;
  client_max_body_size 0;
  server {
    listen $PB_B1; listen $PB_B2; root $OUT/backend/www;
    location = / { return 200 "hello\n"; }
    location = /1m { }
    location /up/ { dav_methods PUT; }
  }
}
EOF
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
# Pinned as in the peer benchmark for `ceiling`: backend and load generator on CPU 0.
backend_cpu=()
[ "$mode" = ceiling ] && backend_cpu=(taskset -c 0)
"${backend_cpu[@]}" nginx -p "$OUT/backend" -c "$OUT/backend/nginx.conf" &
backend=$!
pids+=("$backend")

case "$scenario" in
  direct | direct-cross | gatehouse | nginx) [ "$mode" = ceiling ] || { echo "$scenario is a placement for ceiling" >&2; exit 2; } ;;
  http) url="http://127.0.0.1:$PB_HTTP_PORT/"; proto=(--h1) ;;
  https) url="https://127.0.0.1:$PB_HTTPS_PORT/"; proto=(--h1) ;;
  h2) url="https://127.0.0.1:$PB_HTTPS_PORT/"; proto=(-m10) ;;
  tcp) url="http://127.0.0.1:$PB_TCP_PORT/"; proto=(--h1) ;;
  # A form submission: 600 bytes of urlencoded fields, POSTed over HTTP/1.1 keep-alive.
  post)
    url="http://127.0.0.1:$PB_HTTP_PORT/"
    head -c 450 /dev/zero | tr '\0' 'x' | sed 's/^/name=Jane+Doe\&street=1+Main+St\&case=/' | head -c 600 >"$OUT/form"
    proto=(--h1 -d "$OUT/form" -H "content-type: application/x-www-form-urlencoded")
    ;;
  # A document upload: 1 MiB PUT over HTTP/1.1 keep-alive (its body streams after its
  # head), which the backend stores (WebDAV) and answers once it has read all of it.
  upload)
    url="http://127.0.0.1:$PB_HTTP_PORT/up/document"
    head -c 1048576 /dev/zero >"$OUT/upload"
    proto=(--h1 -d "$OUT/upload" -H ":method: PUT" -H "content-type: application/pdf")
    ;;
  *) echo "unknown scenario $scenario" >&2; exit 2 ;;
esac
connections=64 warmup=20000
[ "$scenario" = h2 ] && connections=16
[ "$scenario" = upload ] && connections=8 warmup=500

wait_for_port() {
  for _ in $(seq 1 600); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "port $1 never opened" >&2
  exit 1
}

# gatehouse from benches/peerbench-candidate.sh, started with the command prefix given (e.g.
# `taskset -c 1`); its pid in $target, found by its configuration (GATEHOUSE_BIN may be a copy
# under any name).
start_gatehouse() {
  "$@" "$here/benches/peerbench-candidate.sh" &
  pids+=($!)
  wait_for_port "$PB_HTTP_PORT"
  target="$(pgrep -f "run --config $OUT/gatehouse.yaml" | head -1)"
}

# nginx as the proxy, configured as the peer benchmark configures it, started with the
# command prefix given (e.g. `taskset -c 1`); its pid in $target.
start_nginx_proxy() {
  mkdir -p "$OUT/proxy"
  cat >"$OUT/proxy/nginx.conf" <<NGINX
load_module ${NGINX_MODULES:-/usr/lib/nginx/modules}/ngx_stream_module.so;
worker_processes 1; daemon off; master_process off; pid $OUT/proxy/nginx.pid;
error_log $OUT/proxy/error.log warn;
events { worker_connections 4096; }
http {
  access_log off; client_body_temp_path $OUT/proxy/cb; proxy_temp_path $OUT/proxy/px;
  fastcgi_temp_path $OUT/proxy/fc; uwsgi_temp_path $OUT/proxy/uw; scgi_temp_path $OUT/proxy/sc;
  keepalive_requests 100000000; keepalive_timeout 300s; tcp_nodelay on;
  client_max_body_size 0; proxy_request_buffering off;
  upstream be { server $PB_B1; server $PB_B2; keepalive 512; keepalive_requests 100000000; keepalive_timeout 300s; }
  server {
    listen 127.0.0.1:$PB_HTTP_PORT; listen 127.0.0.1:$PB_HTTPS_PORT ssl http2;
    ssl_certificate $PB_CERT; ssl_certificate_key $PB_KEY; ssl_protocols TLSv1.3;
    ssl_session_tickets off; ssl_session_cache off;
    location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
stream {
  upstream be_tcp { server $PB_B1; server $PB_B2; }
  server { listen 127.0.0.1:$PB_TCP_PORT backlog=4096; proxy_pass be_tcp; }
}
NGINX
  "$@" nginx -p "$OUT/proxy" -c "$OUT/proxy/nginx.conf" &
  target=$!
  pids+=("$target")
  wait_for_port "$PB_HTTP_PORT"
}

case "$mode" in
  callgrind)
    requests="${3:-20000}"
    valgrind --tool=callgrind --trace-children=yes --instr-atstart=no --callgrind-out-file="$OUT/callgrind.out" \
      "$here/benches/peerbench-candidate.sh" 2>"$OUT/valgrind.log" &
    pids+=($!)
    wait_for_port "$PB_HTTP_PORT"
    h2load "${proto[@]}" -n 2000 -c "$connections" -t 1 "$url" >/dev/null
    callgrind_control -i on >/dev/null
    h2load "${proto[@]}" -n "$requests" -c "$connections" -t 1 "$url" | grep -E "^requests:"
    callgrind_control -i off >/dev/null
    callgrind_control -d >/dev/null
    sleep 1
    dump="$OUT/callgrind.out.1"
    total="$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ { gsub(",", "", $1); print $1 }')"
    echo "instructions per request ($scenario): $((total / requests))"
    callgrind_annotate --inclusive=no "$dump" 2>/dev/null | sed -n '/^Ir/,$p' | head -45
    ;;
  perf)
    seconds="${3:-10}"
    start_gatehouse
    h2load "${proto[@]}" -n 20000 -c "$connections" -t 1 "$url" >/dev/null
    perf record -e cpu-clock -F 2000 -g -p "$target" -o "$OUT/perf.data" -- sleep "$seconds" 2>/dev/null &
    recorder=$!
    h2load "${proto[@]}" -D "$seconds" -c "$connections" -t 1 "$url" | grep -E "^requests:"
    wait "$recorder"
    perf report -i "$OUT/perf.data" --no-children --stdio --sort symbol 2>/dev/null |
      grep -E "^ +[0-9]" | head -50
    ;;
  split)
    # Where a request's CPU goes: syscalls per request (perf's syscall tracepoints) and user
    # vs kernel CPU per request (/proc/PID/stat), for gatehouse or, with PROXY=nginx, for nginx
    # configured as in the peer benchmark. The kernel part is the floor no user-space work
    # can remove: it is about the same for every proxy that makes the same syscalls.
    requests="${3:-100000}"
    if [ "${PROXY:-gatehouse}" = nginx ]; then
      start_nginx_proxy
    elif [ "${PROXY:-gatehouse}" = haproxy ]; then
      mkdir -p "$OUT/proxy"
      cat "$PB_CERT" "$PB_KEY" >"$OUT/proxy/certkey.pem"
      cat >"$OUT/proxy/haproxy.cfg" <<HAPROXY
global
  nbthread 1
  maxconn 8000
  tune.ssl.cachesize 0
  ssl-default-bind-options ssl-min-ver TLSv1.3 no-tls-tickets
defaults
  mode http
  maxconn 8000
  option http-keep-alive
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 300s
frontend fe_http
  bind 127.0.0.1:$PB_HTTP_PORT
  bind 127.0.0.1:$PB_HTTPS_PORT ssl crt $OUT/proxy/certkey.pem alpn h2,http/1.1
  default_backend be
backend be
  balance roundrobin
  http-reuse always
  server b1 $PB_B1
  server b2 $PB_B2
frontend fe_tcp
  mode tcp
  bind 127.0.0.1:$PB_TCP_PORT
  default_backend be_tcp
backend be_tcp
  mode tcp
  balance roundrobin
  server b1 $PB_B1
  server b2 $PB_B2
HAPROXY
      haproxy -db -f "$OUT/proxy/haproxy.cfg" &
      target=$!
      pids+=("$target")
      wait_for_port "$PB_HTTP_PORT"
    else
      start_gatehouse
    fi
    h2load "${proto[@]}" -n "$warmup" -c "$connections" -t 1 "$url" >/dev/null
    ticks() { awk '{ print $14, $15 }' "/proc/$target/stat"; }
    read -r user_before system_before < <(ticks)
    perf stat -x, -e raw_syscalls:sys_enter,syscalls:sys_enter_recvfrom,syscalls:sys_enter_writev,syscalls:sys_enter_epoll_wait \
      -p "$target" -o "$OUT/syscalls.csv" &
    counter=$!
    sleep 0.5
    h2load "${proto[@]}" -n "$requests" -c "$connections" -t 1 "$url" | grep -E "^requests:"
    kill -INT "$counter"
    wait "$counter" || true
    read -r user_after system_after < <(ticks)
    hz="$(getconf CLK_TCK)"
    awk -F, -v n="$requests" '$3 ~ /sys_enter/ { name = $3; sub(/.*:sys_enter_?/, "", name); printf "  %-12s %6.2f per request\n", (name == "" ? "all syscalls" : name), $1 / n }' "$OUT/syscalls.csv"
    awk -v n="$requests" -v hz="$hz" -v u=$((user_after - user_before)) -v k=$((system_after - system_before)) \
      'BEGIN { printf "  CPU per request: %.1f us = %.1f user + %.1f kernel (%.0f %% kernel)\n", (u + k) * 1e6 / hz / n, u * 1e6 / hz / n, k * 1e6 / hz / n, 100 * k / (u + k) }'
    ;;
  ceiling)
    # large-1m's ceiling in the peer benchmark's layout (backend and wrk on CPU 0, the proxy on
    # CPU 1): CPU per MiB of the backend, the load generator and the proxy, from /proc and
    # time(1). With a proxy, CPU 0 carries backend and wrk, each talking across cores; their
    # sum per MiB bounds the MiB/s whatever the proxy does.
    seconds="${3:-8}"
    wrk_cpu=0 proxy=""
    case "$scenario" in
      direct) url="http://$PB_B1/1m" ;;
      direct-cross) url="http://$PB_B1/1m" wrk_cpu=1 ;;
      gatehouse)
        start_gatehouse taskset -c 1
        proxy=$target
        url="http://127.0.0.1:$PB_HTTP_PORT/1m"
        ;;
      nginx)
        start_nginx_proxy taskset -c 1
        proxy=$target
        url="http://127.0.0.1:$PB_HTTP_PORT/1m"
        ;;
      *) echo "ceiling placements: direct, direct-cross, gatehouse, nginx" >&2; exit 2 ;;
    esac
    wait_for_port "${PB_B1##*:}"
    cpu() { if [ -n "$1" ]; then awk '{ print $14 + $15 }' "/proc/$1/stat"; else echo 0; fi; }
    taskset -c "$wrk_cpu" wrk -t1 -c8 -d2s "$url" >/dev/null
    backend_before="$(cpu "$backend")" proxy_before="$(cpu "$proxy")"
    /usr/bin/time -f "load-generator-cpu %U %S" -o "$OUT/wrk.time" \
      taskset -c "$wrk_cpu" wrk -t1 -c8 -d"${seconds}s" "$url" >"$OUT/wrk.out"
    backend_after="$(cpu "$backend")" proxy_after="$(cpu "$proxy")"
    requests="$(awk '/requests in/ { print $1 }' "$OUT/wrk.out")"
    hz="$(getconf CLK_TCK)"
    awk -v n="$requests" -v s="$seconds" '/requests in/ { printf "  %.0f MiB/s\n", n / s }' "$OUT/wrk.out"
    awk -v n="$requests" '/load-generator-cpu/ { printf "  load generator %4.0f us per MiB\n", ($2 + $3) * 1e6 / n }' "$OUT/wrk.time"
    awk -v n="$requests" -v hz="$hz" -v d=$((backend_after - backend_before)) 'BEGIN { printf "  backend        %4.0f us per MiB\n", d * 1e6 / hz / n }'
    if [ -n "$proxy" ]; then
      awk -v n="$requests" -v hz="$hz" -v d=$((proxy_after - proxy_before)) 'BEGIN { printf "  proxy          %4.0f us per MiB\n", d * 1e6 / hz / n }'
    fi
    ;;
  newconn)
    # A new connection per request (wrk, `Connection: close`; http or https, a full TLS
    # handshake each): gatehouse's CPU per request, user and kernel, from /proc.
    seconds="${3:-5}"
    case "$scenario" in
      http) url="http://127.0.0.1:$PB_HTTP_PORT/" ;;
      https) url="https://127.0.0.1:$PB_HTTPS_PORT/" ;;
      *) echo "newconn: http or https" >&2; exit 2 ;;
    esac
    start_gatehouse
    wrk -t1 -c16 -d1s -H "Connection: close" "$url" >/dev/null
    ticks() { awk '{ print $14, $15 }' "/proc/$target/stat"; }
    read -r user_before system_before < <(ticks)
    wrk -t1 -c16 -d"${seconds}s" -H "Connection: close" "$url" >"$OUT/wrk.out"
    read -r user_after system_after < <(ticks)
    requests="$(awk '/requests in/ { print $1 }' "$OUT/wrk.out")"
    hz="$(getconf CLK_TCK)"
    awk -v n="$requests" -v hz="$hz" -v u=$((user_after - user_before)) -v k=$((system_after - system_before)) \
      'BEGIN { printf "  %d connections; CPU per connection: %.1f us = %.1f user + %.1f kernel\n", n, (u + k) * 1e6 / hz / n, u * 1e6 / hz / n, k * 1e6 / hz / n }'
    ;;
  *) echo "mode is callgrind, perf, split, newconn or ceiling" >&2; exit 2 ;;
esac
