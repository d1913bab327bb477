#!/usr/bin/env python3
"""Agent -> data planes: from a decision in the agent to the table installed in every data plane.

One rusty-agent runs a `static` service of two addresses on 127.0.0.1: one always listening, one
that this script opens and closes every --period. The agent checks both over TCP every 10 ms
(rise 1, fall 1), so every flip is a decision and a new table version. N rusty-lb processes
(--threads 1 each) subscribe to it over the WebSocket. Both programs log JSON lines, and on one
machine they share one clock, so per table version V:

  decided(V)        the agent's "table published" line, minus its `took_us` (the time it spent
                    building, checking and saving the table before sending it)
  installed(V, dp)  the first "table applied" line at that data plane with a version >= V (a
                    data plane that skipped V for a newer table has V's decision when it
                    installs the newer one)
  latency(V)        max over the data planes of installed(V, dp) - decided(V)

The report gives p50, p99 and max of latency(V) for each N, and the agent's own share (took_us).
The first versions of each round (the data planes' first tables) are left out. It also gives
the agent's CPU time per table sent (utime+stime over the round, from /proc) and its peak RSS
(VmHWM, since its start).

--bulk K adds a second static service of K addresses (127.0.x.y on the steady port, which
listens on every loopback address; checked every 5 s) so every table is large: each flip then
sends K+2 backends to every data plane.

Every process it starts is stopped on exit. Run it through loadtest/fanout.sh, which builds the
binaries in release.
"""

import argparse
import datetime
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

ROOT = harness.ROOT

AGENT_PORT = 17170
FLAP_PORT = 17190
STEADY_PORT = 17191
DP_PORT = 17200  # data plane i listens on DP_PORT + i, its admin on DP_PORT + 100 + i
WARMUP = 3

# Processes are started and stopped as the load-test harness does (its `procs` list).
procs = harness.procs


def start(name, argv, work):
    return harness.start(name, argv, logdir=work)


def lines(path, message):
    """(unix seconds, fields) of the JSON log lines of `path` with this message."""
    out = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            fields = rec.get("fields", {})
            if fields.get("message") == message:
                ts = datetime.datetime.fromisoformat(rec["timestamp"].replace("Z", "+00:00"))
                out.append((ts.timestamp(), fields))
    return out


def wait_for(path, message, count=1, limit=30):
    end = time.time() + limit
    while time.time() < end:
        for name, p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{name} exited with {p.returncode}; see its log in the work directory")
        if os.path.exists(path) and len(lines(path, message)) >= count:
            return
        time.sleep(0.05)
    raise SystemExit(f"{path}: no {message!r} after {limit}s")


def serve_until(sock, deadline):
    """Accept and close connections (the agent's TCP checks) until `deadline`: a backlog left
    full would fail the checks."""
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(None if left == float("inf") else left)
        try:
            sock.accept()[0].close()
        except (socket.timeout, OSError):
            return


class Flapper:
    """A listener on FLAP_PORT that is open for `period`, closed for `period`, and so on."""

    def __init__(self, period):
        self.period = period
        self.stop = threading.Event()
        self.flips = 0
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        sock = None
        while not self.stop.is_set():
            if sock is None:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", FLAP_PORT))
                sock.listen(64)
            else:
                sock.close()
                sock = None
            self.flips += 1
            deadline = time.monotonic() + self.period
            if sock is not None:
                serve_until(sock, deadline)
            self.stop.wait(max(0.0, deadline - time.monotonic()))
        if sock is not None:
            sock.close()


def cpu_seconds(pid):
    """utime + stime of a process, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--agent", default=f"{ROOT}/target/release/rusty-agent")
    ap.add_argument("--binary", default=f"{ROOT}/target/release/rusty-lb")
    ap.add_argument("--planes", default="1,8,32", help="data plane counts, one round each")
    ap.add_argument("--tables", type=int, default=200, help="table versions per round")
    ap.add_argument("--period", type=float, default=0.05, help="seconds between flips")
    ap.add_argument("--out", help="write the markdown report here too")
    ap.add_argument("--bulk", type=int, default=0, help="backends of a second, large static service")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="rusty-fanout-")
    print(f"work directory (configs, logs): {work}", file=sys.stderr)
    steady = socket.socket()
    steady.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    steady.bind(("0.0.0.0" if args.bulk else "127.0.0.1", STEADY_PORT))
    steady.listen(64)
    threading.Thread(target=serve_until, args=(steady, float("inf")), daemon=True).start()
    with open(f"{work}/agent.toml", "w") as f:
        f.write(f"""[agent]
listen = "127.0.0.1:{AGENT_PORT}"
state_dir = "{work}/agent"
log = "info"

[services.flap]
runtime = "static"
hosts = ["flap.example"]
addresses = ["127.0.0.1:{STEADY_PORT}", "127.0.0.1:{FLAP_PORT}"]

[services.flap.health]
kind = "tcp"
interval = "10ms"
timeout = "100ms"
rise = 1
fall = 1
""")
        if args.bulk:
            bulk = ", ".join(f'"127.{1 + i // 62500}.{i // 250 % 250}.{i % 250 + 1}:{STEADY_PORT}"'
                             for i in range(args.bulk))
            f.write(f"""
[services.bulk]
runtime = "static"
hosts = ["bulk.example"]
addresses = [{bulk}]

[services.bulk.health]
kind = "tcp"
interval = "5s"
timeout = "1s"
rise = 1
fall = 3
""")
    results = []
    try:
        agent = start("agent", [args.agent, "run", "--config", f"{work}/agent.toml", "--log-format", "json"], work)
        wait_for(f"{work}/agent.log", "table published")
        if args.bulk:
            # Every bulk address in: the first checks of thousands of addresses take a while.
            end = time.time() + 120
            while time.time() < end:
                if any(f.get("backends", "").find(f"bulk={args.bulk}") >= 0
                       for _, f in lines(f"{work}/agent.log", "table published")):
                    break
                time.sleep(0.5)
            else:
                raise SystemExit(f"the {args.bulk} bulk backends never all entered the table; see {work}")
        for n in [int(x) for x in args.planes.split(",") if x]:
            planes = []
            for i in range(n):
                name = f"dp{n}-{i}"
                planes.append((name, start(name, [
                    args.binary,
                    "--listen", f"127.0.0.1:{DP_PORT + i}",
                    "--admin", f"127.0.0.1:{DP_PORT + 100 + i}",
                    "--agent", f"ws://127.0.0.1:{AGENT_PORT}/v1/tables",
                    "--token-file", f"{work}/agent/token",
                    "--threads", "1",
                    "--log", "info",
                    "--log-format", "json",
                ], work)))
            for name, _ in planes:
                wait_for(f"{work}/{name}.log", "table applied")
            first = max(f["version"] for _, f in lines(f"{work}/agent.log", "table published"))
            cpu_before = cpu_seconds(agent.pid)
            flapper = Flapper(args.period)
            flapper.thread.start()
            end = time.time() + args.tables * args.period * 4 + 30
            while time.time() < end:
                published = [f["version"] for _, f in lines(f"{work}/agent.log", "table published")]
                if sum(v > first for v in published) >= args.tables + WARMUP:
                    break
                time.sleep(0.2)
            flapper.stop.set()
            flapper.thread.join()
            time.sleep(1)  # the last tables reach every data plane
            agent_cpu = cpu_seconds(agent.pid) - cpu_before
            agent_hwm = peak_rss_mib(agent.pid)
            harness.stop_all_of(planes)
            procs[:] = [p for p in procs if p not in planes]
            published = [(t, f) for t, f in lines(f"{work}/agent.log", "table published")
                         if f["version"] > first]
            decided = {f["version"]: t - f["took_us"] / 1e6 for t, f in published}
            took = {f["version"]: f["took_us"] / 1e3 for _, f in published}
            versions = sorted(decided)[WARMUP:WARMUP + args.tables]
            applied = {name: sorted((f["version"], t) for t, f in lines(f"{work}/{name}.log", "table applied"))
                       for name, _ in planes}
            latencies, missing, skipped = [], 0, 0
            for v in versions:
                worst = 0.0
                for name in applied:
                    later = [(av, t) for av, t in applied[name] if av >= v]
                    if not later:
                        missing += 1
                        worst = float("nan")
                        break
                    skipped += later[0][0] != v
                    worst = max(worst, later[0][1] - decided[v])
                if worst == worst:
                    latencies.append(worst * 1e3)
            if not latencies:
                raise SystemExit(f"{n} data planes: no table reached every data plane; see {work}")
            row = {
                "planes": n,
                "tables": len(latencies),
                "p50": percentile(latencies, 0.5),
                "p99": percentile(latencies, 0.99),
                "max": max(latencies),
                "took_p50": statistics.median(took[v] for v in versions),
                "took_p99": percentile([took[v] for v in versions], 0.99),
                "missing": missing,
                "skipped": skipped,
                "agent_cpu_ms": agent_cpu * 1e3 / max(1, sum(f["version"] > first for _, f in published)),
                "agent_hwm": agent_hwm,
            }
            results.append(row)
            print(f"{n:>2} data planes: {row['tables']} tables, p50 {row['p50']:.2f} ms, p99 {row['p99']:.2f} ms, "
                  f"max {row['max']:.2f} ms (agent's share p50 {row['took_p50']:.2f} ms); "
                  f"{skipped} skipped, {missing} never installed", file=sys.stderr)
    finally:
        harness.stop_all()
        steady.close()
    report = render(args, results)
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    if any(r["missing"] for r in results):
        sys.exit(f"some tables never reached every data plane; see {work}")


def render(args, results):
    rev = subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip()
    lines_ = [
        "# Agent to data planes: decision to installed everywhere",
        "",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} CPUs; "
        f"rusty-agent and rusty-lb at {rev}",
        (f"- one static service of 2 backends (a small table, ~0.5 KB); a flip every {args.period * 1000:.0f} ms, "
         if not args.bulk else
         f"- a static service of 2 backends and one of {args.bulk:,} (`--bulk`); a flip every {args.period * 1000:.0f} ms, ")
        +
        "each a new version; every data plane `--threads 1`, all on 127.0.0.1 and the same 2 cores as the agent",
        "- latency of a version: from the agent's decision (its `table published` log line minus `took_us`) to "
        "the last data plane's `table applied` line for it or a newer version; log timestamps, microseconds",
        "",
        "- agent CPU: its utime+stime over the round / tables it published in the round; agent peak RSS: VmHWM at "
        "the end of the round (since its start: rounds run in the order of the table)",
        "",
        "| data planes | tables | p50 ms | p99 ms | max ms | agent's share p50 / p99 ms | versions skipped | never installed | agent CPU ms/table | agent peak RSS MiB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        lines_.append(
            f"| {r['planes']} | {r['tables']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.2f} | "
            f"{r['took_p50']:.2f} / {r['took_p99']:.2f} | {r['skipped']} | {r['missing']} | "
            f"{r['agent_cpu_ms']:.2f} | {r['agent_hwm']:.1f} |")
    return "\n".join(lines_) + "\n"


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        main()
    except KeyboardInterrupt:
        harness.stop_all()
        sys.exit(130)
