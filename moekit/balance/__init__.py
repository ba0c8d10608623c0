"""Load balancing: auxiliary losses and the aux-loss-free bias rule."""

from .losses import (
    cv_squared,
    cv_squared_loss,
    entropy,
    importance,
    normalized_scores,
    pooled_mixtral_aux_loss,
    sequence_aux_loss,
    smooth_load,
    switch_aux_loss,
    z_loss,
)

__all__ = ["switch_aux_loss", "pooled_mixtral_aux_loss", "z_loss", "cv_squared", "cv_squared_loss",
           "importance", "smooth_load", "sequence_aux_loss", "entropy", "normalized_scores"]
