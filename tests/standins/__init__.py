"""In-process stand-ins of external services for tests that cannot have the real service on this machine.

A stand-in implements only what fedpar uses of the real thing, written from the service's API documentation;
it is not the service. Tests against a stand-in check fedpar's side of the protocol; where the real service
can be reached (for Consul: ``CONSUL_HTTP_ADDR``), the same tests also run against it.
"""
