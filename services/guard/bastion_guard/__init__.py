"""The guard: a gRPC service every prompt and every piece of output passes through."""
