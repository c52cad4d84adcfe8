"""``python -m comfy_queue``: the queue client's command line (see ``comfy_queue/queue.py``)."""
import sys

from .queue import main

sys.exit(main())
