"""``python -m durably``: the ``durably`` command."""

from __future__ import annotations

from durably.cli import main

raise SystemExit(main())
