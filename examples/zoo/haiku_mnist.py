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
# From github.com/google-deepmind/dm-haiku, examples/mnist.py at commit
# f4d858a5cbb29140855d68f81f5fd625e078a5ae (identical to the file dm-haiku 0.0.17 installs): the
# network, net_fn, and its NUM_CLASSES constant. The dataset, loss and training loop are not copied.
"""A minimal MNIST classifier example."""

import haiku as hk
import jax
import jax.numpy as jnp
# changed: the upstream imports of absl.app, numpy, optax and tensorflow_datasets (and of
# Iterator/NamedTuple) serve only the dataset and training code, which is not copied.

NUM_CLASSES = 3  # changed: size, upstream 10 (MNIST has 10 classes (hand-written digits)).


def net_fn(images: jax.Array) -> jax.Array:
  """Standard LeNet-300-100 MLP network."""
  x = images.astype(jnp.float32) / 255.
  mlp = hk.Sequential([
      hk.Flatten(),
      hk.Linear(8), jax.nn.relu,  # changed: size, upstream hk.Linear(300)
      hk.Linear(8), jax.nn.relu,  # changed: size, upstream hk.Linear(100)
      hk.Linear(NUM_CLASSES),
  ])
  return mlp(x)
