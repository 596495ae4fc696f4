"""The example zoo: models from the official Flax and Haiku examples, built at tiny sizes.

Each :class:`ZooEntry` names one model in one mode and builds, with :attr:`ZooEntry.make`, what an
adapter call needs::

    built = entry.make()
    built['module']        # linen Module | NNX Module | hk.Transformed(WithState)
    built['variables']     # linen: what module.init returned; NNX: None; Haiku: params
    built['x']             # a tiny batch: an array, a tuple of arrays, or a dict
    built['adapt_kwargs']  # keyword arguments of the adapter call

``adapt_kwargs`` holds the fixed call keyword arguments of the model (``train=False``,
``deterministic=True``, ``is_training=False``, ``z_rng=...``) next to the adapter's own options:
``method``, ``output``, ``rngs`` and ``mutable`` (linen), ``init`` (NNX), ``state``, ``rng`` and
``init_kwargs`` (Haiku), ``axis_name='batch'`` for linen BatchNorm in training mode, and ``inputs``:
``'args'`` where ``x`` is a tuple spread as positional arguments, ``'one'`` where ``x`` is a
single argument that is not an array (a dict).

Only the frameworks are used here; nothing in this module calls ``ntk_adapters``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import haiku as hk
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import (
    flax_imagenet_models,
    flax_lm1b_models,
    flax_mnist_linen,
    flax_nnx_functional_api,
    flax_nnx_mnist_tutorial,
    flax_sst2_models,
    flax_vae_models,
    haiku_imagenet_train,
    haiku_mnist,
    haiku_transformer_train,
)

FLAX = "github.com/google/flax"
FLAX_V0_12_7 = "tag v0.12.7, commit 9877bea7f892a54b02df9fc24727b56aee2d2717"
HAIKU = "github.com/google-deepmind/dm-haiku"
HAIKU_COMMIT = "commit f4d858a5cbb29140855d68f81f5fd625e078a5ae (as installed by dm-haiku 0.0.17)"

OK = "✓"


@dataclasses.dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo in one mode.

    Attributes:
      name: identifier, e.g. ``'flax_linen_mnist_cnn'``.
      framework: ``'flax.linen'``, ``'flax.nnx'`` or ``'haiku'``.
      source: upstream repository, path and commit of the model code.
      make: builds ``{'module', 'variables', 'x', 'adapt_kwargs'}`` at tiny size (see the module
        docstring).
      notes: what is particular about the model or the mode.
      output_shape: shape of the (selected) output for the batch ``x``, batch axis included.
      batch_independent: whether each example's output is what the model gives for that example
        alone, so that per-example (vmapped) evaluation agrees with the batch call. False for
        BatchNorm in training mode, and for a fixed random draw shaped by the batch (dropout mask,
        VAE noise), which changes with the batch size and the example's position.
      infinite_width: ``'✓'`` where an infinite-width kernel is expected, otherwise the first
        layer, in forward order, expected to be refused; the notes name later ones.
      infinite_kwargs: keyword arguments of ``infinite_kernel_fn`` the kernel needs (the limit
        attention layers take); without them the model is refused.
    """

    name: str
    framework: str
    source: str
    make: Callable[[], dict]
    notes: str = ""
    output_shape: tuple[int, ...] = ()
    batch_independent: bool = True
    infinite_width: str = OK
    infinite_kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)


def _key(i: int) -> jax.Array:
    """A key the model uses when it is called (dropout masks, VAE noise)."""
    return jax.random.PRNGKey(i)


def _init_key(i: int) -> jax.Array:
    """A key for initialization only, of the 'unsafe_rbg' implementation: it draws and splits with
    XLA's RngBitGenerator, which compiles several times faster on CPU than the default threefry
    hash. The draws have the same distributions; "unsafe" refers to weaker guarantees about the
    independence of split keys, which do not matter for a test model's initial weights."""
    return jax.random.key(i, impl="unsafe_rbg")


# Initialization runs once per entry: compile it without LLVM's optimizations, which take most of
# XLA's compile time on CPU and are not worth it for a program run once.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _init(init: Callable, key: jax.Array, *args: Any, **static: Any) -> Any:
    """``init(key, *args, **static)`` as one compiled program (one compilation instead of one per
    operation); ``static`` holds Python values such as ``is_training=True``."""
    lowered = jax.jit(lambda key, *args: init(key, *args, **static)).lower(key, *args)
    return lowered.compile(_FAST_COMPILE)(key, *args)


def _images(n: int, size: int, channels: int, seed: int = 1) -> jax.Array:
    # Inputs come from NumPy: no random-number program to compile.
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((n, size, size, channels)), jnp.float32)


def _tokens(n: int, length: int, vocab: int, lengths, seed: int = 2) -> jax.Array:
    """Integer tokens in ``[1, vocab)``, padded with 0 after each example's length."""
    tokens = np.random.default_rng(seed).integers(1, vocab, (n, length))
    tokens[np.arange(length)[None, :] >= np.asarray(lengths)[:, None]] = 0
    return jnp.asarray(tokens, jnp.int32)


# ---------------------------------------------------------------------------------------------
# flax.linen


def _make_linen_mnist_cnn() -> dict:
    module = flax_mnist_linen.CNN()
    x = _images(4, 8, 1)
    variables = _init(module.init, _init_key(0), x)
    return {"module": module, "variables": variables, "x": x, "adapt_kwargs": {}}


RESNET_NUM_CLASSES = 3
RESNET_NUM_FILTERS = 4


def _linen_resnet18():
    return flax_imagenet_models.ResNet18(num_classes=RESNET_NUM_CLASSES, num_filters=RESNET_NUM_FILTERS)


@functools.cache
def _linen_resnet18_variables() -> Any:
    """The variables of both ResNet-18 entries (one initialization; arrays are immutable)."""
    module = _linen_resnet18()
    # As the example's `initialized`: init in its default training mode (BatchNorm skips the
    # cross-device mean while initializing), which creates 'params' and 'batch_stats'.
    return _init(lambda key, x: module.init({"params": key}, x), _init_key(0), _images(4, 16, 3))


def _make_linen_resnet18(train: bool) -> dict:
    module = _linen_resnet18()
    x = _images(4, 16, 3)
    variables = jax.tree.map(lambda a: a, _linen_resnet18_variables())  # fresh dicts, same arrays
    if train:
        adapt_kwargs = {"train": True, "mutable": ["batch_stats"], "axis_name": "batch"}
    else:
        adapt_kwargs = {"train": False}
    return {"module": module, "variables": variables, "x": x, "adapt_kwargs": adapt_kwargs}


LM1B_CONFIG = {
    "vocab_size": 16,
    "output_vocab_size": 16,
    "emb_dim": 8,
    "num_heads": 2,
    "num_layers": 1,
    "qkv_dim": 8,
    "mlp_dim": 16,
    "max_len": 8,
    "dropout_rate": 0.0,
    "attention_dropout_rate": 0.0,
    "deterministic": True,
}
LM1B_LENGTHS = (8, 6, 3)


def _make_linen_lm1b() -> dict:
    config = flax_lm1b_models.TransformerConfig(**LM1B_CONFIG)
    module = flax_lm1b_models.TransformerLM(config)
    x = _tokens(3, LM1B_CONFIG["max_len"], LM1B_CONFIG["vocab_size"], LM1B_LENGTHS)
    variables = _init(module.init, _init_key(0), x)
    return {"module": module, "variables": variables, "x": x, "adapt_kwargs": {}}


SST2_SIZES = {"embedding_size": 4, "hidden_size": 4, "vocab_size": 16, "output_size": 1}
# The example's dropout rates (configs/default.py); inactive with deterministic=True.
SST2_RATES = {"dropout_rate": 0.5, "word_dropout_rate": 0.1}
SST2_LENGTHS = (6, 4, 2, 5)


def _make_linen_sst2() -> dict:
    module = flax_sst2_models.TextClassifier(**SST2_SIZES, **SST2_RATES)
    lengths = jnp.asarray(SST2_LENGTHS, jnp.int32)
    tokens = _tokens(4, 6, SST2_SIZES["vocab_size"], lengths)
    # As the example's train.py: model.init(rng, token_ids, lengths, deterministic=True).
    variables = _init(module.init, _init_key(0), tokens, lengths, deterministic=True)
    return {
        "module": module,
        "variables": variables,
        "x": (tokens, lengths),
        "adapt_kwargs": {"inputs": "args", "deterministic": True},
    }


VAE_LATENTS = 2
VAE_PIXELS = 16  # the Decoder's output size in flax_vae_models


def _vae_encode(vae, x):
    """Runs the VAE's encoder alone (a ``method`` for ``VAE.apply``): ``(mean, logvar)``."""
    return vae.encoder(x)


def _make_linen_vae(part: str) -> dict:
    module = flax_vae_models.model(VAE_LATENTS)
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(4, VAE_PIXELS)), jnp.float32)
    z_rng = _key(3)
    # As the example's train.py: model(latents).init(key, init_data, rng).
    variables = _init(module.init, _init_key(0), x, _key(4))
    if part == "reconstruction":
        adapt_kwargs = {"z_rng": z_rng, "output": 0}
    else:
        adapt_kwargs = {"method": _vae_encode, "output": 0}
    return {"module": module, "variables": variables, "x": x, "adapt_kwargs": adapt_kwargs}


# ---------------------------------------------------------------------------------------------
# flax.nnx


def _nnx_cnn_view(train: bool) -> Callable[[nnx.Rngs], nnx.Module]:
    # The tutorial's train_model / eval_model: nnx.view(model, deterministic=..., use_running_average=...).
    def build(rngs: nnx.Rngs) -> nnx.Module:
        model = flax_nnx_mnist_tutorial.CNN(rngs=rngs)
        return nnx.view(model, deterministic=not train, use_running_average=not train)

    return build


def _nnx_build(init: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """``init(nnx.Rngs(key))`` as one compiled program (as _init does for linen and Haiku)."""
    return nnx.jit(init)(nnx.Rngs(_init_key(0)))


def _make_nnx_cnn(train: bool) -> dict:
    init = _nnx_cnn_view(train)
    module = _nnx_build(init)
    adapt_kwargs: dict[str, Any] = {"init": init}
    if train:
        # nnx.Dropout takes a key, an RngStream or an Rngs; a fixed key gives one fixed mask.
        adapt_kwargs["rngs"] = _key(5)
    return {"module": module, "variables": None, "x": _images(4, 8, 1), "adapt_kwargs": adapt_kwargs}


COUNT_MLP_SIZES = {"din": 1, "dhidden": 8, "dout": 1}


def _make_nnx_count_mlp() -> dict:
    def init(rngs: nnx.Rngs) -> nnx.Module:
        return flax_nnx_functional_api.MLP(**COUNT_MLP_SIZES, rngs=rngs)

    x = jnp.asarray(np.linspace(-np.pi, np.pi, 4)[:, None], jnp.float32)  # as the script's X, (N, 1)
    return {"module": _nnx_build(init), "variables": None, "x": x, "adapt_kwargs": {"init": init}}


# ---------------------------------------------------------------------------------------------
# haiku


def _make_haiku_mnist() -> dict:
    # As the example's main(): hk.without_apply_rng(hk.transform(net_fn)).
    network = hk.without_apply_rng(hk.transform(haiku_mnist.net_fn))
    # Pixel intensities in [0, 255], which net_fn scales by 1/255.
    x = jnp.asarray(np.random.default_rng(1).integers(0, 256, (4, 8, 8, 1)), jnp.float32)
    params = _init(network.init, _init_key(0), x)
    return {"module": network, "variables": params, "x": x, "adapt_kwargs": {}}


@functools.cache
def _haiku_resnet18_init() -> tuple[Any, Any]:
    """``(params, state)`` of both Haiku ResNet-18 entries (one initialization)."""
    # As the example: forward.init(rng, batch, is_training=True).
    x = {"images": _images(4, 16, 3)}
    return _init(haiku_imagenet_train.forward.init, _init_key(0), x, is_training=True)


def _make_haiku_resnet18(train: bool) -> dict:
    forward = haiku_imagenet_train.forward
    x = {"images": _images(4, 16, 3)}
    params, state = jax.tree.map(lambda a: a, _haiku_resnet18_init())  # fresh dicts, same arrays
    adapt_kwargs: dict[str, Any] = {"inputs": "one", "state": state, "is_training": train}
    if not train:
        adapt_kwargs["init_kwargs"] = {"is_training": True}
    return {"module": forward, "variables": params, "x": x, "adapt_kwargs": adapt_kwargs}


HAIKU_LM_LENGTH = 8
HAIKU_LM_LENGTHS = (8, 5, 2)


def _make_haiku_transformer() -> dict:
    network = hk.transform(haiku_transformer_train.forward_pass)
    vocab = haiku_transformer_train.dataset.VOCAB_SIZE
    x = _tokens(3, HAIKU_LM_LENGTH, vocab, HAIKU_LM_LENGTHS)
    params = _init(network.init, _init_key(0), x)
    return {"module": network, "variables": params, "x": x, "adapt_kwargs": {"rng": _key(6)}}


# ---------------------------------------------------------------------------------------------

ENTRIES: tuple[ZooEntry, ...] = (
    ZooEntry(
        name="flax_linen_mnist_cnn",
        framework="flax.linen",
        source=f"{FLAX} examples/mnist/train.py (class CNN), commit 772d99741458a843bb86c875ac3480bc1ac63656 "
        "(the last linen version)",
        make=_make_linen_mnist_cnn,
        notes="Conv-ReLU-avg_pool twice, flatten, Dense-ReLU-Dense. x: (4, 8, 8, 1) images.",
        output_shape=(4, 3),
    ),
    ZooEntry(
        name="flax_linen_resnet18_train",
        framework="flax.linen",
        source=f"{FLAX} examples/imagenet/models.py (ResNet18 = ResNet + ResNetBlock), {FLAX_V0_12_7}",
        make=lambda: _make_linen_resnet18(train=True),
        notes="BatchNorm(axis_name='batch') with batch statistics: needs mutable=['batch_stats'] and a "
        "named 'batch' axis over the examples. Max-pool stem. Each block's last BatchNorm has "
        "scale_init=zeros. x: (4, 16, 16, 3).",
        output_shape=(4, RESNET_NUM_CLASSES),
        batch_independent=False,
        infinite_width="BatchNorm in training mode",
    ),
    ZooEntry(
        name="flax_linen_resnet18_eval",
        framework="flax.linen",
        source=f"{FLAX} examples/imagenet/models.py (ResNet18 = ResNet + ResNetBlock), {FLAX_V0_12_7}",
        make=lambda: _make_linen_resnet18(train=False),
        notes="train=False: BatchNorm uses the running averages (a per-channel affine map). The stem "
        "max-pools after conv_init and bn_init. x: (4, 16, 16, 3).",
        output_shape=(4, RESNET_NUM_CLASSES),
        infinite_width="max pooling",
    ),
    ZooEntry(
        name="flax_linen_lm1b_transformer",
        framework="flax.linen",
        source=f"{FLAX} examples/lm1b/models.py (TransformerConfig, TransformerLM, Decoder), {FLAX_V0_12_7}",
        make=_make_linen_lm1b,
        notes="Decoder-only LM; every param is an nn.Partitioned box (nn.with_logical_partitioning). "
        "Tokens are shifted right; 0 is padding and masked in the causal self-attention. "
        "Infinite width: the nn.Embed lookup of the integer tokens, the fixed sinusoidal position "
        "encodings added next (channels with different means: the kernel carries second moments and "
        "the channel means that the LayerNorms subtract), the residual sums, LayerNorm and the ReLU "
        "MLP have exact rules; nn.MultiHeadDotProductAttention (standard 1/sqrt(head_dim) scaling) has "
        "no Gaussian limit at a fixed number of heads and is refused by default; with "
        "attention='infinite_heads' the heads go to infinity at head_dim and the kernel is estimated by "
        "sampling. x: (3, 8) int32 tokens in [0, 16).",
        output_shape=(3, LM1B_CONFIG["max_len"], LM1B_CONFIG["output_vocab_size"]),
        infinite_kwargs={"attention": "infinite_heads", "attention_samples": 256},
    ),
    ZooEntry(
        name="flax_linen_sst2_lstm",
        framework="flax.linen",
        source=f"{FLAX} examples/sst2/models.py (TextClassifier), {FLAX_V0_12_7}",
        make=_make_linen_sst2,
        notes="Called as model(token_ids, lengths, deterministic=True): x = (tokens (4, 6) int32, "
        "lengths (4,) int32). Embedding, bidirectional LSTM (nn.scan over OptimizedLSTMCell), "
        "keys-only MLP attention with a softmax over valid positions, MLP head. Infinite width: "
        "the lookup of the integer tokens in the custom Embedder (a parameter table, not "
        "nn.Embed) comes first, then the LSTM and the attention softmax.",
        output_shape=(4, SST2_SIZES["output_size"]),
        infinite_width="custom embedding lookup",
    ),
    ZooEntry(
        name="flax_linen_vae_reconstruction",
        framework="flax.linen",
        source=f"{FLAX} examples/vae/models.py (VAE, Encoder, Decoder), {FLAX_V0_12_7}",
        make=lambda: _make_linen_vae("reconstruction"),
        notes="VAE.__call__(x, z_rng) returns (recon_x, mean, logvar); output=0 picks recon_x and z_rng "
        "is a fixed call keyword. The noise eps = normal(z_rng, (N, latents)) depends on the batch "
        "size and each example's row, so examples are not independent. Infinite width: "
        "mean + eps * exp(0.5 * logvar) multiplies a Gaussian-process value by a fixed "
        "non-scalar array and exponentiates another. x: (4, 16) pixels in [0, 1).",
        output_shape=(4, VAE_PIXELS),
        batch_independent=False,
        infinite_width="reparameterization",
    ),
    ZooEntry(
        name="flax_linen_vae_encoder_mean",
        framework="flax.linen",
        source=f"{FLAX} examples/vae/models.py (VAE, Encoder), {FLAX_V0_12_7}",
        make=lambda: _make_linen_vae("encoder_mean"),
        notes="method=a function calling vae.encoder(x) -> (mean, logvar); output=0 picks the fc2_mean "
        "head (Dense-ReLU-Dense). x: (4, 16).",
        output_shape=(4, VAE_LATENTS),
    ),
    ZooEntry(
        name="flax_nnx_mnist_cnn_train",
        framework="flax.nnx",
        source=f"{FLAX} docs_nnx/mnist_tutorial.md (class CNN; same model as examples/mnist/train.py), {FLAX_V0_12_7}",
        make=lambda: _make_nnx_cnn(train=True),
        notes="The tutorial's train view: nnx.view(model, deterministic=False, use_running_average=False). "
        "Dropout(0.025) after conv1 and linear1 draws from the fixed key passed as rngs=; "
        "BatchNorm normalizes with batch statistics (and updates its BatchStat variables). "
        "x: (4, 8, 8, 1).",
        output_shape=(4, 3),
        batch_independent=False,
        infinite_width="BatchNorm in training mode",
    ),
    ZooEntry(
        name="flax_nnx_mnist_cnn_eval",
        framework="flax.nnx",
        source=f"{FLAX} docs_nnx/mnist_tutorial.md (class CNN; same model as examples/mnist/train.py), {FLAX_V0_12_7}",
        make=lambda: _make_nnx_cnn(train=False),
        notes="The tutorial's eval view: nnx.view(model, deterministic=True, use_running_average=True); "
        "no rngs needed. Conv, BatchNorm (running averages), ReLU, avg_pool, Linear. x: (4, 8, 8, 1).",
        output_shape=(4, 3),
    ),
    ZooEntry(
        name="flax_nnx_count_mlp",
        framework="flax.nnx",
        source=f"{FLAX} examples/nnx_toy_examples/01_functional_api.py (MLP, Linear, Count), {FLAX_V0_12_7}",
        make=_make_nnx_count_mlp,
        notes="A custom Count(nnx.Variable) incremented in __call__ (non-Param state that changes on "
        "every call) and a hand-written Linear (x @ w + b) whose weights are jax.random.uniform "
        "in [0, 1), not zero-mean. x: (4, 1).",
        output_shape=(4, COUNT_MLP_SIZES["dout"]),
        infinite_width="custom Linear (jax.random.uniform weights)",
    ),
    ZooEntry(
        name="haiku_mnist_mlp",
        framework="haiku",
        source=f"{HAIKU} examples/mnist.py (net_fn), {HAIKU_COMMIT}",
        make=_make_haiku_mnist,
        notes="hk.without_apply_rng(hk.transform(net_fn)): x / 255, hk.Flatten, Linear-ReLU-Linear-ReLU-"
        "Linear. x: (4, 8, 8, 1) pixel values in [0, 255].",
        output_shape=(4, haiku_mnist.NUM_CLASSES),
    ),
    ZooEntry(
        name="haiku_resnet18_train",
        framework="haiku",
        source=f"{HAIKU} examples/imagenet/train.py (_forward, forward) with hk.nets.ResNet "
        f"CONFIGS[18], {HAIKU_COMMIT}",
        make=lambda: _make_haiku_resnet18(train=True),
        notes="hk.transform_with_state; _forward(batch, is_training) reads batch['images'], so x is the "
        "dict {'images': (4, 16, 16, 3)} passed as one argument. resnet_v2=True (the example's "
        "default flag): the stem max-pools right after the initial convolution, before any "
        "BatchNorm; hk.BatchNorm in training mode uses the batch statistics. The logits layer "
        "is zero-initialized (hk.nets.ResNet's default), so the outputs at init are 0.",
        output_shape=(4, haiku_imagenet_train.NUM_CLASSES),
        batch_independent=False,
        infinite_width="max pooling",
    ),
    ZooEntry(
        name="haiku_resnet18_eval",
        framework="haiku",
        source=f"{HAIKU} examples/imagenet/train.py (_forward, forward) with hk.nets.ResNet "
        f"CONFIGS[18], {HAIKU_COMMIT}",
        make=lambda: _make_haiku_resnet18(train=False),
        notes="As haiku_resnet18_train with is_training=False: BatchNorm uses the moving averages in "
        "the state from forward.init(..., is_training=True) (init_kwargs). The logits layer is "
        "zero-initialized, so the outputs at init are 0. x: {'images': (4, 16, 16, 3)}.",
        output_shape=(4, haiku_imagenet_train.NUM_CLASSES),
        infinite_width="max pooling",
    ),
    ZooEntry(
        name="haiku_transformer_lm",
        framework="haiku",
        source=f"{HAIKU} examples/transformer/model.py (LanguageModel, Transformer) and "
        f"examples/transformer/train.py (forward_pass), {HAIKU_COMMIT}",
        make=_make_haiku_transformer,
        notes="hk.transform(forward_pass): hk.dropout draws from hk.next_rng_key(), so apply needs an "
        "rng even at dropout rate 0. Token 0 is padding (masked in the causal attention). "
        "Learned positional embeddings of shape (T, D). Infinite width: the hk.Embed lookup, the "
        "learned positional embeddings (their initializer recorded by the adapter), LayerNorm, the "
        "GELU MLP and the residual sums have exact rules; hk.MultiHeadAttention (standard "
        "1/sqrt(key_size) scaling) has no Gaussian limit at a fixed number of heads and is refused by "
        "default; with attention='infinite_heads' the heads go to infinity at key_size and the kernel "
        "is estimated by sampling. x: (3, 8) int32 tokens in [0, 16).",
        output_shape=(3, HAIKU_LM_LENGTH, haiku_transformer_train.dataset.VOCAB_SIZE),
        infinite_kwargs={"attention": "infinite_heads", "attention_samples": 256},
    ),
)

ENTRY_BY_NAME: dict[str, ZooEntry] = {entry.name: entry for entry in ENTRIES}

# name -> expected capabilities, the same as the entries' fields.
EXPECTED: dict[str, dict[str, Any]] = {
    entry.name: {"batch_independent": entry.batch_independent, "infinite_width": entry.infinite_width}
    for entry in ENTRIES
}


def get(name: str) -> ZooEntry:
    """The entry called ``name``."""
    try:
        return ENTRY_BY_NAME[name]
    except KeyError:
        raise KeyError(f"no zoo entry {name!r}; the entries are {sorted(ENTRY_BY_NAME)}") from None
