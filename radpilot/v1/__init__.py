"""Generated gRPC/protobuf code for ``protos/radpilot/v1`` (``make protos``). Do not edit."""
