"""``python -m fedpar`` is the ``fedpar`` command."""

from fedpar.cli import main

raise SystemExit(main())
