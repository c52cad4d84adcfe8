"""``python -m judge``: see judge/cli.py."""
from .cli import main

raise SystemExit(main())
