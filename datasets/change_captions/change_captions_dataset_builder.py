"""`tfds build datasets/change_captions --manual_dir DIR`: your own change-captioned pairs.

DIR holds captions.json (the LEVIR-CC schema; pictures at images/<filepath>/{A,B}/<filename>) or
captions.csv (before,after,split,caption rows; paths relative to DIR). Pictures of another size
than 256x256: --config '{"name": "s224", "stored_size": 224}' resizes them all. The
implementation lives in `rsicrc_jax.data.builders`.
"""

from rsicrc_jax.data import builders


class Builder(builders.ChangeCaptionsBuilder):
  """A user's own bi-temporal pairs with change captions."""
