#!/usr/bin/env python3
"""Draws the peer benchmark's CSV (../shared/bench/peerbench.sh) as one SVG chart.

    python3 benches/chart.py docs/bench/RESULTS.csv [more.csv ...] -o docs/bench/chart.svg [--markdown]

Left panel: each proxy's CPU per request relative to the better of nginx and HAProxy in the
same run (1.0 = the better peer; the issue's target is 0.7), per scenario — the median over
every run in the given files. Right panel: RSS per idle connection in KiB (after connect,
after one request). With --markdown, also prints the table of every scenario (medians over
runs) for docs/benchmarks.md. Standard library only, so it runs wherever the benchmark does.
"""

import argparse
import csv
import statistics
from collections import defaultdict

PEERS = ["nginx", "haproxy", "gatehouse"]
COLOURS = {"nginx": "#4e79a7", "haproxy": "#f28e2b", "gatehouse": "#59a14f"}
SCENARIOS = ["http-keepalive", "https-keepalive", "https-new-conn", "tcp-l4", "h2", "large-1m"]


def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def load(paths):
    """(scenario, peer) -> list of CPU ms per 1k requests; peer -> idle KiB lists."""
    cpu = defaultdict(list)
    idle = defaultdict(lambda: {"open": [], "req": []})
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                peer = row["peer"]
                if row["scenario"] == "idle-conns":
                    for key, column in (("open", "idle_kib_per_conn_open"), ("req", "idle_kib_per_conn_req")):
                        value = number(row.get(column))
                        if value is not None:
                            idle[peer][key].append(value)
                    continue
                value = number(row.get("cpu_ms_per_1k"))
                if value is not None:
                    cpu[(row["scenario"], peer, row["run"], path)].append(value)
    return cpu, idle


def relative_cpu(cpu):
    """scenario -> peer -> median over runs of (CPU per request / better peer's)."""
    ratios = defaultdict(lambda: defaultdict(list))
    runs = {(run, path) for (_, _, run, path) in cpu}
    for scenario in SCENARIOS:
        for run, path in runs:
            values = {peer: cpu.get((scenario, peer, run, path), [None])[0] for peer in PEERS}
            peers = [values[p] for p in ("nginx", "haproxy") if values[p]]
            if not peers:
                continue
            best = min(peers)
            for peer, value in values.items():
                if value:
                    ratios[scenario][peer].append(value / best)
    return {s: {p: statistics.median(v) for p, v in peers.items()} for s, peers in ratios.items()}


def svg(ratios, idle, title):
    width, height = 980, 420
    left, top, plot_w, plot_h = 60, 60, 560, 280
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="24" text-anchor="middle" font-size="16">{title}</text>',
        f'<text x="{left}" y="48">CPU per request, relative to the better of nginx and HAProxy '
        f"(lower is better)</text>",
    ]
    top_value = max([2.0] + [v for peers in ratios.values() for v in peers.values()])
    scale = plot_h / top_value

    def y(value):
        return top + plot_h - value * scale

    for mark in (0.5, 1.0, 1.5, 2.0):
        if mark <= top_value:
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(mark)}" y2="{y(mark)}" stroke="#ddd"/>')
            out.append(f'<text x="{left - 6}" y="{y(mark) + 4}" text-anchor="end">{mark:.1f}</text>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(0.7)}" y2="{y(0.7)}" '
               f'stroke="#59a14f" stroke-dasharray="6 4"/>')
    out.append(f'<text x="{left + plot_w}" y="{y(0.7) - 4}" text-anchor="end" fill="#59a14f">target 0.7</text>')
    group = plot_w / len(SCENARIOS)
    bar = group / (len(PEERS) + 1)
    for index, scenario in enumerate(SCENARIOS):
        x0 = left + index * group + bar / 2
        for offset, peer in enumerate(PEERS):
            value = ratios.get(scenario, {}).get(peer)
            if value is None:
                continue
            x = x0 + offset * bar
            out.append(f'<rect x="{x:.1f}" y="{y(value):.1f}" width="{bar - 2:.1f}" '
                       f'height="{value * scale:.1f}" fill="{COLOURS[peer]}"/>')
            if peer == "gatehouse":
                out.append(f'<text x="{x + bar / 2:.1f}" y="{y(value) - 4:.1f}" text-anchor="middle" '
                           f'font-size="10">{value:.2f}</text>')
        out.append(f'<text x="{left + index * group + group / 2:.1f}" y="{top + plot_h + 16}" '
                   f'text-anchor="middle" font-size="11">{scenario}</text>')
    out.append(f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + plot_h}" stroke="black"/>')
    out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="black"/>')

    # Right panel: KiB per idle connection.
    right, right_w = left + plot_w + 90, 260
    out.append(f'<text x="{right}" y="48">KiB RSS per idle connection (lower is better)</text>')
    medians = {p: {k: statistics.median(v) if v else None for k, v in idle.get(p, {}).items()} for p in PEERS}
    top_kib = max([1.0] + [v for p in medians.values() for v in p.values() if v])
    kib_scale = plot_h / top_kib
    kinds = [("open", "after connect"), ("req", "after a request")]
    group = right_w / len(kinds)
    bar = group / (len(PEERS) + 1)
    for index, (key, label) in enumerate(kinds):
        x0 = right + index * group + bar / 2
        for offset, peer in enumerate(PEERS):
            value = medians[peer].get(key) if medians.get(peer) else None
            if value is None:
                continue
            x = x0 + offset * bar
            out.append(f'<rect x="{x:.1f}" y="{top + plot_h - value * kib_scale:.1f}" width="{bar - 2:.1f}" '
                       f'height="{value * kib_scale:.1f}" fill="{COLOURS[peer]}"/>')
            out.append(f'<text x="{x + bar / 2:.1f}" y="{top + plot_h - value * kib_scale - 4:.1f}" '
                       f'text-anchor="middle" font-size="10">{value:.1f}</text>')
        out.append(f'<text x="{right + index * group + group / 2:.1f}" y="{top + plot_h + 16}" '
                   f'text-anchor="middle" font-size="11">{label}</text>')
    out.append(f'<line x1="{right}" x2="{right + right_w}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="black"/>')

    for offset, peer in enumerate(PEERS):
        x = left + offset * 140
        out.append(f'<rect x="{x}" y="{height - 30}" width="12" height="12" fill="{COLOURS[peer]}"/>')
        out.append(f'<text x="{x + 18}" y="{height - 20}">{peer}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def markdown(paths):
    """The table of every scenario: medians over runs of each peer's figures, and ratios."""
    rows = defaultdict(lambda: defaultdict(list))
    for path in paths:
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                for column in ("rps", "mib_s", "p99_ms", "cpu_ms_per_1k", "tcp_opens_per_req",
                               "idle_kib_per_conn_open", "idle_kib_per_conn_req"):
                    value = number(row.get(column))
                    if value is not None:
                        rows[(row["scenario"], row["peer"])][column].append(value)

    def med(scenario, peer, column):
        values = rows.get((scenario, peer), {}).get(column)
        return statistics.median(values) if values else None

    def cell(value, digits=1):
        return "n/a" if value is None else f"{value:,.{digits}f}"

    def ratio(mine, theirs):
        return "n/a" if mine is None or not theirs else f"{mine / theirs:.2f}×"

    lines = [
        "| scenario | CPU-µs/req nginx | HAProxy | gatehouse | vs nginx | vs HAProxy "
        "| req/s direct | nginx | HAProxy | gatehouse | p99 ms nginx | HAProxy | gatehouse "
        "| upstream conns/req |",
        "|---" * 14 + "|",
    ]
    for scenario in SCENARIOS:
        cpu = {p: med(scenario, p, "cpu_ms_per_1k") for p in PEERS}
        rate = "mib_s" if scenario == "large-1m" else "rps"
        rps = {p: med(scenario, p, rate) for p in ["direct"] + PEERS}
        p99 = {p: med(scenario, p, "p99_ms") for p in PEERS}
        lines.append(
            f"| {scenario}{' (MiB/s)' if rate == 'mib_s' else ''} | {cell(cpu['nginx'])} | {cell(cpu['haproxy'])} "
            f"| {cell(cpu['gatehouse'])} | {ratio(cpu['gatehouse'], cpu['nginx'])} "
            f"| {ratio(cpu['gatehouse'], cpu['haproxy'])} | {cell(rps['direct'], 0)} | {cell(rps['nginx'], 0)} "
            f"| {cell(rps['haproxy'], 0)} | {cell(rps['gatehouse'], 0)} | {cell(p99['nginx'], 2)} "
            f"| {cell(p99['haproxy'], 2)} | {cell(p99['gatehouse'], 2)} "
            f"| {cell(med(scenario, 'gatehouse', 'tcp_opens_per_req'), 3)} |"
        )
    idle = {p: (med("idle-conns", p, "idle_kib_per_conn_open"), med("idle-conns", p, "idle_kib_per_conn_req"))
            for p in PEERS}
    lines.append("")
    lines.append("| KiB RSS per idle connection | nginx | HAProxy | gatehouse |")
    lines.append("|---|---|---|---|")
    lines.append("| after connect | " + " | ".join(cell(idle[p][0], 2) for p in PEERS) + " |")
    lines.append("| after one request | " + " | ".join(cell(idle[p][1], 2) for p in PEERS) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", help="peerbench results CSV file(s)")
    parser.add_argument("-o", "--output", required=True, help="SVG file to write")
    parser.add_argument("--markdown", action="store_true", help="also print the scenario table")
    parser.add_argument("--title", default="gatehouse beside nginx and HAProxy (peerbench, one worker each)")
    args = parser.parse_args()
    cpu, idle = load(args.csv)
    with open(args.output, "w") as handle:
        handle.write(svg(relative_cpu(cpu), idle, args.title))
    if args.markdown:
        print(markdown(args.csv))


if __name__ == "__main__":
    main()
