"""A throwaway team server for the tests: a PostgreSQL cluster on a free port, run by an unprivileged
user, and an ``mlflow server`` on it with proxied artifacts and MLflow's basic-auth app.

Usable from a shell too (``python tests/team_server.py``): it starts both, prints the tracking URI and
the credentials, and stops both on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from argse.testing.servers import free_port, wait_for_http

ADMIN = ("admin", "argse-admin-password-1")  # created by the auth app on its first start
USER = ("teammate", "argse-teammate-password-1")  # created through the auth API, as a team would
DB_USER, DB_PASSWORD = "mlflow", "mlflow-db-password"


def postgres_bin() -> Path | None:
    """The newest Debian PostgreSQL server binaries (``/usr/lib/postgresql/<version>/bin``), if any."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parent.parent.name))
    return Path(found[-1]).parent if found else None


@contextlib.contextmanager
def credentials_in_env(credentials: tuple[str, str]):
    """MLflow clients made in the block (this process) sign in as ``credentials`` (user, password);
    the environment is restored after."""
    keys = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    saved = {k: os.environ.get(k) for k in keys}
    os.environ.update(dict(zip(keys, credentials)))
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class PostgresCluster:
    """``initdb`` + ``pg_ctl start`` in a temp dir; as ``nobody`` when this process is root (the server
    refuses to run as root). Host logins need a password; the socket in the temp dir trusts the owner."""

    def __init__(self):
        self.bin = postgres_bin()
        if self.bin is None:
            raise RuntimeError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin "
                               "(Debian: apt-get install postgresql)")
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="argse-pg-"))
        self.data = self.dir / "data"
        self.user = "nobody" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
        if os.geteuid() == 0:
            entry = pwd.getpwnam(self.user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", self.user, "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *args], cwd=self.dir, capture_output=True, text=True, check=check,
                              timeout=120)

    def psql(self, sql: str, database: str = "postgres") -> None:
        self._run(str(self.bin / "psql"), "-q", "-h", str(self.dir), "-p", str(self.port), "-U", "postgres",
                  "-d", database, "-v", "ON_ERROR_STOP=1", "-c", sql)

    def start(self) -> "PostgresCluster":
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "-E", "UTF8",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "--no-instructions")
        self.restart()
        self.psql(f"CREATE USER {DB_USER} PASSWORD '{DB_PASSWORD}'")
        for database in ("mlflow", "mlflow_auth"):
            self.psql(f"CREATE DATABASE {database} OWNER {DB_USER}")
        return self

    def restart(self) -> None:
        """Start the server on the existing data directory (after :meth:`stop` with ``remove=False``)."""
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.dir / "log"),
                  "-w", "start")

    def uri(self, database: str) -> str:
        return f"postgresql://{DB_USER}:{DB_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def stop(self, remove: bool = True) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop", check=False)
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)


class TrackingServer:
    """``mlflow server`` on a cluster's ``mlflow`` database, artifacts proxied into a temp dir,
    ``--app-name basic-auth`` with its user store in the ``mlflow_auth`` database."""

    def __init__(self, cluster: PostgresCluster, workdir: Path):
        self.cluster = cluster
        self.workdir = Path(workdir)
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.workdir / "auth.ini")
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = "argse-test-server-key"  # the auth app's CSRF key
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # the GenAI job runners: unused here
        return env

    def start(self, timeout: float = 180) -> "TrackingServer":
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "auth.ini").write_text(
            "[mlflow]\ndefault_permission = READ\n"
            f"database_uri = {self.cluster.uri('mlflow_auth')}\n"
            f"admin_username = {ADMIN[0]}\nadmin_password = {ADMIN[1]}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            "auth_cache_ttl_seconds = 10\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth",
             "--backend-store-uri", self.cluster.uri("mlflow"),
             "--artifacts-destination", str(self.workdir / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.workdir, env=self.env(), stdout=subprocess.DEVNULL,
            stderr=open(self.workdir / "server.log", "wb"), start_new_session=True)
        wait_for_http(f"{self.uri}/health", self.proc, timeout=timeout, log=self.workdir / "server.log")
        self._create_user(*USER)
        return self

    def create_user(self, username: str, password: str) -> None:
        self._create_user(username, password)

    def _create_user(self, username: str, password: str) -> None:
        """A team member: with ``default_permission = READ`` they read everything and manage what they
        create (their own experiments and registered models)."""
        from mlflow.server.auth.client import AuthServiceClient

        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = ADMIN
        try:
            AuthServiceClient(self.uri).create_user(username, password)
        finally:
            del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]

    def client_env(self, credentials: tuple[str, str] | None = USER) -> dict[str, str]:
        """The environment of a team member's shell: the tracking URI and (when given) credentials."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        env["MLFLOW_TRACKING_URI"] = self.uri
        if credentials:
            env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"] = credentials
        return env

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the server and its workers (``SIGSTOP`` freezes it, ``SIGCONT`` thaws it)."""
        os.killpg(self.proc.pid, sig)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


if __name__ == "__main__":
    cluster = PostgresCluster().start()
    server = TrackingServer(cluster, Path(tempfile.mkdtemp(prefix="argse-server-")))
    try:
        server.start()
        print(f"MLFLOW_TRACKING_URI={server.uri} MLFLOW_TRACKING_USERNAME={USER[0]} "
              f"MLFLOW_TRACKING_PASSWORD={USER[1]}  (PostgreSQL on port {cluster.port}; Ctrl-C stops)", flush=True)
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
        cluster.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
