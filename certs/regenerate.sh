#!/usr/bin/env bash
# Regenerates the DEVELOPMENT-ONLY CA and localhost certificate used by `gatehouse demo`.
# Never use these files for anything real: the private keys are public in this repository.
set -euo pipefail
cd "$(dirname "$0")"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 3650 \
  -subj "/CN=gatehouse development CA (DO NOT TRUST)" \
  -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
  -keyout dev-ca.key -out dev-ca.crt
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes \
  -subj "/CN=localhost" -keyout localhost.key -out localhost.csr
openssl x509 -req -in localhost.csr -CA dev-ca.crt -CAkey dev-ca.key -CAcreateserial \
  -days 3650 -out localhost.crt -extfile <(printf '%s\n' \
    "subjectAltName=DNS:localhost,DNS:*.localhost,IP:127.0.0.1,IP:::1" \
    "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth")
rm -f localhost.csr dev-ca.srl
echo "regenerated certs/dev-ca.crt, certs/localhost.crt and certs/localhost.key (development only)"
