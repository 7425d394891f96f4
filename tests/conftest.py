"""Shared pytest fixtures: the repo's paths and the optional ../shared/data folder."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data when present (CI and developer machines); skip otherwise."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present beside the repository")
    return SHARED_DATA


@pytest.fixture(scope="session")
def fixtures() -> Path:
    return FIXTURES


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that needs Ray (pipeline, training)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


# --------------------------------------------------------------------------- S3 (moto server)


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 HTTP endpoint (moto's threaded server on 127.0.0.1, free port): its URL.

    Dummy credentials and region are set in the environment for the whole session (s3fs and
    boto3 read them there; Ray workers started after this inherit them). Buckets persist for
    the session: give each test its own bucket (see ``s3_bucket``).
    """
    moto_server = pytest.importorskip("moto.server")
    mp = pytest.MonkeyPatch()
    mp.setenv("AWS_ACCESS_KEY_ID", "testing")
    mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
    for var in ("AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        mp.delenv(var, raising=False)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
        mp.undo()


@pytest.fixture()
def s3_bucket(s3_server):
    """A fresh, empty bucket on ``s3_server``: its name."""
    import uuid

    boto3 = pytest.importorskip("boto3")
    name = f"t-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def ray_s3(s3_server, ray_session):
    """Ray whose workers see the dummy AWS credentials (moto accepts any): the S3 endpoint.

    Workers inherit the environment Ray was started with; if another module started Ray before
    ``s3_server`` set the credentials, restart it so actors can sign their S3 requests. The
    process-wide endpoint a test may set (``--s3-endpoint``) is cleared afterwards.
    """
    ray = ray_session

    @ray.remote(num_cpus=0)
    def worker_key():
        return os.environ.get("AWS_ACCESS_KEY_ID")

    if ray.get(worker_key.remote()) != os.environ["AWS_ACCESS_KEY_ID"]:
        ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield s3_server
    from ray_mff import storage

    storage.set_s3_endpoint(None)
