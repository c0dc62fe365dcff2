"""The controller's decisions as pure state machines (no sockets, threads or clocks): the task
``scheduler``, the engine ``registry`` and restart ``recovery``. The actors in ``fedpar.actors`` feed
them events and execute what they return."""
