"""Data layer: procedural needle-in-a-video-haystack examples, ArrayRecord shards, the grain pipeline, a TFDS
builder and real-video ingest. See DESIGN.md section 7."""
