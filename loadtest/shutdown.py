#!/usr/bin/env python3
"""Graceful shutdown under keep-alive load: nginx, HAProxy and rusty-lb side by side.

For each proxy, a fresh instance (configs from harness.py) serves wrk -c50 keep-alive load; a few
seconds in it gets its graceful signal (nginx: SIGQUIT, HAProxy: SIGUSR1 soft stop, rusty-lb:
SIGTERM). The report gives, per run: requests served, requests that failed on an open connection
(wrk's read, write and timeout errors, and non-2xx answers: what a client sees as a broken
request), connects refused once the listener had closed (expected: the client must go elsewhere),
and how long the process took to exit after the signal.

Everything listens on 127.0.0.1, every run is bounded, and every process started is stopped at
the end. Run it through `loadtest/shutdown.sh`, which installs what it needs.
"""

import argparse
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import harness as h

SIGNALS = {"nginx": signal.SIGQUIT, "haproxy": signal.SIGUSR1, "rusty-lb": signal.SIGTERM}


def wrk_raw(port, conns, duration):
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--timeout", "2s", f"http://127.0.0.1:{port}/"],
        capture_output=True, text=True,
    ).stdout
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    connect, read, write, timeout = (int(x) for x in m.groups()) if m else (0, 0, 0, 0)
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non2xx = int(m.group(1)) if m else 0
    # wrk reports a refused connect as a write error (its connects are non-blocking), so write
    # errors count reconnect attempts after the listener closed, not broken requests. A read
    # error is a request written on an open connection that got no response.
    return {"requests": reqs, "failed": read + timeout + non2xx, "refused": connect + write,
            "detail": f"read {read}, timeout {timeout}, non-2xx {non2xx}"}


def one_run(target, start, after, duration):
    proc = start()
    h.wait_port(h.PORTS[target])
    h.wrk(h.PORTS[target], "/", 50, 1)  # warm the upstream pool
    result = {}
    t = threading.Thread(target=lambda: result.update(wrk_raw(h.PORTS[target], 50, duration)))
    t.start()
    time.sleep(after)
    t0 = time.time()
    proc.send_signal(SIGNALS[target])
    try:
        proc.wait(timeout=60)
        result["exit_s"] = time.time() - t0
    except subprocess.TimeoutExpired:
        result["exit_s"] = None
        proc.kill()
        proc.wait()
    t.join()
    h.procs[:] = [(n, p) for n, p in h.procs if p is not proc]
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=f"{h.ROOT}/target/release/rusty-lb")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--targets", default="nginx,haproxy,rusty-lb")
    ap.add_argument("--out", help="write the markdown report here too")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="rusty-shutdown-")
    print(f"work directory (configs, logs): {work}", file=sys.stderr)
    starters = {
        "nginx": lambda: h.start_nginx(work, 2),
        "haproxy": lambda: h.start_haproxy(work, 2),
        "rusty-lb": lambda: h.start_rusty(work, 2, args.binary),
    }
    results = []
    try:
        h.start_backends(work)
        for rnd in range(args.rounds):
            for target in [t for t in args.targets.split(",") if t]:
                r = one_run(target, starters[target], after=3, duration=6)
                results.append((target, rnd + 1, r))
                print(f"{target} round {rnd + 1}: {r}", file=sys.stderr)
        report = render(h.machine(), results)
        print(report)
        if args.out:
            h.write(args.out, report)
    finally:
        h.stop_all()


def render(info, results):
    out = [
        "# Graceful shutdown under keep-alive load",
        "",
        f"{info['date']}, {info['cpus']} CPUs, kernel {info['kernel']}; {info['nginx']}; "
        f"{info['haproxy']}; rusty-lb {info['rusty-lb']} ({info['rustc']}).",
        "",
        "Command: `loadtest/shutdown.sh`. wrk -t1 -c50 keep-alive for 6 s; the graceful signal 3 s in "
        "(nginx SIGQUIT, HAProxy SIGUSR1, rusty-lb SIGTERM). *Failed*: wrk's read and timeout "
        "errors and non-2xx answers, i.e. requests written on an open connection that got no good "
        "response. *Refused*: wrk's connect and write errors, which are its reconnects after the "
        "listener closed (wrk reports a refused non-blocking connect as a write error, and keeps "
        "reconnecting until its 6 s are over, so this counts attempts, not clients). Runs "
        "interleaved; requests differ because the proxies' throughput does (see the harness).",
        "",
        "| proxy | round | requests | failed | of which | refused (re)connects | exit after signal |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    for target, rnd, r in results:
        exit_s = f"{r['exit_s']:.2f} s" if r.get("exit_s") is not None else "> 60 s (killed)"
        out.append(f"| {target} | {rnd} | {r['requests']:,} | {r['failed']} | {r['detail']} | "
                   f"{r['refused']:,} | {exit_s} |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
