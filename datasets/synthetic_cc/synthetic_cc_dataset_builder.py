"""`tfds build datasets/synthetic_cc [--config tiny]`: the embedded synthetic change-caption data.

Procedural, deterministic from the config's seed, no download. The implementation lives in
`rsicrc_jax.data.builders` (the demo launcher builds it on first use).
"""

from rsicrc_jax.data import builders


class Builder(builders.SyntheticCCBuilder):
  """Synthetic bi-temporal aerial scenes with grounded change captions."""
