"""A team's shared services, started for real on loopback for one test: PostgreSQL (Debian's server
binaries), an S3 endpoint (moto in server mode), an MLflow tracking server on both, and a Prefect server
on the same PostgreSQL. `.ci/run` installs Debian's `postgresql`; each helper stops what it started.

PostgreSQL refuses to run as root, and CI runs as root: then the cluster belongs to the `postgres`
user that Debian's package creates, in a folder under /tmp that user can reach (pytest's own tmp
folders are private to root).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import free_port

BIN = Path(sys.executable).parent  # the venv's mlflow, prefect and moto_server
HOST = "127.0.0.1"
USER = "ms2rgb"
# moto accepts any key; boto3, s3fs and DVC's S3 filesystem all read these variables.
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def postgres_bin() -> Path | None:
    """Debian's server binaries (package `postgresql`), which are not on PATH."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")) or [shutil.which("pg_ctl")]
    return Path(found[-1]).resolve().parent if found[-1] else None


def _as_owner(command: list[str], owner: str | None) -> list[str]:
    return ["runuser", "-u", owner, "--", *command] if owner else command


def _wait(ready: Callable[[], bool], what: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Until `ready()`; fails the test with the log's end if the process exits or time runs out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"{what} did not start; {log} ends:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status < 500)
    except OSError:
        return False


@contextmanager
def postgres(databases: tuple[str, ...]) -> Iterator[str]:
    """A fresh cluster on a free loopback port with `databases`; yields `USER@127.0.0.1:<port>`."""
    bin_dir = postgres_bin()
    if bin_dir is None:
        pytest.fail("PostgreSQL's server binaries are missing. Fix: `apt-get install postgresql` (.ci/run does)")
    owner = "postgres" if os.geteuid() == 0 else None
    base = Path(tempfile.mkdtemp(prefix="ms2rgb-pg-"))
    if owner:
        record = pwd.getpwnam(owner)
        os.chown(base, record.pw_uid, record.pw_gid)
    data, port, log = base / "data", free_port(), base / "server.log"
    subprocess.run(
        _as_owner([str(bin_dir / "initdb"), "-D", str(data), "-U", USER, "--auth=trust", "-E", "UTF8"], owner),
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {base} -c listen_addresses={HOST} -c fsync=off"
    start = [str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", options, "-w", "-t", "120", "start"]
    subprocess.run(_as_owner(start, owner), check=True, capture_output=True)
    try:
        for name in databases:
            createdb = [str(bin_dir / "createdb"), "-h", HOST, "-p", str(port), "-U", USER, name]
            subprocess.run(createdb, check=True, capture_output=True)
        yield f"{USER}@{HOST}:{port}"
    finally:
        stop = [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
        subprocess.run(_as_owner(stop, owner), capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


def _spawn(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def s3_endpoint(folder: Path, buckets: tuple[str, ...]) -> Iterator[str]:
    """moto's S3 in server mode on a free loopback port, with `buckets`; yields the endpoint URL."""
    import boto3

    port, log = free_port(), folder / "moto.log"
    process = _spawn([str(BIN / "moto_server"), "-H", HOST, "-p", str(port)], log, {**os.environ, **S3_ENV})
    url = f"http://{HOST}:{port}"
    try:
        _wait(lambda: _answers(url), "moto's S3 server", process, log, 60)
        client = boto3.client("s3", endpoint_url=url, **boto_keys())
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield url
    finally:
        _stop(process)


def boto_keys() -> dict[str, str]:
    return {
        "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": S3_ENV["AWS_DEFAULT_REGION"],
    }


def upload(endpoint: str, path: Path, url: str) -> None:
    """Put a local file at an s3://bucket/key URL."""
    import boto3

    bucket, key = url.removeprefix("s3://").split("/", 1)
    boto3.client("s3", endpoint_url=endpoint, **boto_keys()).upload_file(str(path), bucket, key)


def s3_keys(endpoint: str, bucket: str, prefix: str = "") -> list[str]:
    """Every object key under `prefix` in `bucket`."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, **boto_keys())
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for page in pages for item in page.get("Contents", [])]


@contextmanager
def mlflow_server(folder: Path, backend: str, artifacts: str, s3: str) -> Iterator[str]:
    """`mlflow server` with a PostgreSQL backend store and an S3 artifact store it proxies (clients need
    no S3 keys); yields the tracking URI."""
    port, log = free_port(), folder / "mlflow.log"
    command = [str(BIN / "mlflow"), "server", "--host", HOST, "--port", str(port), "--workers", "1"]
    command += ["--backend-store-uri", backend, "--artifacts-destination", artifacts]
    env = {**os.environ, **S3_ENV, "MLFLOW_S3_ENDPOINT_URL": s3}
    process = _spawn(command, log, env)
    url = f"http://{HOST}:{port}"
    try:
        _wait(lambda: _answers(f"{url}/health"), "the MLflow server", process, log, 180)
        yield url
    finally:
        _stop(process)
