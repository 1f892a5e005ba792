"""kunserve's Python client: gRPC clients, `kunserve generate`, and `kunserve replay`.

See README.md in this folder. Imports only `proto`, never the server's packages.
"""

from client.api_types import Delta, Finished, KunserveError, StreamEvent
from client.grpc_client import AsyncKunserveClient, KunserveClient

__all__ = [
    "AsyncKunserveClient",
    "Delta",
    "Finished",
    "KunserveClient",
    "KunserveError",
    "StreamEvent",
]
