#!/usr/bin/env python3
"""Memory per client connection: idle keep-alive ones, and busy ones, next to nginx and HAProxy.

For each target, a fresh proxy in front of the harness's backends (loadtest/harness.py, the same
configs, with the connection limits raised): its RSS (VmRSS of all its processes) is read after
a few warm-up requests, then N client connections are opened, each makes one request, reads the
response and stays open; RSS is read again once they are all idle. (after - before) / N is the
memory an idle keep-alive connection costs. Then N busy connections: `wrk -c N` for a few
seconds, RSS read at the end, minus the idle figure's baseline.

The script raises its own file-descriptor limit to the hard limit and says so when that is
too low for N (the proxy needs one per client connection, the client one each too).

Every process it starts is stopped on exit. Run it through loadtest/idle.sh.
"""

import argparse
import datetime
import os
import resource
import selectors
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

REQUEST = b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"
BATCH = 500


def rss_kib(pids):
    return harness.status_kib(pids, "VmRSS")


def response_done(buf):
    """A complete response to REQUEST: the head and Content-Length bytes of body."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return False
    head = buf[:end].lower()
    at = head.find(b"content-length:")
    if at < 0:
        return False
    length = int(head[at + 15:].split(b"\r\n", 1)[0])
    return len(buf) >= end + 4 + length


def open_idle(port, n, limit=60):
    """N connections that each made one request and read its response; raises if one fails."""
    conns = []
    deadline = time.time() + limit
    while len(conns) < n:
        batch = []
        sel = selectors.DefaultSelector()
        for _ in range(min(BATCH, n - len(conns))):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            batch.append(s)
            sel.register(s, selectors.EVENT_WRITE, b"")
        waiting = len(batch)
        while waiting:
            if time.time() > deadline:
                raise SystemExit(f"port {port}: {len(conns) + len(batch) - waiting} of {n} "
                                 f"connections answered after {limit}s")
            for key, ev in sel.select(timeout=1):
                s = key.fileobj
                if ev & selectors.EVENT_WRITE:
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        raise SystemExit(f"port {port}: connect failed: {os.strerror(err)}")
                    s.send(REQUEST)
                    sel.modify(s, selectors.EVENT_READ, b"")
                else:
                    data = s.recv(65536)
                    if not data:
                        raise SystemExit(f"port {port}: a connection closed before its response")
                    buf = key.data + data
                    if response_done(buf):
                        sel.unregister(s)
                        waiting -= 1
                    else:
                        sel.modify(s, selectors.EVENT_READ, buf)
        sel.close()
        conns.extend(batch)
    return conns


def still_open(conns):
    """How many of the connections the proxy has not closed."""
    alive = 0
    for s in conns:
        try:
            alive += s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    return alive


def busy(port, n, seconds):
    out = subprocess.run(["wrk", "-t1", f"-c{n}", f"-d{seconds}s", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True)
    return "Non-2xx" not in out.stdout and "Socket errors" not in out.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=f"{harness.ROOT}/target/release/rusty-lb")
    ap.add_argument("--targets", default="nginx,haproxy,rusty-lb")
    ap.add_argument("--conns", default="1000,9000",
                    help="connection counts (HAProxy keeps two descriptors per connection, so under a hard "
                         "limit of 20,000 it takes at most about 9,900)")
    ap.add_argument("--rounds", type=int, default=2, help="runs per target and count (median)")
    ap.add_argument("--busy-seconds", type=int, default=4)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", help="write the markdown report here too")
    args = ap.parse_args()
    counts = [int(c) for c in args.conns.split(",") if c]

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = 2 * max(counts) + 1000 if "haproxy" in args.targets else max(counts) + 1000
    if hard < need:
        raise SystemExit(f"the file-descriptor hard limit is {hard}, under the {need} that "
                         f"{max(counts)} connections need here; raise it (ulimit -Hn, or run as a user "
                         "allowed to) or pass smaller --conns")
    harness.CONN_LIMIT[0] = max(counts) + 500
    harness.ALT_ARGS.extend(["--max-connections", str(max(counts) + 500)])

    work = tempfile.mkdtemp(prefix="rusty-idle-")
    os.chmod(work, 0o755)
    print(f"work directory (configs, logs): {work}", file=sys.stderr)
    results = {}
    try:
        harness.start_backends(work)
        starters = {
            "nginx": lambda: harness.start_nginx(work, args.workers),
            "haproxy": lambda: harness.start_haproxy(work, args.workers),
            "caddy": lambda: harness.start_caddy(work, args.workers),
            "rusty-lb": lambda: harness.start_rusty(work, args.workers, args.binary, "rusty-lb-alt"),
        }
        ports = {t: harness.PORTS["rusty-lb-alt" if t == "rusty-lb" else t] for t in starters}
        for n in counts:
            for rnd in range(args.rounds):
                for t in [t for t in args.targets.split(",") if t]:
                    before_procs = len(harness.procs)
                    p = starters[t]()
                    harness.wait_port(ports[t])
                    pids = harness.pids_of(p)
                    busy(ports[t], 50, 1)  # warm: workers, upstream pools, allocator arenas
                    time.sleep(0.5)
                    base = rss_kib(pids)
                    conns = open_idle(ports[t], n)
                    time.sleep(2)
                    idle = rss_kib(pids)
                    alive = still_open(conns)
                    for s in conns:
                        s.close()
                    time.sleep(1)
                    ok = busy(ports[t], n, args.busy_seconds)
                    active = rss_kib(pids)
                    harness.stop_all_of(harness.procs[before_procs:])
                    del harness.procs[before_procs:]
                    r = {"base": base, "idle": (idle - base) / n, "active": (active - base) / n,
                         "alive": alive, "busy_ok": ok}
                    results.setdefault((n, t), []).append(r)
                    print(f"{n:>6} conns round {rnd + 1} {t:9} base {base / 1024:.1f} MiB, idle "
                          f"{r['idle']:.2f} KiB/conn ({alive} open), after wrk -c{n} "
                          f"{r['active']:.2f} KiB/conn{'' if ok else ' (wrk saw errors)'}", file=sys.stderr)
    finally:
        harness.stop_all()
    report = render(args, results, counts)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)


def render(args, results, counts):
    info = harness.machine()
    targets = [t for t in args.targets.split(",") if t]
    lines = [
        "# Memory per client connection: rusty-lb next to nginx and HAProxy",
        "",
        f"- date: {info['date']}; machine: {info['cpus']} CPUs, Linux {info['kernel']}; {info['nginx']}; "
        f"{info['haproxy']}; rusty-lb at {info['rusty-lb']}",
        f"- every proxy: {args.workers} workers/threads, the load-test harness's configs (upstream keep-alive), "
        "connection limits raised; a fresh process per run",
        "- idle: N connections each made one request (small body) and stay open; (RSS then - RSS after warm-up) / N. "
        f"busy: the same after `wrk -t1 -cN -d{args.busy_seconds}s`, RSS at its end. RSS is VmRSS summed over the "
        f"proxy's processes; median of {args.rounds} runs",
        "",
        "| conns | target | base RSS MiB | idle KiB/conn | busy KiB/conn | still open | wrk clean |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for n in counts:
        for t in targets:
            runs = results.get((n, t))
            if not runs:
                continue
            med = lambda k: sorted(r[k] for r in runs)[len(runs) // 2]  # noqa: E731
            lines.append(f"| {n:,} | {t} | {med('base') / 1024:.1f} | {med('idle'):.2f} | {med('active'):.2f} | "
                         f"{min(r['alive'] for r in runs):,} | {'yes' if all(r['busy_ok'] for r in runs) else 'no'} |")
    if len(counts) >= 2:
        lo, hi = min(counts), max(counts)
        lines += [
            "",
            f"Per added idle connection between {lo:,} and {hi:,} (the slope: memory that does not grow with the "
            "count, such as buffer lists and allocator arenas warmed by the first connections, drops out):",
            "",
            "| target | KiB per added idle connection |",
            "|---|---:|",
        ]
        for t in targets:
            a, b = results.get((lo, t)), results.get((hi, t))
            if not a or not b:
                continue
            total = lambda runs, n: sorted(r["idle"] for r in runs)[len(runs) // 2] * n  # noqa: E731
            lines.append(f"| {t} | {(total(b, hi) - total(a, lo)) / (hi - lo):.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
