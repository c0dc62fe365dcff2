"""The public API is pinned: changing it must be a deliberate edit of this list."""

import fedpar

PUBLIC = [
    "AsyncResult", "Client", "Cluster", "ClusterError", "CompositeError", "Config", "ConfigError",
    "ConnectionFileError", "ControllerUnavailable", "DirectView", "DiscoveryError", "EngineError", "FedparError",
    "FedparExecutor", "LoadBalancedView", "MalformedMessage", "NoEnginesError", "ProtocolError", "Reference",
    "RegistryUnavailable", "RemoteError", "ReplayError", "ResultNotFound", "ResultUnavailable", "SignatureError",
    "StoreError", "StoreFull", "StreamAborted", "StreamCorrupted", "StreamError", "StreamTimeout", "TaskAborted",
    "TaskError", "TimeoutError", "TransportError", "UnknownEngineError", "__version__", "load_config",
]


def test_all_is_pinned() -> None:
    assert sorted(fedpar.__all__) == sorted(PUBLIC)


def test_every_name_exists_and_is_documented() -> None:
    for name in fedpar.__all__:
        obj = getattr(fedpar, name)
        if name != "__version__":
            assert obj.__doc__, f"fedpar.{name} has no docstring"


def test_errors_share_one_root() -> None:
    for name in fedpar.__all__:
        obj = getattr(fedpar, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, fedpar.FedparError), name
