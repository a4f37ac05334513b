"""The streaming state handed to a donating ingest step must not hold one buffer in two leaves.

On a GPU the ingest step donates the state; two leaves sharing a device buffer fail there with "Attempt to donate
the same buffer twice" (CPU ignores donation, so the other CPU tests cannot see it). Checked for every cache
kind, on the state a session starts from and on the bench's fast-forwarded state.
"""

import jax
import pytest

from vidlm.bench import stream


def _buffer_ids(tree) -> list[int]:
  return [leaf.unsafe_buffer_pointer() for leaf in jax.tree.leaves(tree) if hasattr(leaf, "unsafe_buffer_pointer")]


@pytest.mark.parametrize("kind", stream.KINDS)
def test_stream_state_leaves_have_distinct_buffers(kind):
  from flax import nnx

  from vidlm.infer.streaming import StreamingSession, tokens_per_frame
  from vidlm.models.registry import build_model

  class Args:
    chunk, chunks, window_frames, store_frames, top_k = 2, 1, 4, 8, 2

  cfg = stream._config("tiny", Args.chunk)  # noqa: SLF001
  model = build_model(cfg, nnx.Rngs(0))
  tpf = tokens_per_frame(cfg)
  session = StreamingSession(model, cfg, cache_spec=stream._spec(kind, tpf, 10, Args), chunk=Args.chunk,  # noqa: SLF001
                             max_answer=1)
  for state in (session.raw_state, stream.fast_forward(session.raw_state, 10, tpf)):
    ids = _buffer_ids(state)
    assert len(ids) > 3
    assert len(ids) == len(set(ids)), f"{kind}: {len(ids) - len(set(ids))} leaves share a buffer"
