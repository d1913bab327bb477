"""A real gRPC server and client (grpcio) for the HTTP/2 end-to-end tests.

serve --port P --id ID [--health STATUS] [--tls CERT KEY]
                            a gRPC server with generic handlers, no protobuf, plaintext (h2c)
                            or with --tls over TLS (h2 by ALPN):
                            /test.Echo/Unary      answers "ID:" + the request, trailing metadata
                                                  served-by=ID
                            /test.Echo/Stream     the request is "N,MS": N messages MS ms apart
                            /test.Echo/Fail       aborts with the status code named by the request
                            /test.Echo/Slow       answers after the request's milliseconds
                            /grpc.health.v1.Health/Check   STATUS (default SERVING; or
                                                  NOT_SERVING)
call --target T --authority A [--ca FILE] METHOD REQUEST [--timeout S] [--count N]
                            N calls (a new channel for none of them), one JSON line each:
                            {"ok": bool, "code": "OK", "reply": ..., "served_by": ..., "ms": ...}
                            for Stream, "reply" is the list of messages received.
"""

import argparse
import concurrent.futures
import json
import sys
import time

import grpc


def ident(b):
    return b


HEALTH = {"UNKNOWN": 0, "SERVING": 1, "NOT_SERVING": 2}


class Echo(grpc.GenericRpcHandler):
    def __init__(self, ident_, health):
        self.id = ident_
        self.health_status = HEALTH[health]

    def service(self, details):
        handlers = {
            "/test.Echo/Unary": grpc.unary_unary_rpc_method_handler(self.unary, ident, ident),
            "/test.Echo/Stream": grpc.unary_stream_rpc_method_handler(self.stream, ident, ident),
            "/test.Echo/Fail": grpc.unary_unary_rpc_method_handler(self.fail, ident, ident),
            "/test.Echo/Slow": grpc.unary_unary_rpc_method_handler(self.slow, ident, ident),
            "/grpc.health.v1.Health/Check": grpc.unary_unary_rpc_method_handler(
                self.health, ident, ident
            ),
        }
        return handlers.get(details.method)

    def unary(self, request, context):
        context.set_trailing_metadata((("served-by", self.id),))
        return self.id.encode() + b":" + request

    def stream(self, request, context):
        n, ms = (int(x) for x in request.decode().split(","))
        context.set_trailing_metadata((("served-by", self.id),))
        for i in range(n):
            if i:
                time.sleep(ms / 1000)
            yield f"{self.id}:{i}".encode()

    def fail(self, request, context):
        code = grpc.StatusCode[request.decode()]
        context.abort(code, f"failed as asked by {self.id}")

    def slow(self, request, context):
        time.sleep(int(request.decode()) / 1000)
        return self.id.encode()

    def health(self, request, context):
        # grpc.health.v1.HealthCheckResponse { status }
        return bytes([0x08, self.health_status])


def serve(args):
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((Echo(args.id, args.health),))
    if args.tls:
        cert, key = (open(f, "rb").read() for f in args.tls)
        creds = grpc.ssl_server_credentials([(key, cert)])
        server.add_secure_port(f"127.0.0.1:{args.port}", creds)
    else:
        server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    print(f"grpc_peer {args.id} listening on {args.port}", flush=True)
    server.wait_for_termination()


def call(args):
    options = [("grpc.default_authority", args.authority)]
    if args.ca:
        with open(args.ca, "rb") as f:
            creds = grpc.ssl_channel_credentials(root_certificates=f.read())
        options.append(("grpc.ssl_target_name_override", args.authority))
        channel = grpc.secure_channel(args.target, creds, options=options)
    else:
        channel = grpc.insecure_channel(args.target, options=options)
    method = f"/test.Echo/{args.method}"
    streaming = args.method == "Stream"
    if streaming:
        stub = channel.unary_stream(method, request_serializer=ident, response_deserializer=ident)
    else:
        stub = channel.unary_unary(method, request_serializer=ident, response_deserializer=ident)
    for _ in range(args.count):
        t0 = time.monotonic()
        out = {"ok": True, "code": "OK", "reply": None, "served_by": None}
        try:
            if streaming:
                it = stub(args.request.encode(), timeout=args.timeout)
                out["reply"] = []
                for message in it:
                    out["reply"].append(message.decode())
                trailing = it.trailing_metadata()
            else:
                reply, c = stub.with_call(args.request.encode(), timeout=args.timeout)
                out["reply"] = reply.decode()
                trailing = c.trailing_metadata()
            out["served_by"] = dict(trailing or ()).get("served-by")
        except grpc.RpcError as e:
            out.update(ok=False, code=e.code().name, details=e.details())
        out["ms"] = round((time.monotonic() - t0) * 1000, 1)
        print(json.dumps(out), flush=True)
    channel.close()


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--id", required=True)
    s.add_argument("--health", default="SERVING", choices=sorted(HEALTH))
    s.add_argument("--tls", nargs=2, metavar=("CERT", "KEY"))
    c = sub.add_parser("call")
    c.add_argument("--target", required=True)
    c.add_argument("--authority", required=True)
    c.add_argument("--ca")
    c.add_argument("--timeout", type=float, default=10.0)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("method")
    c.add_argument("request")
    args = p.parse_args()
    serve(args) if args.cmd == "serve" else call(args)


if __name__ == "__main__":
    sys.exit(main())
