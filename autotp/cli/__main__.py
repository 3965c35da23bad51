"""``python -m autotp.cli``: the same entry point as the ``autotp`` script."""
from __future__ import annotations

import sys

from autotp.cli import main

sys.exit(main())
