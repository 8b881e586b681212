"""A real S3 endpoint for tests: moto's server on 127.0.0.1, in a thread of the test process.

Use the fixtures by importing them into a test module (pytest finds fixtures there; the functions carry other
names than the fixtures so that a test's `s3_bucket` argument does not shadow an import):

    from s3_server import s3_bucket_fixture, s3_endpoint_fixture  # noqa: F401

`s3_endpoint` (one server per session) is the endpoint URL; `s3_bucket` (per test) creates a fresh bucket, points
the standard environment variables at the server (dummy credentials, AWS_ENDPOINT_URL) for that test only, and
returns the bucket's name. Both skip, saying why, when s3fs or moto[server] is not installed.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

# Dummy values: moto accepts any credentials, and real ones must never reach a test.
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def missing_packages() -> str | None:
    """Why the S3 tests cannot run here, or None when they can."""
    try:
        import boto3  # noqa: F401
        import s3fs  # noqa: F401
        from moto.server import ThreadedMotoServer  # noqa: F401
    except ImportError as err:
        return f"S3 tests need s3fs and moto[server] (pip install -e '.[dev]'): {err}"
    return None


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """A moto server on a free port of 127.0.0.1 for the duration of the block; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)  # port 0: the OS picks a free one
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def create_bucket(endpoint: str, name: str | None = None) -> str:
    """Create a bucket on the server at `endpoint` (a fresh name unless given); returns its name."""
    import boto3

    bucket = name or f"seshu-test-{uuid.uuid4().hex[:12]}"
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=CREDENTIALS["AWS_DEFAULT_REGION"],
        aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=bucket)
    return bucket


@pytest.fixture(scope="session", name="s3_endpoint")
def s3_endpoint_fixture() -> Iterator[str]:
    reason = missing_packages()
    if reason:
        pytest.skip(reason)
    with moto_s3_server() as endpoint:
        yield endpoint


@pytest.fixture(name="s3_bucket")
def s3_bucket_fixture(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> str:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    # Settings that would send requests elsewhere or sign them with a real profile.
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL_S3", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.setenv(name, "/nonexistent/seshu-test")
    return create_bucket(s3_endpoint)
