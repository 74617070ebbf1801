"""The command lines' XLA flag: added once, never over the user's own setting."""

import os

from gfa_jax import xla_flags


def test_adds_the_flag_to_existing_flags(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  xla_flags.use_fast_cpu_convolutions()
  xla_flags.use_fast_cpu_convolutions()
  assert os.environ["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=2 " + xla_flags.FAST_CPU_CONVOLUTIONS)


def test_keeps_the_users_choice(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
  xla_flags.use_fast_cpu_convolutions()
  assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
