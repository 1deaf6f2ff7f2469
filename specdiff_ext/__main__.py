"""``python -m specdiff_ext``: the ``specdiff`` command."""

from .cli import main

raise SystemExit(main())
