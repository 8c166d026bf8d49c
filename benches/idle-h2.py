#!/usr/bin/env python3
"""Memory per idle HTTP/2 connection of a TLS proxy (docs/benchmarks.md).

    benches/idle-h2.py PORT PIDS [--conns 1000]

Opens --conns TLS connections to 127.0.0.1:PORT (ALPN h2), sends one GET / on each, reads
its answer, and keeps them open, idle; then opens as many more the same way, the first ones
still open. Prints the RSS growth of PIDS (comma-separated: the proxy's processes) per
connection after the preface and after the request, for each batch: the first includes what
the process takes once (allocator arenas, buffers it keeps), the second is what one more idle
connection costs while the others live. Start the proxy first, one worker, in front of any
origin (docs/benchmarks.md's figures: the nginx origin benches/profile.sh writes, gatehouse
configured as benches/peerbench-candidate.sh configures it, nginx and HAProxy as the peer
benchmark does).
"""
import argparse
import resource
import socket
import ssl
import struct
import time


def rss_kib(pids):
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS"):
                    total += int(line.split()[1])
    return total


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


# GET https://localhost/ (HPACK: static :method GET, :scheme https, :path /; :authority literal).
REQUEST = frame(1, 0x5, 1, bytes([0x82, 0x87, 0x84, 0x41, 9]) + b"localhost")
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + frame(4, 0, 0)


def answer(connection):
    """Reads frames until stream 1 ends, acknowledging the server's SETTINGS."""
    pending = b""
    while True:
        data = connection.recv(65536)
        if not data:
            raise ConnectionError("closed before the answer ended")
        pending += data
        while len(pending) >= 9:
            length = int.from_bytes(pending[:3], "big")
            if len(pending) < 9 + length:
                break
            kind, flags = pending[3], pending[4]
            stream = int.from_bytes(pending[5:9], "big") & 0x7FFFFFFF
            pending = pending[9 + length:]
            if kind == 4 and not flags & 1:
                connection.sendall(frame(4, 1, 0))
            if stream == 1 and kind in (0, 1) and flags & 1:
                return


def batch(port, conns, pids, context, connections):
    """Opens `conns` more idle connections (kept in `connections`); the RSS growth per
    connection after the preface and after one request on each."""
    before = rss_kib(pids)
    opened = []
    for _ in range(conns):
        tcp = socket.create_connection(("127.0.0.1", port))
        connection = context.wrap_socket(tcp, server_hostname="localhost")
        if connection.selected_alpn_protocol() != "h2":
            raise SystemExit("the proxy did not choose h2")
        connection.sendall(PREFACE)
        opened.append(connection)
    time.sleep(1)
    connected = rss_kib(pids)
    for connection in opened:
        connection.sendall(REQUEST)
    for connection in opened:
        answer(connection)
    time.sleep(2)
    answered = rss_kib(pids)
    connections.extend(opened)
    return (connected - before) / conns, (answered - before) / conns


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("pids")
    parser.add_argument("--conns", type=int, default=1000)
    args = parser.parse_args()
    pids = [int(pid) for pid in args.pids.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * args.conns + 100)), hard))
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    connections = []
    for name in ("first", "next"):
        connected, answered = batch(args.port, args.conns, pids, context, connections)
        print(f"{name} {args.conns}: KiB per connection after the preface {connected:.2f}, after one request {answered:.2f}")


if __name__ == "__main__":
    main()
