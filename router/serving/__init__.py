"""The service: gRPC transport, admission and micro-batching, bundle store, metrics, server.

Built on `router.core`; knows nothing of training.
"""
