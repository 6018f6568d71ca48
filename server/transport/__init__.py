"""gRPC surfaces: thin servicers over the data plane, the KServe v2 codec, rpc decorators, interceptors
and security (TLS, bearer tokens)."""
