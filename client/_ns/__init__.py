"""editserve: serve a causal LM over gRPC and edit what it knows while it serves.

Subpackages: ``editserve.client`` (light: grpc + protobuf only), ``editserve.server``
(model host, servicers, journal, metrics) and ``editserve.editing`` (the science).
"""

__version__ = "0.1.0"
