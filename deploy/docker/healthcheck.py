"""Exit 0 when the server at HOST:PORT reports SERVING on grpc.health.v1, 1 otherwise (Docker HEALTHCHECK).

    python healthcheck.py 127.0.0.1:50051 [SERVICE]

Kubernetes does not need this: its native `grpc:` probes ask the same service.
"""

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__, file=sys.stderr)
        return 2
    address, service = argv[0], (argv[1] if len(argv) > 1 else "")
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=4)
        except grpc.RpcError as e:
            print(f"{address}: health check failed: {e.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
