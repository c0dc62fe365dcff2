"""Several controllers as one: the discovery registry (``discovery`` and its backends), weighted
rendezvous ``placement`` of engines onto controllers, and ``membership`` (who is alive, takeovers,
fencing) as pure state machines."""
