"""The public surface: exported names, the instance, job definitions, storage URLs."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest

import durably
from durably import (
    ConfigurationError,
    Durably,
    DurablyError,
    JobDefinition,
    StepContext,
    Storage,
    StorageError,
    create_durably,
    define_job,
    open_storage,
)
from durably.adapters import EmbeddedReplicaStorage, LocalFileStorage, RemoteStorage

pytestmark = pytest.mark.anyio

EXPECTED_ALL = [
    "ConfigurationError",
    "ConflictError",
    "Durably",
    "DurablyError",
    "JobDefinition",
    "JobHandle",
    "LeaseLostError",
    "LogEntry",
    "NonRetryableError",
    "NotFoundError",
    "Progress",
    "RetryPolicy",
    "Run",
    "RunCancelledError",
    "RunFailedError",
    "RunResult",
    "Step",
    "StepContext",
    "Storage",
    "StorageError",
    "ValidationError",
    "create_durably",
    "define_job",
    "open_storage",
]

ERRORS = [
    "ConfigurationError",
    "ValidationError",
    "NotFoundError",
    "ConflictError",
    "StorageError",
    "LeaseLostError",
    "RunFailedError",
    "RunCancelledError",
    "NonRetryableError",
]


class Greeting(msgspec.Struct):
    name: str


class Answer(msgspec.Struct):
    text: str


@define_job(name="greet", input=Greeting, output=Answer)
async def greet(step: StepContext, payload: Greeting) -> Answer:
    text = await step.run("compose", lambda: f"hello {payload.name}")
    return Answer(text=text)


async def _other_greet(step: StepContext, payload: Greeting) -> Answer:
    return Answer(text="other")


# --- exported names -------------------------------------------------------------------


def test_all_is_pinned() -> None:
    assert sorted(durably.__all__) == sorted(EXPECTED_ALL)
    assert len(durably.__all__) == len(set(durably.__all__))
    for name in durably.__all__:
        assert hasattr(durably, name), name


def test_errors_derive_from_durably_error_and_match_the_errors_module() -> None:
    import durably.errors

    for name in ERRORS:
        cls = getattr(durably, name)
        assert cls is getattr(durably.errors, name)
        assert issubclass(cls, DurablyError), name
    assert issubclass(DurablyError, Exception)


def test_adapter_classes_are_public() -> None:
    import durably.adapters

    assert durably.adapters.LocalFileStorage is LocalFileStorage
    assert "open_storage" in durably.adapters.__all__
    assert {"LocalFileStorage", "RemoteStorage", "EmbeddedReplicaStorage"} <= set(durably.adapters.__all__)


# --- the instance -----------------------------------------------------------------------


def test_create_durably_and_durably_take_the_same_arguments() -> None:
    create_params = inspect.signature(create_durably).parameters
    class_params = inspect.signature(Durably).parameters
    assert list(create_params) == list(class_params)
    for name, param in create_params.items():
        assert param.kind == class_params[name].kind, name
        assert param.default == class_params[name].default, name


async def test_create_durably_and_durably_are_equivalent(storage_url: str) -> None:
    options: dict[str, Any] = {
        "polling_interval": 0.01,
        "heartbeat_interval": 0.1,
        "stale_threshold": 1.0,
        "max_concurrent_runs": 2,
    }
    made = [create_durably(storage_url, **options), Durably(storage_url, **options)]
    try:
        outputs = []
        for instance in made:
            assert type(instance) is Durably
            assert isinstance(instance.storage, Storage)
            instance.register(greet=greet)
            await instance.migrate()
            run = await instance.jobs.greet.trigger({"name": "ada"})
            assert await instance.process_until_idle() >= 1
            finished = await instance.wait_for_run(run.id, timeout=5)
            outputs.append(finished.output)
        assert outputs == [{"text": "hello ada"}, {"text": "hello ada"}]
    finally:
        for instance in made:
            await instance.close()


async def test_create_durably_accepts_a_storage_instance(storage: Storage) -> None:
    instance = create_durably(storage).register(greet=greet)
    assert instance.storage is storage
    run = await instance.jobs.greet.trigger({"name": "bo"})
    assert await instance.get_run(run.id) == await storage.get_run(run.id)


async def test_register_returns_the_same_instance(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably()
    assert instance.register(greet=greet) is instance


async def test_handles_by_attribute_and_by_item(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(greet=greet)
    assert instance.jobs.greet is instance.jobs["greet"]
    assert instance.jobs.greet.name == "greet"
    with pytest.raises(AttributeError):
        _ = instance.jobs.missing
    with pytest.raises(KeyError):
        _ = instance.jobs["missing"]


_SAME_NAME = define_job(name="greet", input=Greeting, output=Answer, run=_other_greet)


async def test_two_definitions_with_one_name_in_separate_calls_are_refused(
    make_durably: Callable[..., Durably],
) -> None:
    instance = make_durably().register(greet=greet)
    with pytest.raises(ConfigurationError, match="greet"):
        instance.register(other=_SAME_NAME)
    assert "other" not in instance.jobs


async def test_two_definitions_with_one_name_in_one_call_are_refused(
    make_durably: Callable[..., Durably],
) -> None:
    with pytest.raises(ConfigurationError, match="greet"):
        make_durably().register(greet=greet, other=_SAME_NAME)


async def test_one_definition_under_two_handles_is_allowed(make_durably: Callable[..., Durably]) -> None:
    instance = make_durably().register(greet=greet, hello=greet)
    assert instance.jobs.greet.definition is instance.jobs.hello.definition is greet


async def test_registering_a_non_definition_is_refused(make_durably: Callable[..., Durably]) -> None:
    with pytest.raises(ConfigurationError):
        make_durably().register(bad=_other_greet)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("polling_interval", 0),
        ("polling_interval", -1.0),
        ("heartbeat_interval", 0),
        ("heartbeat_interval", -0.5),
        ("stale_threshold", 0),
        ("stale_threshold", -3.0),
        ("max_concurrent_runs", 0),
        ("max_concurrent_runs", -1),
    ],
)
def test_bad_constructor_options_name_the_option(storage_url: str, option: str, value: float) -> None:
    options: dict[str, Any] = {option: value}
    with pytest.raises(ConfigurationError, match=option):
        create_durably(storage_url, **options)
    with pytest.raises(ConfigurationError, match=option):
        Durably(storage_url, **options)


@pytest.mark.parametrize("heartbeat", [3.0, 4.0])
def test_heartbeat_must_be_shorter_than_the_stale_threshold(storage_url: str, heartbeat: float) -> None:
    with pytest.raises(ConfigurationError, match="heartbeat_interval"):
        create_durably(storage_url, heartbeat_interval=heartbeat, stale_threshold=3.0)


# --- job definitions ----------------------------------------------------------------------


def test_define_job_decorator_and_call_forms_return_definitions() -> None:
    assert isinstance(greet, JobDefinition)
    assert greet.name == "greet"
    called = define_job(name="greet-2", input=Greeting, output=Answer, run=_other_greet)
    assert isinstance(called, JobDefinition)
    assert called.name == "greet-2"

    @define_job(name="free-form", input=dict[str, Any])
    async def free_form(step: StepContext, payload: dict[str, Any]) -> Any:
        return payload

    assert isinstance(free_form, JobDefinition)
    assert free_form.name == "free-form"


def _sync_job(step: StepContext, payload: Greeting) -> Answer:
    return Answer(text="sync")


def test_a_sync_job_function_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        define_job(name="sync", input=Greeting, run=_sync_job)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        define_job(name="sync", input=Greeting)(_sync_job)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        define_job(name="not-callable", input=Greeting, run=42)  # type: ignore[call-overload]


@pytest.mark.parametrize("name", ["", "   "])
def test_an_empty_job_name_is_refused(name: str) -> None:
    with pytest.raises(ConfigurationError):
        define_job(name=name, input=Greeting, run=_other_greet)
    with pytest.raises(ConfigurationError):
        define_job(name=name, input=Greeting)(_other_greet)


def test_a_missing_input_type_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="input"):
        define_job(name="no-input", input=None, run=_other_greet)
    with pytest.raises(ConfigurationError, match="input"):
        define_job(name="no-input", input=None)(_other_greet)
    # The signature makes input= required: leaving it out fails at once, either way.
    with pytest.raises((TypeError, ConfigurationError)):
        define_job(name="no-input", run=_other_greet)  # type: ignore[call-overload]


# --- open_storage -----------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["file", "plain", "memory"])
async def test_open_storage_picks_the_local_file_adapter(tmp_path: Path, form: str) -> None:
    url = {
        "file": f"file:{tmp_path / 'a.db'}",
        "plain": str(tmp_path / "b.db"),
        "memory": ":memory:",
    }[form]
    store = open_storage(url)
    try:
        assert isinstance(store, LocalFileStorage)
        assert isinstance(store, Storage)
        await store.migrate()
        assert await store.get_run("nope") is None
    finally:
        await store.close()
    created = [path async for path in anyio.Path(tmp_path).glob("*.db")]
    assert len(created) == (0 if form == "memory" else 1)


@pytest.mark.parametrize("url", ["ftp://x", "", "postgres://user:pw@db.example/app"])
def test_a_bad_url_names_the_accepted_forms(url: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        open_storage(url)
    message = str(info.value)
    for form in ("file:", ":memory:", "libsql://", "https://"):
        assert form in message, (form, message)


def test_a_bad_url_given_to_create_durably_raises_too() -> None:
    with pytest.raises(ConfigurationError, match="libsql://"):
        create_durably("ftp://x")


@pytest.mark.parametrize(
    "url",
    [
        "libsql://db-example.turso.io",
        "https://db-example.turso.io",
        "http://127.0.0.1:8080",
        "wss://db-example.turso.io",
        "ws://127.0.0.1:8080",
    ],
)
async def test_remote_urls_pick_the_remote_adapter(url: str) -> None:
    store = open_storage(url, auth_token="secret-token")  # no connection is opened here
    try:
        assert isinstance(store, RemoteStorage)
        assert isinstance(store, Storage)
        assert "secret-token" not in store.url
    finally:
        await store.close()


async def test_file_url_with_sync_url_picks_the_embedded_replica(tmp_path: Path) -> None:
    store = open_storage(
        f"file:{tmp_path / 'replica.db'}",
        sync_url="libsql://db-example.turso.io",
        auth_token="secret-token",
        sync_interval=2.0,
    )  # no connection is opened here
    try:
        assert isinstance(store, EmbeddedReplicaStorage)
        assert isinstance(store, Storage)
        assert "secret-token" not in store.url
    finally:
        await store.close()


async def test_constructors_do_no_io_and_first_use_names_the_url() -> None:
    url = "file:/nonexistent-dir/x.db"
    store = open_storage(url)
    instance = create_durably(url)
    try:
        assert not await anyio.Path("/nonexistent-dir").exists()
        with pytest.raises(StorageError) as info:
            await store.migrate()
        assert url in str(info.value)
        with pytest.raises(StorageError) as info:
            await instance.get_run("anything")
        assert url in str(info.value)
    finally:
        await store.close()
        await instance.close()
