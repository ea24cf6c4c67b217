"""`tfds build datasets/levir_cc --manual_dir DIR`: LEVIR-CC as a TFDS dataset.

DIR holds `LevirCCcaptions.json` and `images/{train,val,test}/{A,B}/*.png`. The implementation
lives in `rsicrc_jax.data.builders`, so the training code can use it without this folder.
"""

from rsicrc_jax.data import builders


class Builder(builders.LevirCCBuilder):
  """LEVIR-CC change captioning pairs."""
