"""`tfds build datasets/dubai_cc --manual_dir DIR`: Dubai-CC as a TFDS dataset.

DIR holds `description_jsontr_te_val/{Train,Validation,Test}_Dubai_CC.json` and the 50x50 Landsat
tiles `imgs_tiles/RGB/500_2000/*.tif` (before) and `imgs_tiles/RGB/500_2010/*.tif` (after), as
the dataset is distributed. Tokens are lowercased and stripped of punctuation; the captions are
kept as written; a pair is unchanged when all its captions are Dubai-CC's no-change sentences.
The implementation lives in `rsicrc_jax.data.builders`.
"""

from rsicrc_jax.data import builders


class Builder(builders.DubaiCCBuilder):
  """Dubai-CC Landsat change captioning pairs."""
