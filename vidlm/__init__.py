"""vidlm: long-context video transformers in JAX/Flax NNX.

Entry points: `vidlm.config` (typed configs), `vidlm.models.build_model`, `vidlm.train.loop.Trainer`,
`vidlm.eval.run_evaluators`, and the `vidlm` command line (`vidlm.cli`). Submodules are imported on use so that
`import vidlm.config` stays cheap.
"""

__version__ = "0.1.0"
