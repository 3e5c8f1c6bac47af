"""Exit 0 when the server at HOST:PORT reports SERVING on grpc.health.v1, 1 otherwise (Docker HEALTHCHECK).

    python healthcheck.py 127.0.0.1:50051 [--service NAME] [--ca-cert CA.pem]

`--ca-cert` speaks TLS (for a server with `tls_cert`; the name checked is the
certificate's, so pass the address it was issued for). Kubernetes does not need
this script while the server is plaintext: its native `grpc:` probes ask the
same service. They cannot speak TLS, so with TLS on, use this script as an
`exec` probe instead (see deploy/k8s/deployment.yaml).
"""

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description="gRPC health check: exit 0 when SERVING.")
    p.add_argument("address", help="HOST:PORT")
    p.add_argument("--service", default="", help="service to ask about (default: the whole server)")
    p.add_argument("--ca-cert", metavar="PEM", help="CA bundle that signed the server's certificate (TLS on)")
    args = p.parse_args(argv)
    if args.ca_cert:
        with open(args.ca_cert, "rb") as f:
            channel = grpc.secure_channel(args.address, grpc.ssl_channel_credentials(root_certificates=f.read()))
    else:
        channel = grpc.insecure_channel(args.address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                              timeout=4)
        except grpc.RpcError as e:
            print(f"{args.address}: health check failed: {e.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{args.address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
