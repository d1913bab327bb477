#!/usr/bin/env python3
"""Slowloris side by side: nginx, HAProxy and rusty-lb under ~1,000 slow-header connections.

For each proxy in turn (same backends and configs as harness.py), Debian's slowhttptest opens
slow connections that send a header line every few seconds and never finish their head, while
wrk sends legitimate traffic through the same proxy. The report gives, per proxy: legitimate
requests served and failed, their p50/p99, and how long the slow connections lived (the peak
held open, how many were still open at the end, and when the count first fell below 10% of the
peak). Each proxy runs with its own default for slow heads: nginx `client_header_timeout` 60 s,
HAProxy `timeout http-request` unset (so `timeout client`, 300 s here), rusty-lb
`--header-timeout` 10 s.

Everything listens on 127.0.0.1, each run is bounded by --duration, and every process started is
stopped at the end. Run it through `loadtest/slowloris.sh`, which installs what it needs.
"""

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import threading

import harness as h


def slow_run(target, port, conns, duration, work):
    prefix = os.path.join(work, f"slow-{target}")
    slow = subprocess.Popen(
        ["slowhttptest", "-H", "-c", str(conns), "-r", "200", "-i", "5", "-x", "24",
         "-l", str(duration), "-p", "3", "-g", "-o", prefix, "-u", f"http://127.0.0.1:{port}/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    legit = {}

    def run_wrk():
        # Start once the slow connections are ramping, stop before slowhttptest does.
        threading.Event().wait(2)
        legit.update(h.wrk(port, "/", 10, max(3, duration - 4)))

    t = threading.Thread(target=run_wrk)
    t.start()
    t.join()
    try:
        slow.wait(timeout=duration + 30)
    except subprocess.TimeoutExpired:
        slow.kill()
    rows = []
    with open(prefix + ".csv") as f:
        for row in csv.DictReader(f):
            rows.append({k.strip().lower(): v.strip() for k, v in row.items() if k})
    connected = [(int(r["seconds"]), int(r["connected"])) for r in rows if r.get("connected", "").isdigit()]
    peak = max((c for _, c in connected), default=0)
    peak_at = next((s for s, c in connected if c == peak), 0)
    fell = next((s for s, c in connected if s > peak_at and c < peak / 10), None)
    return {
        "legit": legit,
        "peak": peak,
        "end": connected[-1][1] if connected else 0,
        "fell_below_10pct_at": fell,
        "seconds": connected[-1][0] if connected else 0,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=f"{h.ROOT}/target/release/rusty-lb")
    ap.add_argument("--connections", type=int, default=1000)
    ap.add_argument("--duration", type=int, default=40, help="seconds per proxy")
    ap.add_argument("--targets", default="nginx,haproxy,rusty-lb")
    ap.add_argument("--out", help="write the markdown report here too")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="rusty-slowloris-")
    os.chmod(work, 0o755)
    print(f"work directory (configs, logs, slowhttptest CSVs): {work}", file=sys.stderr)
    results = {}
    try:
        h.start_backends(work)
        starters = {
            "nginx": lambda: h.start_nginx(work, 2),
            "haproxy": lambda: h.start_haproxy(work, 2),
            "rusty-lb": lambda: h.start_rusty(work, 2, args.binary),
        }
        for target in [t for t in args.targets.split(",") if t]:
            proc = starters[target]()
            h.wait_port(h.PORTS[target])
            h.wrk(h.PORTS[target], "/", 10, 1)  # warm the upstream pool
            r = slow_run(target, h.PORTS[target], args.connections, args.duration, work)
            results[target] = r
            print(f"{target}: {r}", file=sys.stderr)
            proc.terminate()
            proc.wait(timeout=15)
            h.procs[:] = [(n, p) for n, p in h.procs if p is not proc]
        report = render(h.machine(), args, results)
        print(report)
        if args.out:
            h.write(args.out, report)
    finally:
        h.stop_all()


def render(info, args, results):
    out = [
        f"# Slowloris: {args.connections} slow-header connections, {args.duration} s per proxy",
        "",
        f"{info['date']}, {info['cpus']} CPUs, kernel {info['kernel']}; {info['nginx']}; "
        f"{info['haproxy']}; rusty-lb {info['rusty-lb']} ({info['rustc']}).",
        "",
        "Command: `loadtest/slowloris.sh` (slowhttptest -H -c N -r 200 -i 5 -x 24; legitimate load "
        "wrk -t1 -c10 alongside, through the same proxy). One run; the slow-connection counts come "
        "from slowhttptest's per-second CSV.",
        "",
        "| proxy | legit requests | legit errors | p50 ms | p99 ms | slow conns peak | still open at end "
        "| below 10% of peak after |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for target, r in results.items():
        legit = r["legit"]
        fell = f"{r['fell_below_10pct_at']} s" if r["fell_below_10pct_at"] is not None else f"> {r['seconds']} s"
        out.append(
            f"| {target} | {legit.get('requests', 0):,} | {legit.get('errors', 'n/a')} | "
            f"{legit.get('p50', float('nan')):.2f} | {legit.get('p99', float('nan')):.2f} | {r['peak']} | "
            f"{r['end']} | {fell} |"
        )
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
