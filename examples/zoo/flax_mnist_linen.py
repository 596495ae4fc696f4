# Copyright 2024 The Flax Authors.
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
#
# From github.com/google/flax, examples/mnist/train.py at commit
# 772d99741458a843bb86c875ac3480bc1ac63656 (the last linen version of the file, before the example
# moved to NNX in 0ef9abb2e358ccb7bb963b81371771f052a05133): the model definition, class CNN.
# The training loop, metrics and dataset code of that file are not copied.

"""MNIST example.

Library file which executes the training and evaluation loop for MNIST.
The data is loaded using tensorflow_datasets.
"""

# See issue #620.
# pytype: disable=wrong-keyword-args

from flax import linen as nn
# changed: the upstream imports of absl.logging, flax.metrics.tensorboard, flax.training.train_state,
# jax, jax.numpy, ml_collections, numpy, optax and tensorflow_datasets serve only the training code,
# which is not copied.


class CNN(nn.Module):
  """A simple CNN model."""

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(features=4, kernel_size=(3, 3))(x)  # changed: size, upstream features=32
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = nn.Conv(features=8, kernel_size=(3, 3))(x)  # changed: size, upstream features=64
    x = nn.relu(x)
    x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))  # flatten
    x = nn.Dense(features=16)(x)  # changed: size, upstream features=256
    x = nn.relu(x)
    x = nn.Dense(features=3)(x)  # changed: size, upstream features=10 (the MNIST classes)
    return x
