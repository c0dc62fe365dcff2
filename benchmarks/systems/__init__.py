"""Adapters for the benchmarked systems. Peer libraries are imported lazily, inside methods."""

from __future__ import annotations

import importlib

from benchmarks.systems.base import NotApplicable, Probe, System

__all__ = ["PEERS", "SYSTEMS", "NotApplicable", "Probe", "System", "load_system", "probe_system"]

#: System name -> "module:Class" of its adapter. fedpar comes first, then the peers.
SYSTEMS: dict[str, str] = {
    "fedpar": "benchmarks.systems.fedpar_sys:FedparSystem",
    "ipyparallel": "benchmarks.systems.ipyparallel_sys:IpyparallelSystem",
    "dask": "benchmarks.systems.dask_sys:DaskSystem",
    "ray": "benchmarks.systems.ray_sys:RaySystem",
}
PEERS: tuple[str, ...] = ("ipyparallel", "dask", "ray")


def load_system(name: str) -> type[System]:
    """The adapter class of ``name`` (importing the adapter module, not the library)."""
    try:
        target = SYSTEMS[name]
    except KeyError:
        raise ValueError(f"unknown system {name!r}; known: {', '.join(SYSTEMS)}") from None
    module_name, _, cls_name = target.partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    assert isinstance(cls, type) and issubclass(cls, System)
    return cls


def probe_system(name: str) -> Probe:
    """Whether ``name`` can run here; never raises."""
    try:
        return load_system(name).probe()
    except Exception as exc:  # a broken adapter import is reported, not fatal
        return Probe(name, False, f"unavailable: {type(exc).__name__}: {exc}")
