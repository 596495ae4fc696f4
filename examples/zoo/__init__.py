"""Example zoo: model definitions copied from the official Flax and Haiku examples.

Each ``flax_*`` / ``haiku_*`` module is one upstream file (or the model part of it), with its
licence header and a line naming the repository, path and commit; the only edits are sizes and the
imports that the copied part does not need, each marked ``# changed:``. ``catalog`` builds every
model at a tiny size, with a batch of inputs and the keyword arguments of an adapter call.
"""
