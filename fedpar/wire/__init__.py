"""Everything between a Python object and bytes on a socket: message kinds (``protocol``), keys and MACs
(``signing``), framing (``codec``), pickling (``payload``), chunk streams (``streams``), sockets
(``transport``) and same-host direct streams (``direct``)."""
