"""Haiku quickstart: a wide Haiku MLP trained with optax SGD momentum vs the NTK prediction.

python examples/haiku_quickstart.py       # prints the table, writes out/haiku_quickstart.png
"""

import haiku as hk
import jax
import numpy as np

import ntk_adapters.haiku
from ntk_adapters.dynamics import compare_training

rng = np.random.default_rng(0)
x_train, x_test = rng.normal(size=(32, 3)), rng.normal(size=(64, 3))
target = lambda x: np.stack([np.sin(2 * x[:, 0]), x[:, 1] * x[:, 2]], axis=1)  # (N, 2)

net = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([1024, 1024, 2])(x)))
model = ntk_adapters.haiku.adapt(net, None, x_train, key=jax.random.PRNGKey(0))

result = compare_training(
    model,
    x_train,
    target(x_train),
    x_test,
    target(x_test),
    learning_rate=0.01,
    momentum=0.9,
    steps=300,
    eval_every=10,
    vmap_axes=0,
)
print(result.table(max_rows=7))
result.plot("out/haiku_quickstart.png")
