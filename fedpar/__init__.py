"""fedpar: parallel computing for Python on many cores and many machines.

    import fedpar

    with fedpar.Cluster(n=4) as client:
        view = client.load_balanced_view()
        print(view.map_sync(pow, range(10), [2] * 10))

See README.md and docs/guide.md.
"""

from fedpar.client.client import Client
from fedpar.client.cluster import Cluster
from fedpar.client.executor import FedparExecutor
from fedpar.client.results import AsyncResult
from fedpar.client.views import DirectView, LoadBalancedView
from fedpar.config import Config, load_config
from fedpar.engine.engine import Reference
from fedpar.errors import (
    ClusterError,
    CompositeError,
    ConfigError,
    ConnectionFileError,
    ControllerUnavailable,
    DiscoveryError,
    EngineError,
    FedparError,
    MalformedMessage,
    NoEnginesError,
    ProtocolError,
    RegistryUnavailable,
    RemoteError,
    ReplayError,
    ResultNotFound,
    ResultUnavailable,
    SignatureError,
    StoreError,
    StoreFull,
    StreamAborted,
    StreamCorrupted,
    StreamError,
    StreamTimeout,
    TaskAborted,
    TaskError,
    TimeoutError,
    TransportError,
    UnknownEngineError,
)

__version__ = "0.1.0"

__all__ = [
    "AsyncResult",
    "Client",
    "Cluster",
    "ClusterError",
    "CompositeError",
    "Config",
    "ConfigError",
    "ConnectionFileError",
    "ControllerUnavailable",
    "DirectView",
    "DiscoveryError",
    "EngineError",
    "FedparError",
    "FedparExecutor",
    "LoadBalancedView",
    "MalformedMessage",
    "NoEnginesError",
    "ProtocolError",
    "Reference",
    "RegistryUnavailable",
    "RemoteError",
    "ReplayError",
    "ResultNotFound",
    "ResultUnavailable",
    "SignatureError",
    "StoreError",
    "StoreFull",
    "StreamAborted",
    "StreamCorrupted",
    "StreamError",
    "StreamTimeout",
    "TaskAborted",
    "TaskError",
    "TimeoutError",
    "TransportError",
    "UnknownEngineError",
    "__version__",
    "load_config",
]
