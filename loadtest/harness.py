#!/usr/bin/env python3
"""Side-by-side load test: direct, nginx, HAProxy, Caddy and rusty-lb in front of the same backends.

Everything listens on 127.0.0.1. Three nginx backends (one nginx process, three ports) answer a
~100-byte body on `/` (body `small`), 64 KiB on `/big` (`big`) and 1 MiB on `/huge` (`huge`, not
run by default). Each proxy gets the same number of workers/threads and keeps upstream
connections alive. For every scenario (body x connections) the targets run
interleaved (A B C D A B C D ...) and the report gives medians with min-max, p50/p99 from wrk,
the proxy's own CPU time per request (utime+stime from /proc, all its processes and threads),
its peak RSS, errors, and ratios to direct and to nginx. A swap scenario rewrites rusty-lb's
table and sends SIGHUP at 10, 100 and 1,000 per second under load.

The targets `nginx-tls`, `rusty-lb-tls` and `rusty-lb-alt-tls` are the nginx, rusty-lb and rusty-lb-alt processes reached on
their TLS listeners (one ECDSA P-256 certificate, or RSA 2048 with --cert rsa; session tickets
and a session cache on both); their ratios are to `nginx-tls`. wrk negotiates TLS 1.2 and
resumes its sessions, so the `resumed` scenario (--handshakes: `Connection: close` on every
request) measures new connections with abbreviated handshakes; the `full` scenario
(--full-handshakes P) runs P parallel `openssl s_time -new` (TLS 1.3, a full handshake per
connection, no request). The HTTP/2 scenario (--h2-streams S,…) runs h2load over TLS (ALPN h2)
against the TLS targets at each of --conns with S streams in flight per connection.

Every process it starts is stopped on exit, including on Ctrl-C or an error.
Run it through loadtest/run.sh, which installs what it needs and builds rusty-lb.
"""

import argparse
import datetime
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TICK = os.sysconf("SC_CLK_TCK")

BACKEND_PORTS = [19101, 19102, 19103]
PORTS = {
    "direct": BACKEND_PORTS[0],
    "nginx": 18081,
    "haproxy": 18082,
    "rusty-lb": 18083,
    # rusty-lb with every request through Pingora's full proxy pipeline (--no-fast-lane): the
    # fast lane's own yardstick.
    "rusty-lb-pipeline": 18084,
    # rusty-lb with the extra flags of --alt-args: for trying a setting side by side.
    "rusty-lb-alt": 18085,
    # nginx with its access log on (combined, buffered as rusty-lb's: 64 KiB, flushed every
    # 100 ms), the peer for `rusty-lb-alt --alt-args "--access-log FILE"`.
    "nginx-log": 18086,
    # Caddy's reverse_proxy, with upstream keep-alive raised to nginx's (its default keeps 32
    # idle connections per upstream and re-dials above that).
    "caddy": 18087,
    # The TLS listeners of the nginx and rusty-lb processes above.
    "nginx-tls": 18091,
    "rusty-lb-tls": 18093,
    "rusty-lb-alt-tls": 18095,
}
# A TLS target is the TLS listener of this target's process.
TLS_OF = {"nginx-tls": "nginx", "rusty-lb-tls": "rusty-lb", "rusty-lb-alt-tls": "rusty-lb-alt"}
# Set when a TLS target runs: the certificate directory the proxies serve.
CERTS = []
ALT_ARGS = []
# Client connections each proxy must take at once (loadtest/idle.py raises it); 0: the defaults.
CONN_LIMIT = [0]
SMALL_BODY = "x" * 99 + "\n"

procs = []


def start(name, argv, **kw):
    log = open(os.path.join(kw.pop("logdir"), f"{name}.log"), "w")
    p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)
    procs.append((name, p))
    return p


def stop_all():
    stop_all_of(procs)


def stop_all_of(which):
    for name, p in reversed(which):
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + 10
    for name, p in which:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()


def wait_port(port, limit=20):
    end = time.time() + limit
    while time.time() < end:
        for name, p in procs:
            if p.poll() is not None:
                raise SystemExit(f"{name} exited with {p.returncode}; see its log in the work directory")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on 127.0.0.1:{port} after {limit}s")


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def start_backends(work):
    os.makedirs(f"{work}/www", exist_ok=True)
    write(f"{work}/www/big", "y" * 65536)
    write(f"{work}/www/huge", "z" * (1 << 20))
    servers = "\n".join(
        f"""  server {{ listen 127.0.0.1:{p} reuseport backlog=4096; keepalive_requests 1000000;
    location = / {{ return 200 "{SMALL_BODY.strip()}\\n"; }}
    location = /big {{ root {work}/www; }}
    location = /huge {{ root {work}/www; }} }}"""
        for p in BACKEND_PORTS
    )
    write(
        f"{work}/backends.conf",
        f"""worker_processes 1; daemon off; pid {work}/backends.pid; error_log stderr error;
events {{ worker_connections 4096; }}
http {{ access_log off; default_type text/plain; keepalive_timeout 300s;
{servers}
}}
""",
    )
    start("backends", ["nginx", "-c", f"{work}/backends.conf", "-p", work], logdir=work)
    for p in BACKEND_PORTS:
        wait_port(p)


def start_nginx(work, workers, name="nginx"):
    ups = "\n".join(f"    server 127.0.0.1:{p};" for p in BACKEND_PORTS)
    tls = ""
    access_log = "off"
    if name == "nginx-log":
        access_log = f"{work}/nginx-access.log combined buffer=64k flush=100ms"
    if CERTS and name == "nginx":
        tls = (f"    listen 127.0.0.1:{PORTS['nginx-tls']} ssl http2 backlog=4096;\n"
               f"    ssl_certificate {CERTS[0]}/default.crt; ssl_certificate_key {CERTS[0]}/default.key;\n"
               "    ssl_protocols TLSv1.2 TLSv1.3; ssl_session_cache shared:SSL:10m; ssl_session_tickets on;")
    write(
        f"{work}/{name}.conf",
        f"""worker_processes {workers}; daemon off; pid {work}/{name}.pid; error_log stderr error;
events {{ worker_connections {max(8192, CONN_LIMIT[0])}; }}
http {{ access_log {access_log}; keepalive_timeout 300s; keepalive_requests 1000000;
  upstream web {{
{ups}
    keepalive 256; keepalive_requests 1000000;
  }}
  server {{ listen 127.0.0.1:{PORTS[name]} backlog=4096;
{tls}
    location / {{ proxy_pass http://web; proxy_http_version 1.1; proxy_set_header Connection ""; proxy_buffering on; }}
  }}
}}
""",
    )
    return start(name, ["nginx", "-c", f"{work}/{name}.conf", "-p", work], logdir=work)


def start_haproxy(work, workers):
    servers = "\n".join(f"  server b{i} 127.0.0.1:{p}" for i, p in enumerate(BACKEND_PORTS))
    write(
        f"{work}/haproxy.cfg",
        f"""global
  nbthread {workers}
  maxconn {max(4096, CONN_LIMIT[0])}
{f"  ulimit-n {resource.getrlimit(resource.RLIMIT_NOFILE)[1]}" if CONN_LIMIT[0] else ""}
defaults
  mode http
  timeout connect 1s
  timeout client 300s
  timeout server 60s
  timeout http-keep-alive 300s
  option http-keep-alive
  http-reuse always
frontend fe
  bind 127.0.0.1:{PORTS['haproxy']}
  default_backend be
backend be
  balance roundrobin
{servers}
""",
    )
    return start("haproxy", ["haproxy", "-f", f"{work}/haproxy.cfg", "-db"], logdir=work)


def start_caddy(work, workers):
    ups = " ".join(f"127.0.0.1:{p}" for p in BACKEND_PORTS)
    write(
        f"{work}/Caddyfile",
        f"""{{
  admin off
  auto_https off
  log {{
    level ERROR
  }}
}}
http://127.0.0.1:{PORTS['caddy']} {{
  bind 127.0.0.1
  reverse_proxy {ups} {{
    lb_policy round_robin
    transport http {{
      keepalive 300s
      keepalive_idle_conns 768
      keepalive_idle_conns_per_host 256
    }}
  }}
}}
""",
    )
    # Go uses every core unless told; the other proxies get `workers` threads.
    env = dict(os.environ, GOMAXPROCS=str(workers), XDG_DATA_HOME=work, XDG_CONFIG_HOME=work,
               HOME=work)
    return start("caddy", ["caddy", "run", "--config", f"{work}/Caddyfile", "--adapter", "caddyfile"],
                 logdir=work, env=env)


# Backends of the service `bulk` in every table rusty-lb loads (--swap-backends): a large table
# that nobody sends requests to, so the swaps measure what installing it costs the requests of
# the small service `web`.
BULK = [0]


def table(version, weights=(1, 1, 1)):
    services = [
        {
            "name": "web",
            "backends": [
                {"id": f"b{i}", "addr": f"127.0.0.1:{p}", "weight": w}
                for i, (p, w) in enumerate(zip(BACKEND_PORTS, weights))
            ],
        }
    ]
    if BULK[0]:
        services.append({
            "name": "bulk",
            "hosts": ["bulk.example"],
            "backends": [
                {"id": f"x{i}", "addr": f"127.{1 + i // 62500 % 250}.{i // 250 % 250}.{i % 250 + 1}:8080",
                 "weight": 1 + (i + version) % 4}
                for i in range(BULK[0])
            ],
        })
    return json.dumps({"version": version, "services": services})


def tables_applied(proc_name):
    """rusty-lb's count of applied tables, from its admin /metrics."""
    port = PORTS[proc_name] + 100
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        body = r.read()
    m = re.search(rb'rustybalancer_table_updates_total\{result="applied"\} (\d+)', body)
    return int(m.group(1)) if m else 0


def start_rusty(work, workers, binary, name="rusty-lb"):
    write(f"{work}/table.json", table(1))
    extra = {"rusty-lb-pipeline": ["--no-fast-lane"], "rusty-lb-alt": ALT_ARGS}.get(name, [])
    if CERTS and f"{name}-tls" in PORTS:
        extra = [*extra, "--tls-listen", f"127.0.0.1:{PORTS[name + '-tls']}", "--certs", CERTS[0]]
    return start(
        name,
        [
            binary,
            "--listen", f"127.0.0.1:{PORTS[name]}",
            "--admin", f"127.0.0.1:{PORTS[name] + 100}",
            "--table", f"{work}/table.json",
            "--threads", str(workers),
            "--log", "warn",
            *extra,
        ],
        logdir=work,
    )


def pids_of(p):
    """The process and its direct children (nginx workers)."""
    out = subprocess.run(["pgrep", "-P", str(p.pid)], capture_output=True, text=True).stdout.split()
    return [p.pid] + [int(x) for x in out]


def cpu_seconds(pids):
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15)
        except OSError:
            pass
    return total / TICK


def status_kib(pids, field):
    """A memory field of /proc/PID/status (VmHWM: peak RSS, VmRSS: now), summed, in KiB."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                m = re.search(rf"{field}:\s+(\d+) kB", f.read())
                total += int(m.group(1)) if m else 0
        except OSError:
            pass
    return total


def peak_rss_mb(pids):
    return status_kib(pids, "VmHWM") / 1024


def unit(value, suffix):
    return float(value) * {"us": 1e-3, "ms": 1, "s": 1000, "": 1}[suffix]


def make_certs(work, kind):
    """One certificate for `localhost` and 127.0.0.1, as the pair `default` of a rusty-lb
    certificate directory (nginx reads the same files)."""
    d = f"{work}/certs"
    os.makedirs(d, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"] if kind == "ec" else ["-newkey", "rsa:2048"]
    subprocess.run(["openssl", "req", "-x509", *key, "-nodes", "-keyout", f"{d}/default.key",
                    "-out", f"{d}/default.crt", "-days", "7", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
                   check=True, capture_output=True)
    os.chmod(f"{d}/default.key", 0o644)  # nginx workers run as nobody
    CERTS.append(d)


def url(port, path):
    scheme = "https" if port in (PORTS[t] for t in TLS_OF) else "http"
    return f"{scheme}://127.0.0.1:{port}{path}"


# Extra request headers of the current scenario (the handshake one closes every connection).
HEADERS = []


def wrk(port, path, conns, duration):
    headers = [a for h in HEADERS for a in ("-H", h)]
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{duration}s", "--latency", "--timeout", "5s", *headers,
         url(port, path)],
        capture_output=True, text=True,
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    reqs = int(re.search(r"(\d+) requests in", out).group(1))
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        lat[pct] = unit(m.group(1), m.group(2)) if m else float("nan")
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors += int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    errors += sum(int(x) for x in m.groups()) if m else 0
    return {"rps": rps, "requests": reqs, "p50": lat["50"], "p99": lat["99"], "errors": errors}


def oha(port, path, conns, duration):
    """The same measurement with oha (one worker thread, as wrk -t1), from its JSON report.
    Requests still in flight at the deadline are waited for (-w), so none counts as an error."""
    headers = [a for h in HEADERS for a in ("-H", h)]
    out = subprocess.run(
        ["oha", "-z", f"{duration}s", "-c", str(conns), "-w", "--no-tui", "--worker-threads", "1",
         "--insecure", "--output-format", "json", *headers, url(port, path)],
        capture_output=True, text=True,
    ).stdout
    d = json.loads(out)
    codes = {int(k): v for k, v in (d.get("statusCodeDistribution") or {}).items()}
    reqs = sum(codes.values())
    errors = sum(v for k, v in codes.items() if not 200 <= k < 400)
    errors += sum((d.get("errorDistribution") or {}).values())
    lat = d.get("latencyPercentiles") or {}
    return {
        "rps": reqs / d["summary"]["total"] if d["summary"].get("total") else 0.0,
        "requests": reqs,
        "p50": (lat.get("p50") or float("nan")) * 1000,
        "p99": (lat.get("p99") or float("nan")) * 1000,
        "errors": errors,
    }


LOAD = {"wrk": wrk, "oha": oha}
LOADER = ["wrk"]


def load(port, path, conns, duration):
    return LOAD[LOADER[0]](port, path, conns, duration)


def measure(target, proc, path, conns, duration):
    pids = pids_of(proc) if proc else []
    before = cpu_seconds(pids)
    r = load(PORTS[target], path, conns, duration)
    used = cpu_seconds(pids) - before
    r["cpu_us"] = used / r["requests"] * 1e6 if proc and r["requests"] else float("nan")
    r["rss"] = peak_rss_mb(pids) if proc else float("nan")
    return r


def full_handshakes(target, proc, parallel, duration):
    """New TLS connections per second with a full handshake each: `parallel` openssl s_time
    clients for `duration` seconds; CPU per connection is the proxy's."""
    pids = pids_of(proc)
    before = cpu_seconds(pids)
    started = time.monotonic()
    clients = [subprocess.Popen(["openssl", "s_time", "-connect", f"127.0.0.1:{PORTS[target]}", "-new",
                                 "-time", str(duration)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True) for _ in range(parallel)]
    total = 0
    for c in clients:
        out = c.communicate()[0]
        m = re.search(r"(\d+) connections in \d+ real seconds", out)
        total += int(m.group(1)) if m else 0
    elapsed = time.monotonic() - started
    used = cpu_seconds(pids) - before
    return {"rps": total / elapsed, "requests": total, "p50": float("nan"), "p99": float("nan"),
            "errors": 0, "cpu_us": used / total * 1e6 if total else float("nan"),
            "rss": peak_rss_mb(pids)}


def h2load(target, proc, conns, streams, duration):
    """HTTP/2 over TLS: h2load with one thread, `conns` connections of up to `streams` requests
    in flight each, for `duration` seconds; CPU per request is the proxy's."""
    pids = pids_of(proc)
    before = cpu_seconds(pids)
    out = subprocess.run(
        ["h2load", "-t1", f"-c{conns}", f"-m{streams}", "-D", str(duration), url(PORTS[target], "/")],
        capture_output=True, text=True,
    ).stdout
    used = cpu_seconds(pids) - before
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", out)
    if not m or not done:
        raise SystemExit(f"h2load said:\n{out}")
    reqs = int(done.group(2))
    lat = {}
    # h2load prints min, max, mean, sd and "+/- sd" of request times; no percentiles.
    t = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", out)
    lat["mean"] = unit(t.group(5), t.group(6)) if t else float("nan")
    return {"rps": float(m.group(3)), "requests": reqs, "p50": lat["mean"], "p99": float("nan"),
            "errors": int(done.group(3)) + int(done.group(4)),
            "cpu_us": used / reqs * 1e6 if reqs else float("nan"), "rss": peak_rss_mb(pids)}


def med(runs, key):
    vals = [r[key] for r in runs]
    return statistics.median(vals), min(vals), max(vals)


def fmt_num(v, digits=1):
    return "–" if v != v else f"{v:,.{digits}f}"


def swap_run(work, proc, rate, conns, duration):
    """Rewrite the table and SIGHUP rusty-lb `rate` times a second during a wrk run."""
    stop = threading.Event()
    version = [int(time.time() * 1000)]
    swaps = [0]

    def swapper():
        period = 1.0 / rate
        nxt = time.monotonic()
        while not stop.is_set():
            version[0] += 1
            w = (1, 2, 3) if version[0] % 2 else (3, 2, 1)
            tmp = f"{work}/table.json.tmp"
            write(tmp, table(version[0], w))
            os.rename(tmp, f"{work}/table.json")
            os.kill(proc.pid, signal.SIGHUP)
            swaps[0] += 1
            nxt += period
            delay = nxt - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                nxt = time.monotonic()

    applied = tables_applied("rusty-lb")
    t = threading.Thread(target=swapper, daemon=True)
    t.start()
    r = measure("rusty-lb", proc, "/", conns, duration)
    stop.set()
    t.join()
    r["swaps"] = swaps[0]
    # SIGHUPs that arrive during an install are served by one reload.
    r["applied"] = tables_applied("rusty-lb") - applied
    return r


def machine():
    def ver(cmd):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        except (OSError, IndexError):
            return "not found"

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "nginx": ver(["nginx", "-v"]),
        "haproxy": ver(["haproxy", "-v"]),
        "caddy": ver(["caddy", "version"]) if shutil.which("caddy") else "caddy not installed",
        "wrk": ver(["wrk", "--version"]) if LOADER[0] == "wrk" else ver(["oha", "--version"]),
        "rustc": ver(["rustc", "--version"]),
        "rusty-lb": subprocess.run(["git", "-C", ROOT, "describe", "--always", "--dirty"], capture_output=True, text=True).stdout.strip(),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=f"{ROOT}/target/release/rusty-lb")
    ap.add_argument("--workers", type=int, default=2, help="workers/threads of every proxy")
    ap.add_argument("--duration", type=int, default=8, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved runs per target and scenario")
    ap.add_argument("--conns", default="10,50,200")
    ap.add_argument("--bodies", default="small,big")
    ap.add_argument("--targets", default="direct,nginx,haproxy,caddy,rusty-lb")
    ap.add_argument("--swap-rates", default="10,100,1000", help="table swaps per second; empty: none")
    ap.add_argument("--swap-backends", type=int, default=0,
                    help="add a service of this many backends (weights 1-4, changing with every "
                         "version) to rusty-lb's tables: the cost of installing large tables")
    ap.add_argument("--out", help="write the markdown report here too")
    ap.add_argument("--alt-args", default="", help="extra rusty-lb flags for the target rusty-lb-alt")
    ap.add_argument("--alt-binary", help="another rusty-lb build for the target rusty-lb-alt")
    ap.add_argument("--load", choices=sorted(LOAD), default="wrk",
                    help="load generator: wrk -t1, or oha with one worker thread")
    ap.add_argument("--cert", choices=["ec", "rsa"], default="ec",
                    help="key of the TLS targets' certificate: ECDSA P-256 or RSA 2048")
    ap.add_argument("--handshakes", default="",
                    help="connection counts of the resumed-handshake scenario (wrk, every request "
                         "a new TLS connection), e.g. 10,50; runs the TLS targets only")
    ap.add_argument("--full-handshakes", default="",
                    help="parallel `openssl s_time -new` clients of the full-handshake scenario, "
                         "e.g. 4; runs the TLS targets only")
    ap.add_argument("--h2-streams", default="",
                    help="streams per connection of the HTTP/2 scenario (h2load over TLS at each of "
                         "--conns), e.g. 1,100; runs the TLS targets only")
    args = ap.parse_args()
    ALT_ARGS.extend(args.alt_args.split())
    BULK[0] = args.swap_backends
    LOADER[0] = args.load

    work = tempfile.mkdtemp(prefix="rusty-loadtest-")
    os.chmod(work, 0o755)  # nginx workers run as nobody and serve /big from here
    print(f"work directory (configs, logs): {work}", file=sys.stderr)
    results = {}
    try:
        start_backends(work)
        targets = [t for t in args.targets.split(",") if t]
        if any(t in TLS_OF for t in targets):
            make_certs(work, args.cert)
            for t in targets:
                if t in TLS_OF and TLS_OF[t] not in targets:
                    ap.error(f"{t} needs {TLS_OF[t]} among the targets (it is that process's TLS listener)")
        starters = {
            "direct": lambda: None,
            "nginx": lambda: start_nginx(work, args.workers),
            "nginx-log": lambda: start_nginx(work, args.workers, "nginx-log"),
            "haproxy": lambda: start_haproxy(work, args.workers),
            "caddy": lambda: start_caddy(work, args.workers),
            "rusty-lb": lambda: start_rusty(work, args.workers, args.binary),
            "rusty-lb-pipeline": lambda: start_rusty(work, args.workers, args.binary, "rusty-lb-pipeline"),
            "rusty-lb-alt": lambda: start_rusty(work, args.workers, args.alt_binary or args.binary, "rusty-lb-alt"),
            "nginx-tls": lambda: None,
            "rusty-lb-tls": lambda: None,
            "rusty-lb-alt-tls": lambda: None,
        }
        unknown = [t for t in targets if t not in starters]
        if unknown:
            ap.error(f"unknown targets {unknown}; known: {', '.join(starters)}")
        started = {t: starters[t]() for t in targets}
        for t, base in TLS_OF.items():
            if t in started:
                started[t] = started[base]
        for t in targets:
            wait_port(PORTS[t])
        paths = {"small": "/", "big": "/big", "huge": "/huge"}
        for body in [b for b in args.bodies.split(",") if b]:
            for conns in [int(c) for c in args.conns.split(",") if c]:
                for t in targets:  # warm every upstream pool first
                    load(PORTS[t], paths[body], conns, 1)
                for rnd in range(args.rounds):
                    for t in targets:
                        r = measure(t, started[t], paths[body], conns, args.duration)
                        results.setdefault((body, conns, t), []).append(r)
                        print(f"{body:5} c={conns:<3} round {rnd + 1} {t:9} {r['rps']:>10,.0f} req/s  "
                              f"p99 {r['p99']:.2f} ms  cpu {fmt_num(r['cpu_us'])} us/req  errors {r['errors']}",
                              file=sys.stderr)
        tls_targets = [t for t in targets if t in TLS_OF]
        for conns in [int(c) for c in args.handshakes.split(",") if c]:
            HEADERS[:] = ["Connection: close"]
            for rnd in range(args.rounds):
                for t in tls_targets:
                    r = measure(t, started[t], "/", conns, args.duration)
                    results.setdefault(("resumed", conns, t), []).append(r)
                    print(f"resum c={conns:<3} round {rnd + 1} {t:9} {r['rps']:>10,.0f} conn/s  "
                          f"p99 {r['p99']:.2f} ms  cpu {fmt_num(r['cpu_us'])} us/conn  errors {r['errors']}",
                          file=sys.stderr)
            HEADERS.clear()
        for parallel in [int(c) for c in args.full_handshakes.split(",") if c]:
            for rnd in range(args.rounds):
                for t in tls_targets:
                    r = full_handshakes(t, started[t], parallel, args.duration)
                    results.setdefault(("full", parallel, t), []).append(r)
                    print(f"full  c={parallel:<3} round {rnd + 1} {t:9} {r['rps']:>10,.0f} conn/s  "
                          f"cpu {fmt_num(r['cpu_us'])} us/conn", file=sys.stderr)
        for streams in [int(m) for m in args.h2_streams.split(",") if m]:
            for conns in [int(c) for c in args.conns.split(",") if c]:
                for t in tls_targets:  # warm up
                    h2load(t, started[t], conns, streams, 1)
                for rnd in range(args.rounds):
                    for t in tls_targets:
                        r = h2load(t, started[t], conns, streams, args.duration)
                        results.setdefault((f"h2 m={streams}", conns, t), []).append(r)
                        print(f"h2 m={streams:<3} c={conns:<3} round {rnd + 1} {t:9} {r['rps']:>10,.0f} req/s  "
                              f"cpu {fmt_num(r['cpu_us'])} us/req  errors {r['errors']}", file=sys.stderr)
        swaps = []
        rates = [int(x) for x in args.swap_rates.split(",") if x]
        if rates and "rusty-lb" in targets:
            base = measure("rusty-lb", started["rusty-lb"], "/", 50, args.duration)
            for rate in rates:
                r = swap_run(work, started["rusty-lb"], rate, 50, args.duration)
                swaps.append((rate, r))
                print(f"swap {rate}/s: {r['swaps']} swaps, {r['applied']} applied, {r['errors']} errors, "
                      f"p99 {r['p99']:.2f} ms "
                      f"(no swaps: {base['p99']:.2f} ms)", file=sys.stderr)
        report = render(machine(), args, results, targets, swaps, base if swaps else None)
        print(report)
        if args.out:
            write(args.out, report)
    finally:
        stop_all()


def render(info, args, results, targets, swaps, base):
    lines = [
        "# Load test: rusty-lb next to nginx, HAProxy and Caddy",
        "",
        f"- date: {info['date']}; machine: {info['cpus']} CPUs, Linux {info['kernel']}",
        f"- {info['nginx']}; {info['haproxy']}; "
        + (f"Caddy {info['caddy']}; " if "caddy" in targets else "")
        + f"{info['wrk']}; {info['rustc']}; rusty-lb at {info['rusty-lb']}",
        f"- every proxy: {args.workers} workers/threads, upstream keep-alive, logging off (unless said below); backends: 3 nginx "
        f"ports (1 worker) on the same machine; load: "
        + (f"`wrk -t1 -cC -d{args.duration}s`; " if args.load == "wrk"
           else f"`oha -z {args.duration}s -c C -w --worker-threads 1`; ")
        + f"{args.rounds} interleaved rounds per scenario, median (min–max)",
        *(["- caddy: `reverse_proxy` round robin, `GOMAXPROCS` = workers, upstream `keepalive 300s`, "
           "`keepalive_idle_conns_per_host 256` (its default of 32 re-dials under 50 connections)"]
          if "caddy" in targets else []),
        *([f"- nginx-log: nginx with `access_log FILE combined buffer=64k flush=100ms`"]
          if "nginx-log" in targets else []),
        *([f"- rusty-lb-pipeline: rusty-lb with `--no-fast-lane` (every request through Pingora's proxy pipeline)"]
          if "rusty-lb-pipeline" in targets else []),
        *([f"- rusty-lb-alt: rusty-lb with `{' '.join(ALT_ARGS)}`"
           + (f" built as `{args.alt_binary}`" if args.alt_binary else "")] if "rusty-lb-alt" in targets else []),
        *([f"- nginx-tls, rusty-lb-tls: the same processes on their TLS listeners ({'ECDSA P-256' if args.cert == 'ec' else 'RSA 2048'} "
           "certificate; wrk negotiates TLS 1.2); ÷ nginx is to nginx-tls; `resumed` rows: wrk with `Connection: close` "
           "on every request, so req/s is new TLS connections per second, each resuming wrk's session; `full` rows: "
           "conns = parallel `openssl s_time -new` clients, a full TLS 1.3 handshake per connection and no request; "
           "CPU/req is per connection in both"]
          if any(t in TLS_OF for t in targets) else []),
        *([f"- `h2 m=S` rows: HTTP/2 over TLS (ALPN h2) with `h2load -t1 -cC -mS -D {args.duration}`, S streams in "
           "flight per connection; nginx has `http2` on its TLS listener; the p50 column is h2load's mean request time "
           "(it prints no percentiles)"] if args.h2_streams else []),
        "- CPU/req is the proxy's own utime+stime from /proc over the run, divided by the requests the load generator "
        "counted; the load generator and the backends share the same 2 cores, so absolute figures are noisy: "
        "compare ratios within this file",
        "",
        "| body | conns | target | req/s | p50 ms | p99 ms | CPU µs/req | peak RSS MB | errors | ÷ direct | ÷ nginx |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    order = {"small": 0, "big": 1, "huge": 2, "resumed": 3, "full": 4}
    keys = sorted({(b, c) for (b, c, _) in results}, key=lambda k: (order.get(k[0], 4), k[0], k[1]))
    for body, conns in keys:
        direct = results.get((body, conns, "direct"))
        for t in targets:
            # TLS targets compare with nginx over TLS.
            nginx = results.get((body, conns, "nginx-tls" if t in TLS_OF else "nginx"))
            runs = results.get((body, conns, t))
            if not runs:
                continue
            rps, lo, hi = med(runs, "rps")
            p50 = med(runs, "p50")[0]
            p99 = med(runs, "p99")[0]
            cpu = med(runs, "cpu_us")[0]
            rss = max(r["rss"] for r in runs)
            errors = sum(r["errors"] for r in runs)
            vs_direct = rps / med(direct, "rps")[0] if direct else float("nan")
            vs_nginx = rps / med(nginx, "rps")[0] if nginx else float("nan")
            lines.append(
                f"| {body} | {conns} | {t} | {rps:,.0f} ({lo:,.0f}–{hi:,.0f}) | {fmt_num(p50, 2)} | {fmt_num(p99, 2)} | "
                f"{fmt_num(cpu)} | {fmt_num(rss)} | {errors} | {fmt_num(vs_direct, 2)} | {fmt_num(vs_nginx, 2)} |"
            )
    if swaps:
        lines += [
            "",
            "## Table swaps under load (rusty-lb, small body, 50 connections)",
            "",
            "Each swap rewrites the table file (a new version, weights alternating 1/2/3 and 3/2/1"
            + (f", plus a service `bulk` of {BULK[0]:,} backends of weights 1–4 that change with every "
               "version and get no requests" if BULK[0] else "")
            + ") and "
            "sends SIGHUP.",
            "",
            "| swaps/s (asked) | swaps done | tables applied | req/s | failed requests | p99 ms | p99 ÷ no-swap p99 |",
            "|---:|---:|---:|---:|---:|---:|---:|",
            f"| 0 | 0 | 0 | {base['rps']:,.0f} | {base['errors']} | {base['p99']:.2f} | 1.00 |",
        ]
        for rate, r in swaps:
            lines.append(
                f"| {rate} | {r['swaps']} | {r['applied']} | {r['rps']:,.0f} | {r['errors']} | {r['p99']:.2f} | "
                f"{r['p99'] / base['p99']:.2f} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        main()
    except KeyboardInterrupt:
        stop_all()
        sys.exit(130)
