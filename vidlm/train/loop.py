"""The training loop: build, restore, step, log, checkpoint, stop cleanly.

Resume is exact: model, optimizer and data-iterator state come back together, so a resumed run sees the
batches an uninterrupted run would have seen (tests/vidlm/test_resume.py). SIGTERM and SIGINT (Ctrl-C) save a
checkpoint at the end of the current step and return normally; all processes agree on that step
(`vidlm.train.stopping`). `vidlm train` then exits 0 after SIGTERM (what preemptible schedulers expect) and 130 after
SIGINT (interrupted), with the signal and step printed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from vidlm import config as config_lib
from vidlm import sharding
from vidlm.models import build_model
from vidlm.train import optim
from vidlm.train import step as step_lib
from vidlm.train.checkpoint import Checkpointer, check_config_matches_run
from vidlm.train.metrics import MetricWriter, truncate_jsonl
from vidlm.train.stopping import StopRequest

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
  """The loss became NaN/inf; the message names the step and the batch."""


def global_batch(mesh, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """Per-process numpy batch -> global arrays, examples over ("data", "fsdp") (`sharding.input_sharding`)."""
  out = {}
  for k, x in local.items():
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(), *x.shape[1:])
    # each process passes all its frames; where F is split over seq, each device takes its slice of them
    out[k] = jax.make_array_from_process_local_data(sharding.input_sharding(mesh, k, global_shape), x, global_shape)
  return out


def gather_to_host(x: jax.Array) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class Trainer:
  """Holds the run's pieces so the CLI, notebooks and tests drive the same code."""

  def __init__(self, cfg: config_lib.Config, workdir: str | Path):
    self.cfg = config_lib.validate(cfg, jax.device_count())
    self.workdir = Path(workdir)
    self.mesh = sharding.make_mesh(cfg.mesh)
    with self.activate():
      model = build_model(cfg, nnx.Rngs(cfg.train.seed))
      self.model_type = type(model)  # its optional `summarise(sums)` turns summed eval sums into metrics
      optimizer = nnx.Optimizer(model, optim.make_optimizer(cfg.train), wrt=nnx.Param)
      self.graphdef, self.state = nnx.split((model, optimizer))
    self.schedule = optim.learning_rate_schedule(cfg.train)
    # pin the output state to the input shardings: otherwise XLA may pick others and step 2 recompiles
    state_shardings = jax.tree.map(lambda x: x.sharding, self.state)
    self.train_step = jax.jit(
      step_lib.make_train_step(self.graphdef, cfg.train.grad_accum, self.schedule),
      donate_argnums=0,
      out_shardings=(state_shardings, None),
    )
    self.eval_step = jax.jit(step_lib.make_eval_step(self.graphdef))
    self.seq_len = cfg.model.sequence_length(cfg)  # tokens per example; None: the model has none (no tokens/s)

  def activate(self):
    """Mesh + logical rules context under which the model's shardings resolve."""
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(self.mesh))
    stack.enter_context(nnx.logical_axis_rules(sharding.RULES))
    return stack

  @property
  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.state)[0]

  def data_iterator(self, split: str, *, epochs: int | None = None):
    from vidlm.data import pipeline  # noqa: PLC0415  (grain is imported lazily)

    return pipeline.make_iterator(
      self.cfg.data,
      split=split,
      global_batch_size=self.cfg.train.batch_size if split == "train" else self.cfg.eval.batch_size,
      seed=self.cfg.train.seed,
      workdir=str(self.workdir),
      num_epochs=epochs,
    )

  def evaluate_loss(self, max_batches: int | None = None) -> dict[str, float]:
    """Held-out loss / token accuracy / exact match over `eval.batches` batches of the eval split."""
    max_batches = self.cfg.eval.batches if max_batches is None else max_batches
    totals = None
    with self.activate():
      for i, local in enumerate(self.data_iterator("eval", epochs=1)):
        if i >= max_batches:
          break
        sums = self.eval_step(self.state, global_batch(self.mesh, _model_inputs(local)))
        totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    if totals is None:
      raise RuntimeError("evaluation: the eval split produced no batch (data.num_eval < eval.batch_size?)")
    return {k: float(v) for k, v in step_lib.summarise(totals, self.model_type).items()}

  def train(self) -> dict[str, float]:
    cfg, workdir = self.cfg, self.workdir
    is_main = jax.process_index() == 0
    # a config that cannot resume this workdir's run fails here, before anything in the workdir is written
    check_config_matches_run(cfg, workdir)
    data_iter = self.data_iterator("train")
    ckpt = Checkpointer(workdir / "checkpoints", cfg.checkpoint)
    try:
      restored = ckpt.restore(self.state, data_iter)  # unreadable steps are moved aside (checkpoint.py)
      source = ckpt.directory
      if restored is None and cfg.checkpoint.restore_from:
        other = Checkpointer(cfg.checkpoint.restore_from, cfg.checkpoint)
        try:
          restored, source = other.restore(self.state, data_iter), other.directory
        finally:
          other.close()
    except BaseException:
      ckpt.close()
      raise
    if restored is None and ckpt.moved_aside:
      data_iter = self.data_iterator("train")  # a failed restore may have left it part-way: start it afresh
    start = restored[0] if restored else 0
    # the run is known to start: only now record its config (a mismatched or failed start leaves the old one)
    if is_main:
      workdir.mkdir(parents=True, exist_ok=True)
      (workdir / "config.json").write_text(config_lib.to_json(cfg))
      (workdir / "param_shardings.txt").write_text(sharding.describe(self.state) + "\n")
    if restored and is_main:
      print(f"resumed from checkpoint step {start} in {source}", flush=True)
    # logs: drop what a killed run wrote after the checkpoint we resume from, so each step is logged once
    writer = MetricWriter(workdir, total_steps=cfg.train.steps, progress_bar=cfg.train.progress_bar, start_step=start)
    if is_main:
      truncate_jsonl(workdir / "data_order.jsonl", start)
    order_log = open(workdir / "data_order.jsonl", "a") if is_main else None  # noqa: SIM115

    stop = StopRequest().install()  # SIGTERM/SIGINT: save at the end of the step (agreed by all processes), exit
    tokens_per_step = cfg.train.batch_size * self.seq_len if self.seq_len else None
    last = {}
    t_start, steps_timed = None, 0
    step = start
    try:
      with self.activate():
        while step < cfg.train.steps:
          local = next(data_iter)
          batch = global_batch(self.mesh, _model_inputs(local))
          self.state, metrics = self.train_step(self.state, batch)
          metrics = jax.device_get(metrics)
          step += 1
          loss = float(metrics["loss"])
          if not math.isfinite(loss):
            ids = gather_to_host(batch["index"]).tolist() if "index" in batch else "?"
            raise TrainingDiverged(f"step {step}: loss is {loss}; stopping (batch example indices {ids})")
          if t_start is None:  # exclude the compile step from throughput
            t_start = time.perf_counter()
          else:
            steps_timed += 1
          elapsed = time.perf_counter() - t_start
          rates = {}
          if steps_timed:
            rates = {"steps_per_s": steps_timed / elapsed}
            if tokens_per_step:
              rates["tokens_per_s"] = steps_timed * tokens_per_step / elapsed
          last = {**{k: float(v) for k, v in metrics.items()}, **rates}
          if order_log is not None and "index" in batch:
            order_log.write(json.dumps({"step": step, "index": gather_to_host(batch["index"]).tolist()}) + "\n")
            order_log.flush()
          elif "index" in batch:
            gather_to_host(batch["index"])  # collective: every process joins
          if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            writer.write(step, last)
          writer.progress(step, {"loss": loss, **rates})
          if cfg.eval.every and step % cfg.eval.every == 0:
            writer.write(step, self.evaluate_loss(), prefix="eval")
          if stop.should_stop(step):  # a collective when process_count() > 1: every process calls it every step
            ckpt.save(step, self.state, data_iter, wait=True)
            print(stop.describe(), flush=True)  # names the signal and the step; ends with the step number
            return {"step": step, "stopped": 1.0, "exit_code": stop.exit_code, **last}
          if cfg.checkpoint.every and step % cfg.checkpoint.every == 0:
            writer.flush()  # the logs up to a checkpoint reach disk before it does (a resume keeps them)
            ckpt.save(step, self.state, data_iter)
      if not ckpt.steps() or ckpt.steps()[-1] != step:
        ckpt.save(step, self.state, data_iter)
      ckpt.wait()
      return {"step": step, "resumed_from": start, **last}
    finally:
      stop.restore()
      writer.close()
      if order_log is not None:
        order_log.close()
      ckpt.close()


def _model_inputs(local: dict) -> dict[str, np.ndarray]:
  """Every array the data layer decoded, for `model.loss(batch)` (DESIGN section 5: no list of names here; a
  model reads the keys it needs, e.g. VideoLM frames/tokens/targets/loss_mask, scene segmentation cut_frames).

  One rule keeps a value out: it cannot become a device array of the batch. That is a string, bytes or Python
  object array (numpy dtype kind U, S, O: e.g. question/answer text a data source might batch) or a value without
  a leading batch dimension (0-d). Numeric and bool arrays [B, ...] all pass, whatever their name.
  """
  out = {}
  for k, v in local.items():
    x = np.asarray(v)
    if x.dtype.kind in "biuf" and x.ndim >= 1:
      out[k] = x
    elif k not in _KEPT_OUT:
      _KEPT_OUT.add(k)
      log.info("batch key %r (dtype %s, shape %s) is not a device array; not passed to the model", k, x.dtype, x.shape)
  return out


_KEPT_OUT: set[str] = set()  # keys already reported by _model_inputs
