"""Job definitions. A job is plain code: it knows nothing of the database or the worker."""

from __future__ import annotations

from jobs.process_image import ImageIn, ImageOut, process_image

__all__ = ["ImageIn", "ImageOut", "process_image"]
