# Copyright 2020 DeepMind Technologies Limited. All Rights Reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
# ==============================================================================
#
# From github.com/google-deepmind/dm-haiku, examples/imagenet/train.py at commit
# f4d858a5cbb29140855d68f81f5fd625e078a5ae (identical to the file dm-haiku 0.0.17 installs): the
# forward function, _forward, and its transformed pair, forward. The flags it reads are restated
# as constants; the optimizer, loss, mixed-precision and training loop are not copied.
"""ResNet50 on ImageNet2012."""

from collections.abc import Mapping
import types

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
# changed: the upstream imports of contextlib, functools, timeit, NamedTuple, absl (app, flags,
# logging), jmp, optax and tree serve only the code that is not copied.

# changed: upstream imports examples.imagenet.dataset (TensorFlow Datasets input pipeline) only for
# the type dataset.Batch, restated here as that module defines it.
dataset = types.SimpleNamespace(Batch=Mapping[str, np.ndarray])

# changed: upstream these are absl flags; the three that _forward reads are restated at their
# upstream defaults (flags.DEFINE_float('model_bn_decay', 0.9), flags.DEFINE_bool('model_resnet_v2',
# True), flags.DEFINE_bool('dataset_transpose', False)).
FLAGS = types.SimpleNamespace(model_bn_decay=0.9, model_resnet_v2=True, dataset_transpose=False)

# changed: sizes. Upstream builds hk.nets.ResNet50(1000, ...). Here it is ResNet-18, that is
# hk.nets.ResNet with hk.nets.ResNet.CONFIGS[18] (the configuration hk.nets.ResNet18 uses), with the
# widths reduced: hk.nets.ResNet18 has no width argument, so the channels per group (64, 128, 256,
# 512) and the initial convolution's 64 output channels are passed to hk.nets.ResNet directly.
NUM_CLASSES = 3
CHANNELS_PER_GROUP = (4, 8, 16, 32)
INITIAL_CHANNELS = 4


def _forward(
    batch: dataset.Batch,
    is_training: bool,
) -> jax.Array:
  """Forward application of the resnet."""
  images = batch['images']
  if FLAGS.dataset_transpose:
    # See note in dataset.py if you are curious about this.
    images = jnp.transpose(images, (3, 0, 1, 2))  # HWCN -> NHWC
  # changed: sizes, upstream hk.nets.ResNet50(1000, resnet_v2=..., bn_config=...); see above.
  net = hk.nets.ResNet(**{**hk.nets.ResNet.CONFIGS[18],
                          'channels_per_group': CHANNELS_PER_GROUP},
                       num_classes=NUM_CLASSES,
                       initial_conv_config={'output_channels': INITIAL_CHANNELS},
                       resnet_v2=FLAGS.model_resnet_v2,
                       bn_config={'decay_rate': FLAGS.model_bn_decay})
  return net(images, is_training=is_training)

# Transform our forwards function into a pair of pure functions.
forward = hk.transform_with_state(_forward)
