"""Generated protobuf and gRPC stubs of protos/recsys_ccl/v1/recommender.proto.

Do not edit: regenerate from the repository root with
    python -m grpc_tools.protoc -I protos --python_out=. --pyi_out=. --grpc_python_out=. \
        protos/recsys_ccl/v1/recommender.proto
(tests/test_serving.py fails when these drift from the .proto).
"""
