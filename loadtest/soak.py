#!/usr/bin/env python3
"""Soak: rusty-lb under steady load for a long time, with a table swap every few seconds and
connection churn, sampling its memory and open descriptors.

The same three nginx backends as harness.py. For --minutes, in parallel:
- wrk -t1 keep-alive load, in windows of --window seconds (each window's requests, errors and
  p99 are a row of the report);
- a churn client opening a new connection per request, --churn requests a second;
- a table swap every --swap seconds (weights alternate, and every third swap drops and restores
  a backend), by rewriting the table file and SIGHUP.
After each window: rusty-lb's RSS and open descriptors. The verdict: 0 failed requests, and
RSS and descriptors after the warm-up (the first quarter) within --rss-slack of their level
then.

Everything listens on 127.0.0.1 and stops at the end. Run it through `loadtest/soak.sh`.
"""

import argparse
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time

import harness as h


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+) kB", f.read()).group(1))


def fds(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def swapper(work, proc, period, stop, counts):
    version = int(time.time() * 1000)
    while not stop.wait(period):
        version += 1
        counts["swaps"] += 1
        weights = (1, 2, 3) if version % 2 else (3, 2, 1)
        text = json.loads(h.table(version, weights))
        if counts["swaps"] % 3 == 0:
            # One backend leaves for one period, then comes back.
            text["services"][0]["backends"].pop()
        tmp = f"{work}/table.json.tmp"
        h.write(tmp, json.dumps(text))
        os.rename(tmp, f"{work}/table.json")
        os.kill(proc.pid, signal.SIGHUP)


def churn(port, rate, stop, counts):
    """A new connection per request, `rate` a second; counts answers that are not 200."""
    period = 1.0 / rate
    nxt = time.monotonic()
    while not stop.is_set():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                data = b""
                while True:
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    data += chunk
            if data.startswith(b"HTTP/1.1 200 "):
                counts["churn_ok"] += 1
            else:
                counts["churn_failed"] += 1
                counts["churn_examples"].append(data[:80].decode("latin-1"))
        except OSError as e:
            counts["churn_failed"] += 1
            counts["churn_examples"].append(str(e))
        nxt += period
        delay = nxt - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        else:
            nxt = time.monotonic()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=f"{h.ROOT}/target/release/rusty-lb")
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--window", type=int, default=60, help="seconds per wrk window and sample")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--swap", type=float, default=3, help="seconds between table swaps")
    ap.add_argument("--churn", type=int, default=50, help="new-connection requests a second")
    ap.add_argument("--rss-slack", type=float, default=0.10, help="allowed growth after warm-up")
    ap.add_argument("--out", help="write the markdown report here too")
    ap.add_argument("--smoke", action="store_true",
                    help="a few seconds, to keep the script working: fails only on failed requests")
    args = ap.parse_args()
    if args.smoke:
        args.minutes, args.window, args.swap, args.churn = 0.2, 3, 1, 20

    work = tempfile.mkdtemp(prefix="rusty-soak-")
    os.chmod(work, 0o755)
    print(f"work directory: {work}", file=sys.stderr)
    counts = {"swaps": 0, "churn_ok": 0, "churn_failed": 0, "churn_examples": []}
    stop = threading.Event()
    rows = []
    try:
        h.start_backends(work)
        proc = h.start_rusty(work, 2, args.binary)
        port = h.PORTS["rusty-lb"]
        h.wait_port(port)
        threads = [
            threading.Thread(target=swapper, args=(work, proc, args.swap, stop, counts), daemon=True),
            threading.Thread(target=churn, args=(port, args.churn, stop, counts), daemon=True),
        ]
        for t in threads:
            t.start()
        windows = max(1, int(args.minutes * 60 / args.window))
        started = time.time()
        for i in range(windows):
            r = h.wrk(port, "/", args.conns, args.window)
            rows.append({
                "minute": (time.time() - started) / 60,
                "rps": r["rps"],
                "errors": r["errors"],
                "p99": r["p99"],
                "rss_mb": rss_kb(proc.pid) / 1024,
                "fds": fds(proc.pid),
                "swaps": counts["swaps"],
                "churn_failed": counts["churn_failed"],
            })
            row = rows[-1]
            print(
                f"{row['minute']:6.1f} min  {row['rps']:9.0f} req/s  errors {row['errors']}  "
                f"p99 {row['p99']:.2f} ms  rss {row['rss_mb']:.1f} MB  fds {row['fds']}  "
                f"swaps {row['swaps']}  churn failed {row['churn_failed']}",
                file=sys.stderr,
            )
        stop.set()
        for t in threads:
            t.join(timeout=10)
    finally:
        stop.set()
        h.stop_all()

    warm = rows[max(0, len(rows) // 4 - 1)]
    after = rows[len(rows) // 4:]
    rss_max = max(r["rss_mb"] for r in after)
    fds_max = max(r["fds"] for r in after)
    # Descriptors come and go with the connections open at the sampling instant (wrk's closing,
    # the churn, the upstream pool): a leak raises the floor, so the floor of the last quarter
    # is what must stay at the warm-up level.
    fds_floor = min(r["fds"] for r in rows[-max(1, len(rows) // 4):])
    failed = sum(r["errors"] for r in rows) + counts["churn_failed"]
    flat_rss = rss_max <= warm["rss_mb"] * (1 + args.rss_slack)
    flat_fds = fds_floor <= warm["fds"] + 8
    verdict = "PASS" if failed == 0 and flat_rss and flat_fds else "FAIL"
    m = h.machine()
    on = f"{m['cpus']} cores, kernel {m['kernel']}, {m['rustc']}, rusty-lb {m['rusty-lb']}"
    lines = [
        f"# Soak, {time.strftime('%Y-%m-%d')}: {verdict}",
        "",
        f"`loadtest/soak.sh --minutes {args.minutes:g}` on {on} ({m['date']}): rusty-lb `--threads 2` "
        f"before three nginx backends; wrk -t1 -c{args.conns} keep-alive in {args.window} s windows, "
        f"{args.churn} new-connection requests a second beside it, a table swap every {args.swap:g} s "
        "(weights alternate; every third swap drops a backend for one period).",
        "",
        f"- requests: {sum(r['rps'] * args.window for r in rows):,.0f} keep-alive, "
        f"{counts['churn_ok']:,} on new connections; failed: {failed}",
        f"- table swaps: {counts['swaps']}",
        f"- RSS after the warm-up (minute {warm['minute']:.0f}): {warm['rss_mb']:.1f} MB, highest "
        f"after it {rss_max:.1f} MB ({'flat' if flat_rss else 'GREW'}, slack {args.rss_slack:.0%})",
        f"- open descriptors after the warm-up: {warm['fds']}; after it highest {fds_max}, lowest "
        f"in the last quarter {fds_floor} ({'flat' if flat_fds else 'GREW'})",
        "",
        "| minute | req/s | errors | p99 ms | RSS MB | fds | swaps so far | churn failed so far |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['minute']:.1f} | {r['rps']:,.0f} | {r['errors']} | {r['p99']:.2f} | "
            f"{r['rss_mb']:.1f} | {r['fds']} | {r['swaps']} | {r['churn_failed']} |"
        )
    if counts["churn_examples"]:
        lines += ["", "Churn failures (first 5): " + "; ".join(counts["churn_examples"][:5])]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        h.write(args.out, report)
    if args.smoke:
        return 0 if failed == 0 else 1
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
