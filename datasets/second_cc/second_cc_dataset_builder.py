"""`tfds build datasets/second_cc --manual_dir DIR`: SECOND-CC as a TFDS dataset.

DIR holds `SECOND-CC-AUG.json` and `{train,val,test}/rgb/{A,B}/*.png` with the colour-coded
semantic maps `{train,val,test}/sem/{A,B}/*.png`, as the dataset's zip unpacks; the maps are kept
as the `semantic_a` / `semantic_b` features (land-cover class ids of the changed pixels). The
implementation lives in `rsicrc_jax.data.builders`.
"""

from rsicrc_jax.data import builders


class Builder(builders.SecondCCBuilder):
  """SECOND-CC semantic change captioning pairs with land-cover maps."""
