"""Frame positions for length generalisation (layers/rope.py + VideoLMConfig.train_positions / eval_positions):
the positions each option produces, determinism per seed, and that the defaults are today's positions bit for bit
(training and evaluation)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from experiments.demo import get_config as demo_config
from layers import rope
from vidlm import config as config_lib
from vidlm.models import build_model
from vidlm.train import optim
from vidlm.train import step as step_lib


@pytest.mark.parametrize("grid", [(8, 4, 4), (1, 4, 4), (3, 2, 5), (2, 6, 3)])
def test_frame_positions_of_arange_are_the_default_positions(grid):
  want = rope.video_text_positions(grid, 7)
  got = np.asarray(rope.frame_positions(np.arange(grid[0]), grid[1:], 7))
  assert got.dtype == want.dtype == np.int32
  np.testing.assert_array_equal(got, want)


def test_random_frame_t_sorted_distinct_in_range_and_seeded():
  keys = jax.random.split(jax.random.key(3), 200)
  t = np.asarray(jax.vmap(lambda k: rope.random_frame_t(k, 8, 64))(keys))  # [200, 8]
  assert t.dtype == np.int32 and t.shape == (200, 8)
  assert (np.diff(t, axis=1) > 0).all()  # sorted, no repeats: frames keep their order
  assert t.min() >= 0 and t.max() < 64
  assert t.min() == 0 and t.max() == 63  # 200 draws reach both ends of the range
  assert len({tuple(r) for r in t}) > 190  # draws differ between keys
  np.testing.assert_array_equal(np.asarray(rope.random_frame_t(keys[5], 8, 64)), t[5])  # same key, same draw
  # the whole range is allowed when it equals the frame count: then the draw is contiguous
  np.testing.assert_array_equal(np.asarray(rope.random_frame_t(keys[0], 8, 8)), np.arange(8))
  with pytest.raises(ValueError, match="max_position=4 < num_frames=8"):
    rope.random_frame_t(keys[0], 8, 4)


def test_shifted_frame_t_contiguous_offsets():
  keys = jax.random.split(jax.random.key(0), 100)
  t = np.asarray(jax.vmap(lambda k: rope.shifted_frame_t(k, 8, 32))(keys))
  assert (np.diff(t, axis=1) == 1).all()
  assert t.min() == 0 and t.max() == 31 and t[:, 0].max() == 24
  assert len(set(t[:, 0].tolist())) > 20


def test_interpolated_frame_t_and_text_start():
  np.testing.assert_array_equal(rope.interpolated_frame_t(6, 8), np.arange(6))  # shorter than the range: as is
  t = rope.interpolated_frame_t(64, 8)
  np.testing.assert_allclose(t, np.arange(64) / 8)
  assert t.max() < 8
  pos = np.asarray(rope.frame_positions(t, (4, 4), 3))
  assert pos.dtype == np.float32
  np.testing.assert_array_equal(pos[-3:], [[8, 8, 8], [9, 9, 9], [10, 10, 10]])  # text where training put it
  np.testing.assert_allclose(pos[16 * 9, 0], 9 / 8)  # frame 9's tokens at t = 9/8


def _cfg(**model):
  cfg = demo_config("smoke")
  m = cfg.model
  m.embed_dim, m.num_layers, m.num_heads, m.num_kv_heads, m.head_dim, m.mlp_dim = 32, 1, 2, 1, 16, 64
  for k, v in model.items():
    setattr(m, k, v)
  return config_lib.validate(cfg, jax.device_count())


def _batch(cfg, frames=None, b=4):
  d = cfg.data
  if frames is not None:
    d = config_lib.Config().data
    d.frames, d.height, d.width, d.text_len = frames, cfg.data.height, cfg.data.width, cfg.data.text_len
  return {k: jnp.asarray(v) for k, v in step_lib.random_batch(d, b, seed=1).items()}


def test_defaults_are_todays_positions_in_training_and_evaluation():
  cfg = _cfg()
  model = build_model(cfg, nnx.Rngs(0))
  batch = _batch(cfg)
  explicit = rope.video_text_positions(model._grid(batch["frames"].shape), batch["tokens"].shape[1])
  np.testing.assert_array_equal(model.positions(batch["frames"].shape, batch["tokens"].shape[1]), explicit)
  want = model(batch["frames"], batch["tokens"], positions=explicit)
  eval_loss, _ = model.loss(batch)
  model.train()
  assert model.training_positions(batch["frames"].shape, 32, batch["index"]) is None
  train_loss, _ = model.loss(batch)
  np.testing.assert_array_equal(np.asarray(model(batch["frames"], batch["tokens"])), np.asarray(want))
  assert float(train_loss) == float(eval_loss)  # bit for bit: no position trick is on by default


def test_random_positions_only_in_training_and_seeded():
  cfg = _cfg(train_positions="random", max_train_position=64)
  model = build_model(cfg, nnx.Rngs(0))
  plain = build_model(_cfg(), nnx.Rngs(0))  # same parameters (the options add none)
  batch = _batch(cfg)
  # evaluation (the default mode) is unchanged by the option
  np.testing.assert_array_equal(np.asarray(model.loss(batch)[0]), np.asarray(plain.loss(batch)[0]))
  pos = np.asarray(model.training_positions(batch["frames"].shape, 32, batch["index"]))  # [B, N, 3]
  assert pos.shape == (4, 8 * 16 + 32, 3) and pos.dtype == np.int32
  frame_t = pos[:, :128:16, 0]  # one token per frame
  assert (np.diff(frame_t, axis=1) > 0).all() and frame_t.max() < 64
  assert len({tuple(r) for r in frame_t}) == 4  # each example its own draw
  np.testing.assert_array_equal(pos[:, :128, 1:], np.broadcast_to(pos[0, :16, 1:], (4, 8, 16, 2)).reshape(4, 128, 2))
  np.testing.assert_array_equal(pos[:, 128, 0], np.maximum(frame_t[:, -1] + 1, 4))  # text after the video
  np.testing.assert_array_equal(np.diff(pos[:, 128:, 0], axis=1), 1)
  again = model.training_positions(batch["frames"].shape, 32, batch["index"])
  np.testing.assert_array_equal(np.asarray(again), pos)  # deterministic per (seed, index)
  other = _cfg(train_positions="random", max_train_position=64)
  other.train.seed = 7
  moved = np.asarray(build_model(other, nnx.Rngs(0)).training_positions(batch["frames"].shape, 32, batch["index"]))
  assert (moved != pos).any()
  model.train()
  train_loss = model.loss(batch)[0]
  want = model(batch["frames"], batch["tokens"], positions=pos)
  from vidlm.models import losses  # noqa: PLC0415

  np.testing.assert_allclose(float(train_loss), float(losses.answer_loss(want, batch)[0]), rtol=1e-6)
  assert float(train_loss) != float(plain.loss(batch)[0])


def test_shift_positions():
  cfg = _cfg(train_positions="shift", max_train_position=40)
  model = build_model(cfg, nnx.Rngs(0))
  batch = _batch(cfg)
  pos = np.asarray(model.training_positions(batch["frames"].shape, 32, batch["index"]))
  frame_t = pos[:, :128:16, 0]
  assert (np.diff(frame_t, axis=1) == 1).all() and frame_t.max() < 40 and frame_t.min() >= 0
  np.testing.assert_array_equal(pos[:, 128, 0], frame_t[:, -1] + 1)


def test_train_step_draws_training_positions():
  """The jitted train step puts the model in training mode: its loss is the one under the drawn positions."""
  cfg = _cfg(train_positions="random", max_train_position=64)
  model = build_model(cfg, nnx.Rngs(0))
  batch = _batch(cfg)
  opt = nnx.Optimizer(model, optim.make_optimizer(cfg.train), wrt=nnx.Param)
  graphdef, state = nnx.split((model, opt))
  step = jax.jit(step_lib.make_train_step(graphdef, 1, optim.learning_rate_schedule(cfg.train)))
  eval_loss = float(model.loss(batch)[0])  # before the update; the model object stays in evaluation mode
  _, metrics = step(state, batch)
  model.train()
  want = float(model.loss(batch)[0])
  np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
  assert abs(float(metrics["loss"]) - eval_loss) > 1e-4


def test_interpolation_at_evaluation():
  cfg = _cfg(eval_positions="interpolate")
  model = build_model(cfg, nnx.Rngs(0))
  plain = build_model(_cfg(), nnx.Rngs(0))
  np.testing.assert_array_equal(model.positions((1, 8, 32, 32, 3), 32), plain.positions((1, 8, 32, 32, 3), 32))
  long = _batch(cfg, frames=32, b=2)
  pos = model.positions(long["frames"].shape, 32)
  assert pos.dtype == np.float32
  np.testing.assert_allclose(pos[: 32 * 16 : 16, 0], np.arange(32) / 4)
  np.testing.assert_array_equal(pos[32 * 16 :, 0], 8 + np.arange(32))  # text where the 8-frame training put it
  got = model(long["frames"], long["tokens"])
  np.testing.assert_allclose(np.asarray(got), np.asarray(plain(long["frames"], long["tokens"], positions=pos)),
                             rtol=1e-6, atol=1e-6)
  assert not np.allclose(np.asarray(got), np.asarray(plain(long["frames"], long["tokens"])), atol=1e-4)
  # under jit (the evaluators' scoring): the positions are a function of the shape, computed at trace time
  graphdef, state = nnx.split(model)
  jitted = jax.jit(lambda st, b: nnx.merge(graphdef, st).loss(b, per_example=True)[1]["loss_sum"])(state, long)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(model.loss(long, per_example=True)[1]["loss_sum"]),
                             rtol=1e-5)
  # after random training the trained range is max_train_position: a video inside it is not squeezed
  wide = build_model(_cfg(train_positions="random", max_train_position=64, eval_positions="interpolate"),
                     nnx.Rngs(0))
  np.testing.assert_array_equal(wide.positions(long["frames"].shape, 32), plain.positions(long["frames"].shape, 32))


@pytest.mark.parametrize(("field", "value", "match"), [
  ("train_positions", "randm", "config.model.train_positions=randm: expected contiguous | random | shift"),
  ("eval_positions", "scale", "config.model.eval_positions=scale: expected contiguous | interpolate"),
  ("max_train_position", 4, "config.model.max_train_position=4: must be an int >= the training video's 8"),
])
def test_bad_options_are_one_line(field, value, match):
  cfg = demo_config("smoke")
  cfg.model.train_positions, cfg.model.max_train_position = "random", 64
  setattr(cfg.model, field, value)
  with pytest.raises(config_lib.ConfigError, match=match):
    config_lib.validate(cfg, jax.device_count())
