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
# From github.com/google-deepmind/dm-haiku, examples/transformer/train.py at commit
# f4d858a5cbb29140855d68f81f5fd625e078a5ae (identical to the file dm-haiku 0.0.17 installs): the
# model hyperparameters and the forward pass, forward_pass. The dataset, optimiser, loss and
# training loop are not copied.
r"""Trains a transformer for language modeling on a small text dataset.

This example serves to demonstrate:
  - A clean Haiku transformer implementation.
  - An example minimal training loop around it.
"""

import types

import jax
import numpy as np

# changed: upstream imports examples.transformer.model; here the copy of that file next to this one.
from . import haiku_transformer_model as model
# changed: the upstream imports of absl, optax, jax.numpy and typing serve only the code that is not
# copied.

# changed: upstream imports examples.transformer.dataset (an ASCII text loader) for its two
# constants, VOCAB_SIZE = 128 and PAD_TOKEN = 0; they are restated here, the vocabulary reduced.
dataset = types.SimpleNamespace(VOCAB_SIZE=16, PAD_TOKEN=0)

# Model hyperparameters.
NUM_LAYERS = 1  # changed: size, upstream 6
NUM_HEADS = 2  # Number of attention heads.  # changed: size, upstream 8
MODEL_SIZE = 8  # changed: size, upstream 128
KEY_SIZE = 4  # changed: size, upstream 32
# changed: upstream 0.1. With rate 0 hk.dropout keeps every unit (it still draws its mask from
# hk.next_rng_key(), so apply needs an rng), and the output of an example does not depend on
# where it sits in the batch.
DROPOUT_RATE = 0.0


def forward_pass(tokens: np.ndarray | jax.Array) -> jax.Array:
  """Defines the forward pass of the language model."""
  lm = model.LanguageModel(
      model_size=MODEL_SIZE,
      vocab_size=dataset.VOCAB_SIZE,
      pad_token=dataset.PAD_TOKEN,
      transformer=model.Transformer(
          num_heads=NUM_HEADS,
          num_layers=NUM_LAYERS,
          attn_size=KEY_SIZE,
          dropout_rate=DROPOUT_RATE,
      ),
  )
  return lm(tokens)  # Logits, shape [B, T, V].
