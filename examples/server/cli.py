"""A command-line tool with a live progress line fed by `run:progress` events.

Run: python examples/server/cli.py photo.jpg banner.png

Each file is one run. Interrupt the command and run it again: runs already
triggered stay in the database, and the worker resumes them.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from durably import RunFailedError

from lib.durably import durably


def show_progress(event: Any) -> None:
    # \r rewrites the same terminal line: "2/3 - resized"
    progress = event.progress
    print(f"\r  {progress.current:g}/{progress.total:g} - {progress.message}", end="", flush=True)


async def process(filenames: list[str]) -> int:
    # Events fire in the process that executes the run: this one, as it runs the worker.
    # (To follow a run executed elsewhere, pass on_progress= to trigger_and_wait.)
    durably.on("run:progress", show_progress)
    async with durably:
        for filename in filenames:
            print(f"{filename}:")
            try:
                result = await durably.jobs.process_image.trigger_and_wait({"filename": filename})
            except RunFailedError as exc:
                print(f"\n  failed: {exc.error}")
                return 1
            print(f"\n  done: {result.output.url}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="Process images durably.")
    parser.add_argument("filenames", nargs="*", default=["photo.jpg"], metavar="FILENAME")
    args = parser.parse_args()
    return asyncio.run(process(args.filenames))


if __name__ == "__main__":
    raise SystemExit(main())
