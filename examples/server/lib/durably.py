"""The durably instance with its jobs registered. Import it wherever you trigger or run jobs.

The short intervals suit development; raise them in production to query the
database less often (durations are seconds).
"""

from __future__ import annotations

import sys

import structlog
from durably import create_durably

from jobs import process_image
from lib.database import storage

# durably logs through structlog (`step.log` lines too) and never configures it: the
# application does. This one sends logs to stderr and keeps stdout for its own output.
structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))

durably = create_durably(
    storage,
    polling_interval=0.1,  # idle wait between claims
    heartbeat_interval=0.5,  # lease renewal period
    stale_threshold=3.0,  # a run whose lease is older than this is reclaimed and resumed
    max_concurrent_runs=4,  # runs this worker executes at once
).register(process_image=process_image)
