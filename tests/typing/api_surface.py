"""Every public name used as SPEC shows it: nothing a user calls returns an unknown type.

pyright runs in strict mode here, so a missing annotation anywhere on this surface
(an Unknown leaking into user code) fails as surely as a wrong ``assert_type``.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, assert_type

from images import process_image

from durably import (
    ConfigurationError,
    Durably,
    DurablyError,
    LogEntry,
    Progress,
    Run,
    RunCancelledError,
    RunFailedError,
    Step,
    Storage,
    StorageError,
    create_durably,
    open_storage,
)
from durably.adapters import EmbeddedReplicaStorage, LocalFileStorage, RemoteStorage


async def instance_api(storage: Storage) -> None:
    assert_type(open_storage("file:app.db", auth_token=None), Storage)
    durably = Durably(storage, polling_interval=0.1, max_concurrent_runs=2).register(images=process_image)
    assert_type(durably, Durably)
    assert_type(durably.storage, Storage)
    assert_type(durably.max_concurrent_runs, int)
    assert_type(create_durably(storage, polling_interval=0.1, max_polling_interval=2.0), Durably)
    assert_type(durably.jobs.images.name, str)
    unsubscribe = durably.on("run:complete", print)
    unsubscribe()

    await durably.migrate()
    durably.start()
    await durably.init()
    assert_type(await durably.process_one(), bool)
    assert_type(await durably.process_until_idle(max_runs=3), int)
    await durably.stop(timeout=1.0)
    await durably.close()
    async with create_durably("file:app.db") as running:
        assert_type(running, Durably)


async def run_api(durably: Durably, run_id: str) -> None:
    assert_type(await durably.get_run(run_id), Run | None)
    assert_type(await durably.get_runs(status=["failed"], job_name="process-image", limit=5), list[Run])
    assert_type(await durably.get_steps(run_id), list[Step])
    assert_type(await durably.get_logs(run_id), list[LogEntry])
    assert_type(await durably.wait_for_run(run_id, timeout=5.0), Run)
    assert_type(await durably.retry(run_id), Run)
    assert_type(await durably.retrigger(run_id), Run)
    assert_type(await durably.cancel(run_id), Run)
    await durably.delete_run(run_id)
    assert_type(await durably.purge_runs(timedelta(days=7)), int)

    run = await durably.wait_for_run(run_id)
    status: str = run.status  # a Literal of the statuses
    print(status)
    assert_type(run.input, Any)
    assert_type(run.error, str | None)
    assert_type(run.progress, Progress | None)
    assert_type(run.labels, dict[str, str])
    assert_type(run.attempt, int)
    assert_type(run.completed_at, datetime | None)
    assert_type(run.is_terminal, bool)


async def errors(durably: Durably) -> None:
    try:
        await durably.jobs.images.trigger_and_wait({"filename": "a.jpg"}, timeout=1.0)
    except RunFailedError as exc:
        assert_type(exc.run_id, str)
        assert_type(exc.error, str | None)
    except RunCancelledError as exc:
        assert_type(exc.run_id, str)
    except StorageError as exc:
        assert_type(exc.transient, bool)
    except (ConfigurationError, DurablyError, TimeoutError):
        pass


def adapters() -> list[Storage]:
    return [
        LocalFileStorage("a.db"),
        RemoteStorage("http://127.0.0.1:8080", auth_token=None),
        EmbeddedReplicaStorage("replica.db", sync_url="http://127.0.0.1:8080", sync_interval=1.0),
    ]
