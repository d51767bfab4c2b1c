"""An S3 endpoint on loopback (moto) for tests that read or write ``s3://`` URLs.

Import as ``from s3_server import moto_s3`` (pytest puts ``tests/`` on ``sys.path``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

from moto.server import ThreadedMotoServer

DUMMY_AWS_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@contextmanager
def moto_s3() -> Iterator[tuple[str, dict]]:
    """Run a moto S3 server; yield ``(endpoint_url, s3fs storage_options)``.

    Dummy credentials are set in the environment for the duration (and restored after),
    so boto-based clients find them without any real AWS configuration.
    """
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    with mock.patch.dict(os.environ, DUMMY_AWS_ENVIRONMENT):
        server.start()
        try:
            host, port = server.get_host_and_port()
            endpoint_url = f"http://{host}:{port}"
            storage_options = {"client_kwargs": {"endpoint_url": endpoint_url}}
            yield endpoint_url, storage_options
        finally:
            server.stop()
