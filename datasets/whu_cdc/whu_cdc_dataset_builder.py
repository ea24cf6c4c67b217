"""`tfds build datasets/whu_cdc --manual_dir DIR`: WHU-CDC as a TFDS dataset.

DIR holds `whuCCcaptions.json` and `images/{train,val,test}/{A,B,label}/*.png`; the binary label
pictures (255 changed) are kept as the `change_mask` feature (1 changed). The implementation
lives in `rsicrc_jax.data.builders`.
"""

from rsicrc_jax.data import builders


class Builder(builders.WhuCDCBuilder):
  """WHU-CDC building change captioning pairs with change masks."""
