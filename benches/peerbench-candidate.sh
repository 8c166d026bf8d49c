#!/usr/bin/env bash
# gatehouse as the candidate of ../shared/bench/peerbench.sh (see its README for the contract).
#   cargo build --release && CANDIDATE_CMD=$PWD/benches/peerbench-candidate.sh CANDIDATE_NAME=gatehouse \
#     ../shared/bench/peerbench.sh
# Same settings as the peers: PB_THREADS workers, no access log, keep-alive upstream, round robin
# over PB_B1/PB_B2, TLS 1.3 with h2 and http/1.1, session resumption (tickets and cache) off.
set -eu
here="$(cd "$(dirname "$0")/.." && pwd)"
binary="${GATEHOUSE_BIN:-$here/target/release/gatehouse}"
cat >"$PB_WORKDIR/gatehouse.yaml" <<YAML
admin: { listen: "127.0.0.1:0" }
runtime: { worker_threads: $PB_THREADS }
access_log: { target: off }
listeners:
  http: { listen: "127.0.0.1:$PB_HTTP_PORT", protocol: http, pool: be }
  https:
    listen: "127.0.0.1:$PB_HTTPS_PORT"
    protocol: https
    tls:
      certificates: [ { cert: "$PB_CERT", key: "$PB_KEY" } ]
      min_version: "1.3"
      session_resumption: false
    pool: be
  tcp: { listen: "127.0.0.1:$PB_TCP_PORT", protocol: tcp, pool: be }
pools:
  be:
    algorithm: round_robin
    health_check: { type: tcp, interval: 5s }
    timeouts: { connect: 5s, request: 120s, idle: 300s }
    backends:
      - { name: b1, address: "$PB_B1" }
      - { name: b2, address: "$PB_B2" }
YAML
RUST_LOG=warn exec "$binary" run --config "$PB_WORKDIR/gatehouse.yaml"
