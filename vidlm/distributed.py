"""Multi-process start-up: `jax.distributed.initialize` from config or environment, before any device use."""

from __future__ import annotations

import os

import jax

from vidlm.config import ConfigError, DistributedConfig

_ENV = {
  "coordinator_address": "VIDLM_COORDINATOR",
  "num_processes": "VIDLM_NUM_PROCESSES",
  "process_id": "VIDLM_PROCESS_ID",
  "local_device_count": "VIDLM_LOCAL_DEVICE_COUNT",
}


def initialize(cfg: DistributedConfig) -> None:
  """Initialise JAX's distributed runtime when asked to (config or VIDLM_* env); no-op for one process.

  On CPU, `local_device_count` fakes that many devices per process (tests run 2 processes x 4 devices).
  """
  values = {k: getattr(cfg, k) for k in _ENV}
  for key, env in _ENV.items():
    if values[key] is None and os.environ.get(env):
      try:
        values[key] = os.environ[env] if key == "coordinator_address" else int(os.environ[env])
      except ValueError:
        raise ConfigError(f"environment variable {env}={os.environ[env]!r}: expected an integer") from None
  enabled = cfg.enabled or values["coordinator_address"] is not None
  if values["local_device_count"]:
    jax.config.update("jax_num_cpu_devices", values["local_device_count"])
  if not enabled:
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {k: values[k] for k in ("coordinator_address", "num_processes", "process_id") if values[k] is not None}
  if values["local_device_count"]:
    # CPU multi-process: collectives across processes need gloo
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(**kwargs)
  except ValueError as e:
    missing = [k for k in ("coordinator_address", "num_processes", "process_id") if values[k] is None]
    if not missing:  # everything was given: not a missing-setting problem
      raise
    fields = ", ".join(f"distributed.{k} (or {_ENV[k]})" for k in missing)
    raise ConfigError(
      f"config.distributed.enabled=true but JAX found no cluster to read the rest from ({e}); set {fields}, "
      f"or run under SLURM / Open MPI / a TPU pod, where they are detected"
    ) from None
