"""Generated protobuf and gRPC stubs: regenerate with `python -m server.codegen`, never edit.

Import them as `from server.pb.medhallguard.v1 import guard_pb2, guard_pb2_grpc`.
"""
