"""Generated protobuf and gRPC code for the tiermem.v1 contracts. Do not edit."""
