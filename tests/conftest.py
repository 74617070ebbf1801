"""Shared test helpers."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, *, devices: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
  """Runs ``code`` in a fresh interpreter with ``devices`` fake CPU devices.

  XLA reads the device count once, at start-up, so multi-device tests need their own process.
  """
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO),
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.fixture
def tiny_config():
  from configs import tiny
  return tiny.get_config()
