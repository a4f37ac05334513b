"""Test-wide setup: 8 fake CPU devices, set before JAX initialises any backend; a persistent XLA compilation cache
per test process; and a check that `--dist loadgroup` really groups.

Why the cache: the subprocess tests start `python -m vidlm.cli` again and again on the same smoke config (train,
kill, resume, eval, demo), and each start compiles the same programs from scratch; on 2 cores that is most of their
time. JAX keys the cache on the HLO, the compile options and the devices, so a hit returns the executable a compile
would have produced and nothing a test checks changes. Each test process (an xdist worker, or a plain run) gets its
own directory, exported as JAX_COMPILATION_CACHE_DIR so the CLI subprocesses it starts (their env is built from
os.environ) share it, and removed when that process ends. One directory per worker, not one for the run: JAX writes
entries in place (no temp file + rename), so two workers compiling the same program at once could read a
half-written entry (JAX then warns and compiles). A JAX_COMPILATION_CACHE_DIR set by the caller is used as is (set it
to an empty string to run without the cache).
"""

import os
import shutil
import tempfile
import warnings

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# cache every program, not only those compiling for >= 1 s (JAX's default): on 2 cores most compiles take 0.1-1 s
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)

_own_cache_dir: str | None = None


def pytest_configure(config):
  global _own_cache_dir
  xdist_controller = not hasattr(config, "workerinput") and config.getoption("dist", "no") != "no"
  if xdist_controller or "JAX_COMPILATION_CACHE_DIR" in os.environ:
    return  # the controller runs no tests; a caller's setting wins
  _own_cache_dir = tempfile.mkdtemp(prefix="vidlm-tests-xla-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _own_cache_dir
  jax.config.update("jax_compilation_cache_dir", _own_cache_dir)


def pytest_unconfigure(config):
  if _own_cache_dir is not None:
    shutil.rmtree(_own_cache_dir, ignore_errors=True)


@pytest.hookimpl(trylast=True)  # after xdist's own hook, which tags the grouped tests
def pytest_collection_modifyitems(config, items):
  platform = jax.default_backend()
  for item in items:
    if "gpu" in item.keywords and platform != "gpu":
      item.add_marker(pytest.mark.skip(reason="needs a GPU"))
    if "tpu" in item.keywords and platform != "tpu":
      item.add_marker(pytest.mark.skip(reason="needs a TPU"))
  # `slow` tests first: xdist hands out work units (a group, or one test) in collection order after sorting them by
  # test count, one at a time as a worker runs dry, so a minute-long test collected late would run alone at the end
  # while the other worker idles (longest first is the usual fix). Whole modules move (a module fixture is built
  # once in a plain run too), and the sort is stable: everything else keeps its order.
  slow_files = {item.path for item in items if item.get_closest_marker("slow")}
  items.sort(key=lambda item: item.path not in slow_files)
  _check_loadgroup(config, items)


def _check_loadgroup(config, items) -> None:
  """Under `--dist loadgroup` an xdist worker tags each grouped test's node id with `@<group>`, and the controller
  schedules by that tag. pytest 9.2 drops the tag (pytest-xdist#1386): every group is then silently spread over both
  workers and its module fixtures are built twice. Say so in the warnings summary (pyproject pins pytest < 9.2)."""
  if not (hasattr(config, "workerinput") and config.getvalue("loadgroup")):
    return
  lost = [item.nodeid for item in items if item.get_closest_marker("xdist_group") and "@" not in item.nodeid]
  if lost:
    warnings.warn(pytest.PytestWarning(
      f"--dist loadgroup is not grouping with pytest {pytest.__version__} ({len(lost)} grouped tests lost their "
      f"group, e.g. {lost[0]}; pytest-xdist#1386): module fixtures run on both workers and the suite is slower; "
      "reinstall the dev dependencies (make setup; pyproject pins pytest < 9.2)"
    ), stacklevel=1)
