"""Test-wide setup: 8 fake CPU devices, set before JAX initialises any backend."""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


def pytest_collection_modifyitems(config, items):
  platform = jax.default_backend()
  for item in items:
    if "gpu" in item.keywords and platform != "gpu":
      item.add_marker(pytest.mark.skip(reason="needs a GPU"))
    if "tpu" in item.keywords and platform != "tpu":
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))
