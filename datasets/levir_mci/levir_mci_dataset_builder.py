"""`tfds build datasets/levir_mci --manual_dir DIR`: LEVIR-MCI as a TFDS dataset.

DIR holds `LevirCCcaptions.json` and `images/{train,val,test}/{A,B,label}/*.png`; the grey label
pictures (128 road, 255 building) are kept as the `change_mask` feature (1 road, 2 building).
The implementation lives in `rsicrc_jax.data.builders`.
"""

from rsicrc_jax.data import builders


class Builder(builders.LevirMCIBuilder):
  """LEVIR-MCI change captioning pairs with road and building change masks."""
