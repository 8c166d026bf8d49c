#!/usr/bin/env python3
"""What hostile clients leave behind in gatehouse and in the kernel (docs/benchmarks.md).

    benches/hostile.py slow-read  [--bin target/release/gatehouse] [--clients 50]
    benches/hostile.py h2-windows [--bin ...] [--clients 10] [--window 1] [--size 200000] [--open-connection]
    benches/hostile.py h1-stall   [--bin ...] [--clients 200]

slow-read: clients request 32 MiB and read nothing; gatehouse (limits.send_timeout: 1s) cuts
them off. Prints what the kernel still holds for them afterwards (orphan sockets and TCP
memory from /proc/net/sockstat): a reset connection leaves nothing.

h2-windows: each h2c client opens 100 streams for a large body with every stream's window
set to --window bytes (SETTINGS_INITIAL_WINDOW_SIZE) and never opens them further (nor reads
its socket). With --open-connection it also opens the connection's window wide, so with a
wide --window (2147483647) gatehouse may send freely until the client's TCP window fills.
Prints gatehouse's RSS growth per client, and what it read from its backend per stream (ss).

h1-stall: HTTP/1.1 clients request 32 MiB and read nothing (send_timeout left at 60 s).
Prints gatehouse's RSS growth per client connection.

Each run starts gatehouse from --bin with one worker in front of a backend in this script
(a thread per connection answering every request with --size bytes), on loopback.
"""
import argparse
import os
import re
import socket
import struct
import subprocess
import tempfile
import threading
import time

MIB = 1 << 20


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_backend(size):
    """A keep-alive HTTP/1.1 backend answering each request with `size` bytes."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4096)
    piece = b"x" * min(size, MIB)

    def serve(conn):
        try:
            pending = b""
            while True:
                while b"\r\n\r\n" not in pending:
                    data = conn.recv(4096)
                    if not data:
                        return
                    pending += data
                pending = pending[pending.index(b"\r\n\r\n") + 4:]
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                left = size
                while left:
                    conn.sendall(piece[:left])
                    left -= min(left, len(piece))
        except OSError:
            pass
        finally:
            conn.close()

    def accept():
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return listener.getsockname()[1]


def start_gatehouse(binary, backend_port, listener_extra, workdir):
    web = free_port()
    config = os.path.join(workdir, "gatehouse.yaml")
    with open(config, "w") as out:
        out.write(f"""admin: {{ listen: "127.0.0.1:{free_port()}" }}
access_log: {{ target: {workdir}/access.log }}
runtime: {{ worker_threads: 1 }}
listeners:
  web: {{ listen: "127.0.0.1:{web}", pool: p{listener_extra} }}
pools:
  p:
    health_check: {{ type: none }}
    backends:
      - {{ name: b, address: "127.0.0.1:{backend_port}" }}
""")
    process = subprocess.Popen([binary, "run", "--config", config], stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", web), timeout=1).close()
            return process, web
        except OSError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("gatehouse did not start")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1])
    return 0


def sockstat():
    with open("/proc/net/sockstat") as stat:
        for line in stat:
            if line.startswith("TCP:"):
                fields = line.split()
                return {fields[i]: int(fields[i + 1]) for i in range(1, len(fields), 2)}
    return {}


def small_window_client(port):
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(("127.0.0.1", port))
    return client


def read_per_upstream_socket(backend_port):
    """KiB gatehouse read from each of its backend connections (received minus queued)."""
    try:
        out = subprocess.run(["ss", "-tinH", f"dport = :{backend_port}"],
                             capture_output=True, text=True, check=False).stdout
    except FileNotFoundError:
        return []
    lines = out.splitlines()
    read = []
    for index, line in enumerate(lines):
        fields = line.split()
        if len(fields) >= 3 and fields[1].isdigit() and index + 1 < len(lines):
            received = re.search(r"bytes_received:(\d+)", lines[index + 1])
            if received:
                read.append((int(received.group(1)) - int(fields[1])) / 1024)
    return sorted(read)


def h2_frame(kind, flags, stream, payload):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def slow_read(args, workdir):
    backend = start_backend(32 * MIB)
    gatehouse, web = start_gatehouse(args.bin, backend, ", limits: { send_timeout: 1s }", workdir)
    try:
        before = sockstat()
        clients = [small_window_client(web) for _ in range(args.clients)]
        for client in clients:
            client.sendall(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        log = os.path.join(workdir, "access.log")
        deadline = time.time() + 30
        logged = 0
        while time.time() < deadline and logged < args.clients:
            time.sleep(0.1)
            if os.path.exists(log):
                with open(log) as lines:
                    logged = sum(1 for _ in lines)
        time.sleep(1)
        after = sockstat()
        held = (after.get("mem", 0) - before.get("mem", 0)) * 4096 / MIB
        print(f"slow-read: {logged} of {args.clients} clients cut off; the kernel still holds "
              f"{after.get('orphan', 0) - before.get('orphan', 0)} orphan sockets and {held:.1f} MiB for them")
    finally:
        gatehouse.terminate()
        gatehouse.wait()


def h2_windows(args, workdir):
    backend = start_backend(args.size)
    gatehouse, web = start_gatehouse(args.bin, backend, "", workdir)
    try:
        before = rss_kib(gatehouse.pid)
        clients = []
        for _ in range(args.clients):
            client = small_window_client(web)
            opening = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + h2_frame(4, 0, 0, struct.pack(">HI", 4, args.window))
            if args.open_connection:
                opening += h2_frame(8, 0, 0, struct.pack(">I", 2**31 - 1 - 65535))
            for index in range(100):
                block = bytes([0x82, 0x86, 0x44, 4]) + b"/big" + bytes([0x41, 1]) + b"x"
                opening += h2_frame(1, 5, 2 * index + 1, block)
            client.sendall(opening)
            clients.append(client)
        time.sleep(8)
        grown = (rss_kib(gatehouse.pid) - before) / 1024
        read = read_per_upstream_socket(backend)
        median = f"{read[len(read) // 2]:.0f} KiB" if read else "unknown (no ss)"
        print(f"h2-windows: window {args.window}{' (connection window open)' if args.open_connection else ''}, "
              f"{args.clients} clients x 100 streams: gatehouse RSS "
              f"+{grown:.1f} MiB ({grown / args.clients:.2f} MiB per client); read per stream: median {median}")
    finally:
        gatehouse.terminate()
        gatehouse.wait()


def h1_stall(args, workdir):
    backend = start_backend(32 * MIB)
    gatehouse, web = start_gatehouse(args.bin, backend, "", workdir)
    try:
        before = rss_kib(gatehouse.pid)
        clients = [small_window_client(web) for _ in range(args.clients)]
        for client in clients:
            client.sendall(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        time.sleep(6)
        grown = rss_kib(gatehouse.pid) - before
        print(f"h1-stall: {args.clients} HTTP/1.1 clients reading nothing: gatehouse RSS "
              f"+{grown / 1024:.1f} MiB ({grown / args.clients:.0f} KiB per connection)")
    finally:
        gatehouse.terminate()
        gatehouse.wait()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("probe", choices=["slow-read", "h2-windows", "h1-stall"])
    parser.add_argument("--bin", default="target/release/gatehouse")
    parser.add_argument("--clients", type=int)
    parser.add_argument("--window", type=int, default=1)
    parser.add_argument("--size", type=int, default=200000)
    parser.add_argument("--open-connection", action="store_true")
    args = parser.parse_args()
    defaults = {"slow-read": 50, "h2-windows": 10, "h1-stall": 200}
    args.clients = args.clients or defaults[args.probe]
    with tempfile.TemporaryDirectory() as workdir:
        {"slow-read": slow_read, "h2-windows": h2_windows, "h1-stall": h1_stall}[args.probe](args, workdir)


if __name__ == "__main__":
    main()
