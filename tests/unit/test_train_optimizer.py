"""The optimizer the training builds from its config."""

from __future__ import annotations

import pytest

from petdet_tasks.train_config import TrainConfig


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_clipnorm_clips_the_global_norm_as_the_od_api_does(kind):
    """The OD API's gradient_clipping_by_norm (what pipeline.config imports as clipnorm)
    clips the norm of all the gradients together; Keras' clipnorm clips each variable's."""
    import keras

    from petdet_tasks.train import _optimizer

    opt = _optimizer(TrainConfig(optimizer=kind, clipnorm=1.0))
    assert opt.global_clipnorm == 1.0 and opt.clipnorm is None
    assert _optimizer(TrainConfig(optimizer=kind, clipnorm=None)).global_clipnorm is None
    # two gradients of norm 3 and 4: global norm 5, scaled to 1 together (3/5, 4/5)
    clipped = opt._clip_gradients([keras.ops.convert_to_tensor([3.0]),
                                   keras.ops.convert_to_tensor([4.0])])
    assert [float(g[0]) for g in clipped] == pytest.approx([0.6, 0.8])
