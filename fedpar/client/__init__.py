"""The user-facing API: ``Client`` (one logical controller), views, ``AsyncResult``, the executor and
``Cluster``."""
