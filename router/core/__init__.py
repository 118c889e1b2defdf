"""The shared core: everything serving and training both need to turn a prompt into a decision.

Embedder, features, pricing, the routing policy, the bundle (manifest and loader), the heads
runner and the engine that ties them together. Nothing here imports gRPC, protobuf, torch,
LightGBM or the `training` package: the service and the trainer both build on this, never on
each other.
"""
