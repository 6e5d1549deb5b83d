"""``python -m frugal``: the ``frugal`` command."""

from .cli import main

raise SystemExit(main())
