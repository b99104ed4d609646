"""``python -m reliable_job.cli``."""

from __future__ import annotations

import sys

from reliable_job.cli import main

sys.exit(main())
