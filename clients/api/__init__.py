"""Generated protobuf and gRPC stubs of proto/loraserve/v1/loraserve.proto (scripts/gen_proto.py)."""
