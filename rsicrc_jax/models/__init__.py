"""RSICRC model modules: backbone, bi-temporal encoder, caption decoder, full model."""

from rsicrc_jax.models.rsicrc import (RSICRC, RSICRCOutput, count_params, is_trainable,
                                      model_skeleton, trainable_filter)

__all__ = ['RSICRC', 'RSICRCOutput', 'count_params', 'is_trainable', 'model_skeleton',
           'trainable_filter']
