"""rsicrc_jax: RSICRC (remote sensing image change retrieval and captioning) in JAX/Flax."""

__version__ = '0.1.0'
