"""`StreamingSession`: ingest a video chunk by chunk at bounded memory and answer questions at any time (issue 13).

  session = StreamingSession(model, cfg, cache_spec=CacheSpec("block_retrieval", sink=16, window=256, block=16,
                                                                blocks=1024, top_k=4))
  for chunk in frame_source:                 # uint8 [F, H, W, 3] (batch 1) or [B, F, H, W, 3]
    session.ingest(chunk)
    if ...: print(session.ask("what digits does the needle show?"))
  saved = session.state(); ...; session.restore(saved)
  session.stats()                            # frames, frames/s, state bytes, device memory, compilations

Two backends behind one API:
  VideoLM          a `layers.cache.KVCache` of any kind (full | sink_window | block_retrieval), filled by
                   `VideoLM.extend`; questions answered by `vidlm.infer.generate.generate_cached`.
  MemoryBridgeLM   a `vidlm.infer.memory_stream.MemoryState` (carried memory, a bank of `memory_capacity` segment
                   memories with fifo | score eviction, the overlap tail); answers by greedy `model.read` decoding.

Guarantees:
  * one compilation per chunk shape: `ingest` runs one jitted step; a chunk may be `chunk` frames or, at the end
    of a video, fewer (any multiple of `granularity`); anything else is one `ConfigError` line naming the
    expected shape, before any device work.
  * `ask` does not disturb the stream: caches are values; the question and answer are appended to the session's
    state inside a separate jitted call whose result is dropped, so later answers are those of a stream that was
    never asked (tested).
  * `state()` is a pytree of host numpy arrays (plain dicts; orbax's `PyTreeCheckpointer` saves it as is);
    `restore(state)` puts it back on the device. The static parts (cache spec, mask, frame shape) come from the
    session's construction, so restore into a session built with the same arguments.
  * constant memory: every array of the state has a shape fixed at construction (`stats()["state_bytes"]`).

Not done: token drop (DTD) during ingest. `VideoLM.extend` refuses `model.token_drop_tau < 1` with one line, and
so does the session.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from layers.cache import CacheSpec, KVCache
from vidlm.config import ConfigError
from vidlm.data import tokenizer
from vidlm.infer import memory_stream


def is_memory_bridge(model) -> bool:
  return hasattr(model, "bridge") and hasattr(model, "retriever") and hasattr(model, "read")


def tokens_per_frame(cfg) -> int:
  _, th, tw = cfg.model.tubelet
  return (cfg.data.height // th) * (cfg.data.width // tw)


def training_length_sizes(cfg) -> tuple[int, int, int]:
  """(chunk frames, window frames in tubelet rows, top_k) for `rope_positions="cache"`: what a chunk or question
  attends is one training-length video, sinks = frame 0 + top_k retrieved frames + a window of half the training
  length (= the chunk); e.g. 8 frames: 1 + 3 + 4. The position remap makes that context read as the videos the
  model was trained on; a longer context would put it out of distribution again."""
  tt = cfg.model.tubelet[0]
  train_frames = cfg.data.frames
  half = max(tt, train_frames // 2 // tt * tt)  # window = chunk, in whole tubelet rows
  return half, half // tt, max(1, (train_frames - half) // tt - 1)


def default_cache_spec(cfg, kind: str, *, max_frames: int = 1024, chunk: int | None = None, max_answer: int = 16,
                       window_frames: int | None = None, blocks: int | None = None, top_k: int = 4,
                       rope_positions: str = "true", score: str = "mean", select: str = "per_head") -> CacheSpec:
  """A cache for streaming `cfg`'s VideoLM: sinks = the first frame's tokens; window = 2 x the training length
  (and at least one chunk); retrieval blocks of one frame (ReKV's frame blocks), a store of `blocks` frames
  (default max_frames), top_k blocks a chunk / question; full = room for max_frames + one question + answer.
  rope_positions / score / select: `layers.cache.CacheSpec` (a full cache ignores them: it never evicts)."""
  p = tokens_per_frame(cfg)
  tt = cfg.model.tubelet[0]
  train_frames = cfg.data.frames // tt
  chunk_frames = (chunk or cfg.data.frames) // tt
  win = (window_frames or max(2 * train_frames, chunk_frames)) * p
  if kind == "full":
    return CacheSpec("full", capacity=(max_frames // tt) * p + cfg.data.text_len + max_answer)
  if kind == "sink_window":
    return CacheSpec("sink_window", sink=p, window=win, rope_positions=rope_positions)
  if kind == "block_retrieval":
    return CacheSpec("block_retrieval", sink=p, window=win, block=p, blocks=blocks or max_frames // tt,
                     top_k=top_k, rope_positions=rope_positions, score=score, select=select)
  raise ConfigError(f"--cache {kind!r}: expected full | sink_window | block_retrieval")


class StreamingSession:
  """See the module docstring. `cfg` gives the frame size (data.height / width) and the question width
  (data.text_len: prompts are right-padded to it, so every question shares one compilation)."""

  def __init__(self, model: nnx.Module, cfg, *, cache_spec: CacheSpec | None = None, batch: int = 1,
               chunk: int | None = None, max_answer: int = 16, memory_capacity: int = 256, eviction: str = "fifo"):
    self.model, self.cfg, self.batch = model, cfg, int(batch)
    self.height, self.width = cfg.data.height, cfg.data.width
    self.prompt_width, self.max_answer = cfg.data.text_len, int(max_answer)
    self.memory_bridge = is_memory_bridge(model)
    self.eviction = eviction
    if self.memory_bridge:
      if eviction not in memory_stream.EVICTIONS:
        raise ConfigError(f"--eviction {eviction!r}: expected {' | '.join(memory_stream.EVICTIONS)}")
      self.granularity = memory_stream.granularity(model)
      self._state = memory_stream.init_state(model, self.batch, memory_capacity, frame_shape=(self.height, self.width))
      self.cache_spec = None
    else:
      if cache_spec is None:
        raise ConfigError("StreamingSession: a VideoLM streams into a KV cache; pass cache_spec=CacheSpec(...) "
                          "(or vidlm.infer.streaming.default_cache_spec)")
      if getattr(model, "token_drop_tau", 1.0) < 1.0:
        raise ConfigError("model.token_drop_tau < 1: token drop is not applied by streaming ingest yet; set it to 1.0")
      self.granularity = model.tubelet[0]
      self.cache_spec = cache_spec
      self._state = model.init_cache(self.batch, cache_spec, frame_shape=(self.height, self.width))
    self.chunk = int(chunk or cfg.data.frames)
    if self.chunk % self.granularity:
      raise ConfigError(f"stream chunk={self.chunk} frames: must be a multiple of {self.granularity} "
                        f"({'segment stride x ' if self.memory_bridge else ''}tubelet t)")
    if not self.memory_bridge and cache_spec.max_chunk is not None:
      tokens = (self.chunk // self.granularity) * tokens_per_frame(cfg)
      if tokens > cache_spec.max_chunk:
        raise ConfigError(f"stream chunk of {self.chunk} frames ({tokens} tokens) does not fit the {cache_spec.kind} "
                          f"cache's window of {cache_spec.max_chunk} tokens (cache.window); shorten the chunk")
    if not self.memory_bridge and cache_spec.max_chunk is not None and cache_spec.max_chunk < self.prompt_width:
      raise ConfigError(f"a question is appended as data.text_len={self.prompt_width} tokens, more than the "
                        f"{cache_spec.kind} cache's window of {cache_spec.max_chunk} (cache.window); raise the window")
    self._graphdef, self._params = nnx.split(model)
    # shared by every session of this model graph: a new session (another stream, a restore) reuses compilations
    self._ingest, self._traced = _ingest_step(self._graphdef, self.memory_bridge, eviction)
    self._read = _read_step(self._graphdef) if self.memory_bridge else None
    self._compiles = 0
    self.frames_ingested = 0
    self.ingest_seconds = 0.0
    self.steady_frames, self.steady_seconds = 0, 0.0  # ingest calls that did not compile
    self.last_ask: dict[str, float] = {}

  # ---- ingest -----------------------------------------------------------------------------------------------
  def expected_shape(self) -> str:
    lead = "" if self.batch == 1 else f"{self.batch}, "
    return (f"[{lead}F, {self.height}, {self.width}, 3] uint8 with F = {self.chunk} (or, for a video's last chunk, "
            f"a smaller multiple of {self.granularity})")

  def _check(self, frames) -> np.ndarray | jax.Array:
    shape = tuple(np.shape(frames))
    if len(shape) == 4 and self.batch == 1:
      frames = frames[None]
      shape = (1, *shape)
    ok = (len(shape) == 5 and shape[0] == self.batch and shape[2:] == (self.height, self.width, 3)
          and 0 < shape[1] <= self.chunk and shape[1] % self.granularity == 0)
    if not ok:
      got = list(shape[1:]) if self.batch == 1 and len(shape) == 5 and shape[0] == 1 else list(shape)
      raise ConfigError(f"stream chunk: expected frames {self.expected_shape()}, got {got}")
    return frames

  def ingest(self, frames) -> None:
    """Append a chunk of frames (see `expected_shape`); blocks until it is ingested (for honest frames/s)."""
    frames = self._check(frames)
    traced = len(self._traced)
    start = time.perf_counter()
    self._state = self._ingest(self._params, self._state, jnp.asarray(frames))
    jax.block_until_ready(self._state)
    seconds = time.perf_counter() - start
    n = int(np.shape(frames)[1])
    self.frames_ingested += n
    self.ingest_seconds += seconds
    if len(self._traced) == traced:  # not a compiling call: counts towards the steady-state rate
      self.steady_frames += n
      self.steady_seconds += seconds
    else:
      self._compiles += 1

  @property
  def compiles(self) -> int:
    """How many of this session's ingest calls compiled (once per new chunk shape / state spec)."""
    return self._compiles

  # ---- questions ----------------------------------------------------------------------------------------------
  def _prompt(self, questions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    rows = [tokenizer.prompt_ids(q) for q in questions]
    width = self.prompt_width
    if max(map(len, rows)) > width:
      raise ConfigError(f"question of {max(map(len, rows))} tokens (BOS + bytes + SEP) does not fit data.text_len="
                        f"{width}; shorten it or raise --config.data.text_len")
    prompt = np.full((len(rows), width), tokenizer.PAD, np.int32)
    for i, r in enumerate(rows):
      prompt[i, : len(r)] = r
    return prompt, np.asarray([len(r) for r in rows], np.int32)

  def ask(self, question: str | list[str], *, max_answer: int | None = None) -> str | list[str]:
    """Greedy answer(s) to a question about everything ingested so far (one question for every row, or one per
    row); the stream's state is unchanged. Timing in `last_ask` (seconds); `time_first_token` for latency."""
    questions = [question] * self.batch if isinstance(question, str) else list(question)
    if len(questions) != self.batch:
      raise ConfigError(f"ask: {len(questions)} questions for a session of batch {self.batch}")
    if self.frames_ingested == 0:
      raise ConfigError("ask: nothing ingested yet; ingest frames before asking")
    prompt, lengths = self._prompt(questions)
    n = self.max_answer if max_answer is None else int(max_answer)
    start = time.perf_counter()
    tokens = self._answer_memory(prompt, lengths, n) if self.memory_bridge else self._answer_kv(prompt, lengths, n)
    self.last_ask = {"seconds": time.perf_counter() - start, **self.last_ask}
    self.last_tokens = np.asarray(tokens)
    answers = [_text(row) for row in tokens]
    return answers[0] if isinstance(question, str) else answers

  def _answer_kv(self, prompt, lengths, n) -> np.ndarray:
    from vidlm.infer.generate import generate_cached  # noqa: PLC0415

    self.last_ask = {}
    gen, _ = generate_cached(self.model, self._state, jnp.asarray(prompt), n, prompt_lengths=lengths)
    return np.asarray(gen.tokens)

  def time_first_token(self, question: str) -> float:
    """Seconds from a question to its first answer token (the question appended to a copy of the state, one
    greedy token read back to the host); the stream is unchanged. Call once before timing to compile."""
    prompt, lengths = self._prompt([question] * self.batch)
    start = time.perf_counter()
    if self.memory_bridge:
      self._answer_memory(prompt, lengths, 1)
    else:
      from vidlm.infer.generate import generate_cached  # noqa: PLC0415

      gen, _ = generate_cached(self.model, self._state, jnp.asarray(prompt), 1, prompt_lengths=lengths)
      np.asarray(gen.tokens)
    return time.perf_counter() - start

  def _answer_memory(self, prompt, lengths, n) -> np.ndarray:
    """Greedy decoding with the teacher-forced decoder (`model.read`) on a fixed-width buffer: one compilation;
    the decoder is causal, so the padding after a row's end never changes the token read at its end."""
    b = prompt.shape[0]
    buf = np.full((b, self.prompt_width + n), tokenizer.PAD, np.int32)
    buf[:, : prompt.shape[1]] = prompt
    cur = lengths.copy()
    out = np.full((b, n), tokenizer.PAD, np.int32)
    done = np.zeros(b, bool)
    self.last_ask = {}
    start = time.perf_counter()
    rows = np.arange(b)
    for i in range(n):
      nxt = np.asarray(self._read(self._params, self._state, jnp.asarray(buf)))[rows, cur - 1]
      if i == 0:
        self.last_ask["first_token"] = time.perf_counter() - start
      nxt = np.where(done, tokenizer.PAD, nxt)
      out[:, i] = nxt
      buf[rows, cur] = nxt
      cur = cur + 1
      done |= nxt == tokenizer.EOS
      if done.all():
        break
    return out

  # ---- checkpointing and inspection ---------------------------------------------------------------------------
  def state(self) -> dict[str, Any]:
    """The stream as a pytree of host numpy arrays (plain dicts): the cache or memory state + the session's
    counters. Saveable with orbax (`ocp.PyTreeCheckpointer().save(path, session.state())`)."""
    arrays = {name: np.asarray(jax.device_get(getattr(self._state, name))) for name in self._array_fields()}
    return {"arrays": arrays, "frames_ingested": np.asarray(self.frames_ingested, np.int64),
            "ingest_seconds": np.asarray(self.ingest_seconds, np.float64)}

  def _array_fields(self) -> list[str]:
    """The state's array fields, less the empty ones (e.g. a sink_window cache's store): orbax refuses zero-size
    arrays, and an empty array carries nothing a restore needs."""
    return [f.name for f in dataclasses.fields(self._state)
            if isinstance(getattr(self._state, f.name), jax.Array) and getattr(self._state, f.name).size]

  def restore(self, state: dict[str, Any]) -> None:
    """Continue the stream `state()` captured (in this session or another built with the same arguments)."""
    arrays = state["arrays"]
    current = set(self._array_fields())
    if set(arrays) != current:
      raise ConfigError(f"restore: the saved stream has fields {sorted(arrays)}, this session {sorted(current)} "
                        "(a different model or cache kind)")
    for name in current:
      want, got = getattr(self._state, name).shape, tuple(np.shape(arrays[name]))
      if tuple(want) != got:
        raise ConfigError(f"restore: saved {name} has shape {list(got)}, this session's is {list(want)} "
                          "(build the session with the same cache spec / capacity / batch)")
    self._state = dataclasses.replace(self._state, **{k: jnp.asarray(v, getattr(self._state, k).dtype)
                                                      for k, v in arrays.items()})
    if isinstance(self._state, KVCache):
      self._state = self._state.sharded()
    self.frames_ingested = int(state["frames_ingested"])
    self.ingest_seconds = float(state["ingest_seconds"])

  @property
  def raw_state(self):
    """The device state itself (`KVCache` or `MemoryState`), e.g. to inspect what retrieval picked."""
    return self._state

  def stats(self) -> dict[str, Any]:
    """frames ingested, ingest seconds (compilation included) and frames/s (over the calls that did not compile:
    None until one has run), the state's bytes (fixed by construction), device memory in
    use and its peak (None where the backend keeps no memory stats, e.g. CPU), compilations of the ingest step."""
    state_bytes = sum(int(x.nbytes) for x in jax.tree.leaves(self._state))
    mem = _device_memory()
    return {
      "frames": self.frames_ingested, "ingest_seconds": self.ingest_seconds,
      "frames_per_s": self.steady_frames / self.steady_seconds if self.steady_seconds else None,
      "state_bytes": state_bytes, "device_bytes_in_use": mem.get("bytes_in_use"),
      "peak_device_bytes": mem.get("peak_bytes_in_use"), "compiles": self.compiles,
      "kind": "memory_bridge" if self.memory_bridge else self.cache_spec.kind,
    }


@functools.cache
def _ingest_step(graphdef, memory_bridge: bool, eviction: str):
  """(jitted ingest step, list of traced chunk shapes) for one model graph: state -> state after a chunk. The
  state is donated on accelerators, so a stream holds one copy of its cache."""
  traced: list[tuple] = []

  def step(params, state, frames):
    traced.append(tuple(frames.shape))
    model = nnx.merge(graphdef, params)
    if memory_bridge:
      return memory_stream.ingest(model, state, frames, eviction=eviction)
    return model.extend(frames, state)

  return jax.jit(step, donate_argnums=(1,) if jax.default_backend() != "cpu" else ()), traced


@functools.cache
def _read_step(graphdef):
  """Jitted greedy read of a memory-bridge state: tokens [B, W] -> argmax token after each position [B, W]."""

  def read(params, state, tokens):
    model = nnx.merge(graphdef, params)
    return jnp.argmax(memory_stream.read_logits(model, state, tokens), axis=-1).astype(jnp.int32)

  return jax.jit(read)


def _device_memory() -> dict[str, int]:
  try:
    stats = jax.local_devices()[0].memory_stats() or {}
  except Exception:  # noqa: BLE001  (backends without memory stats raise or return None)
    stats = {}
  return {k: int(v) for k, v in stats.items() if k in ("bytes_in_use", "peak_bytes_in_use")}


def _text(row) -> str:
  ids = []
  for t in np.asarray(row).tolist():
    if t == tokenizer.EOS:
      break
    ids.append(t)
  return tokenizer.decode(ids)
