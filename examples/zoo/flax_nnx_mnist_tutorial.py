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
# From github.com/google/flax, docs_nnx/mnist_tutorial.md ("3. Define the model with Flax NNX") at
# tag v0.12.7 (commit 9877bea7f892a54b02df9fc24727b56aee2d2717). The page has no licence header of
# its own; the header above is the one the repository's source files carry, under the repository's
# Apache-2.0 LICENSE. The same CNN, with a required `rngs` call argument, is the model of
# examples/mnist/train.py at that tag. Only the code cell defining the model is copied, unchanged
# except the layer sizes (marked "changed:").

from flax import nnx  # The Flax NNX API.
from functools import partial
from typing import Optional

class CNN(nnx.Module):
  """A simple CNN model."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 4, kernel_size=(3, 3), rngs=rngs)  # changed: size, upstream 1 -> 32 channels
    self.batch_norm1 = nnx.BatchNorm(4, rngs=rngs)  # changed: size, upstream 32
    self.dropout1 = nnx.Dropout(rate=0.025)
    self.conv2 = nnx.Conv(4, 8, kernel_size=(3, 3), rngs=rngs)  # changed: size, upstream 32 -> 64 channels
    self.batch_norm2 = nnx.BatchNorm(8, rngs=rngs)  # changed: size, upstream 64
    self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
    # changed: size, upstream nnx.Linear(3136, 256): 3136 = 7 * 7 * 64 for 28x28 images; here
    # 32 = 2 * 2 * 8 for 8x8 images.
    self.linear1 = nnx.Linear(32, 16, rngs=rngs)
    self.dropout2 = nnx.Dropout(rate=0.025)
    self.linear2 = nnx.Linear(16, 3, rngs=rngs)  # changed: size, upstream nnx.Linear(256, 10)

  def __call__(self, x, rngs: nnx.Rngs | None = None):
    x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x), rngs=rngs))))
    x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
    x = x.reshape(x.shape[0], -1)  # flatten
    x = nnx.relu(self.dropout2(self.linear1(x), rngs=rngs))
    x = self.linear2(x)
    return x
