"""Resumable tiled kernels in a memory map (``batch(..., memmap_path=...)``).

A run is killed for real (SIGKILL of a subprocess, once its tile record shows some tiles done);
the same call in this process must compute only the missing tiles and give, bit for bit, the
kernel of an uninterrupted run. Calls that differ from the recorded one must refuse.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from ntk_adapters import batch

# The kernel lives in a module of its own, imported under the same name by the killed child and
# by this process: the record's fingerprint includes the kernel function's qualified name.
_KERNEL_MODULE = textwrap.dedent(
    """
    import time
    import jax
    import jax.numpy as jnp

    CALLS = []
    DELAY = 0.0

    def _tick():
        CALLS.append(1)
        time.sleep(DELAY)

    def slow_kernel(x1, x2=None):
        jax.debug.callback(_tick)
        x2 = x1 if x2 is None else x2
        return jnp.tanh(x1 @ x2.T + 0.5) * jnp.exp(-0.1 * jnp.sum((x1[:, None] - x2[None]) ** 2, -1))
    """
)

_CHILD = textwrap.dedent(
    """
    import sys
    import jax
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    sys.path.insert(0, {tmp!r})
    import resume_kernels
    from ntk_adapters import batch

    resume_kernels.DELAY = 0.4
    x1 = np.load({tmp!r} + "/x1.npy")
    x2 = None if {same} else np.load({tmp!r} + "/x2.npy")
    batch(resume_kernels.slow_kernel, 4, memmap_path={path!r}, devices=jax.local_devices()[:1])(x1, x2)
    print("FINISHED")
    """
)


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    (tmp_path / "resume_kernels.py").write_text(_KERNEL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("resume_kernels", None)
    import resume_kernels

    yield resume_kernels
    sys.modules.pop("resume_kernels", None)


def _done_tiles(record_path: str, grid: tuple[int, int]) -> int:
    with open(record_path) as f:
        rec = json.load(f)
    bits = np.unpackbits(np.frombuffer(base64.b64decode(rec["done"]), np.uint8))
    return int(bits[: grid[0] * grid[1]].sum())


def _run_and_kill(tmp_path, path, same, grid, kill_after):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    script = tmp_path / "child.py"
    script.write_text(_CHILD.format(tmp=str(tmp_path), same=same, path=str(path)))
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    record = f"{path}.tiles.json"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if _done_tiles(record, grid) >= kill_after:
                    break
            except (OSError, ValueError, KeyError):
                pass  # not written yet
            time.sleep(0.05)
        assert proc.poll() is None, (
            "the child finished (or failed) before it could be killed: " + proc.stderr.read().decode()[-3000:]
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    return _done_tiles(record, grid)


@pytest.mark.parametrize("same", [True, False], ids=["x2=None", "x2"])
def test_killed_run_resumes_bit_for_bit_computing_only_missing_tiles(tmp_path, kernels, same):
    x1 = np.random.default_rng(0).normal(size=(23, 3))
    x2 = None if same else np.random.default_rng(1).normal(size=(10, 3))
    np.save(tmp_path / "x1.npy", x1)
    if not same:
        np.save(tmp_path / "x2.npy", x2)
    # 23 rows in tiles of 4: 6 row tiles. Symmetric: 6 diagonal + 15 upper tiles; otherwise 6 × 3.
    grid = (6, 6) if same else (6, 3)
    n_tiles = 21 if same else 18
    one = jax.local_devices()[:1]

    reference = np.array(batch(kernels.slow_kernel, 4, memmap_path=tmp_path / "ref.npy", devices=one)(x1, x2))
    np.testing.assert_allclose(reference, np.asarray(kernels.slow_kernel(x1, x2)), rtol=1e-12, atol=1e-12)

    path = tmp_path / "k.npy"
    done_before = _run_and_kill(tmp_path, path, same, grid, kill_after=4)
    assert 4 <= done_before < n_tiles

    kernels.CALLS.clear()
    resumed = batch(kernels.slow_kernel, 4, memmap_path=path, devices=one)(x1, x2)
    assert len(kernels.CALLS) == n_tiles - done_before
    assert isinstance(resumed, np.memmap)
    assert np.array_equal(np.asarray(resumed), reference)
    assert np.array_equal(np.load(path), reference)

    # Finished: the same call again computes nothing.
    kernels.CALLS.clear()
    again = batch(kernels.slow_kernel, 4, memmap_path=path, devices=one)(x1, x2)
    assert kernels.CALLS == [] and np.array_equal(np.asarray(again), reference)


def test_resume_named_tuple_outputs_recomputes_forgotten_tiles(tmp_path, kernels):
    from ntk_adapters.outputs import pack

    def two(x1, x2=None, get=("nngp", "ntk")):
        k = kernels.slow_kernel(x1, x2)
        return pack(get, dict(nngp=k, ntk=2.0 * k + 1.0))

    x = np.random.default_rng(2).normal(size=(14, 3)).astype(np.float32)
    reference = batch(two, 4, store_on_host=True)(x)
    assert all(r.dtype == np.float32 for r in reference)
    path = tmp_path / "kk.npy"
    first = batch(two, 4, memmap_path=path)(x)
    for got, want in zip(first, reference):
        assert np.array_equal(np.asarray(got), want)
    assert os.path.exists(tmp_path / "kk_nngp.npy") and os.path.exists(tmp_path / "kk_ntk.npy")

    # Forget the off-diagonal tiles (as if killed after the diagonal), scribble on their data:
    # the resumed call must recompute exactly those 6 and overwrite the garbage.
    record = f"{path}.tiles.json"
    with open(record) as f:
        rec = json.load(f)
    rec["done"] = base64.b64encode(np.packbits(np.eye(4, dtype=bool).ravel()).tobytes()).decode()
    with open(record, "w") as f:
        json.dump(rec, f)
    for name in ("nngp", "ntk"):
        m = np.load(tmp_path / f"kk_{name}.npy", mmap_mode="r+")
        m[:4, 4:] = np.nan
        m[4:, :4] = np.nan
        m.flush()
        del m
    kernels.CALLS.clear()
    resumed = batch(two, 4, memmap_path=path)(x)
    assert len(kernels.CALLS) == 6
    for got, want in zip(resumed, reference):
        assert np.array_equal(np.asarray(got), want)


def test_mismatching_rerun_refuses(tmp_path, kernels):
    x = np.random.default_rng(3).normal(size=(10, 3))
    path = tmp_path / "k.npy"
    want = np.array(batch(kernels.slow_kernel, 4, memmap_path=path)(x))

    with pytest.raises(ValueError, match=r"memmap_path=.*differs in: x1"):
        batch(kernels.slow_kernel, 4, memmap_path=path)(x + 1.0)
    with pytest.raises(ValueError, match="batch_size"):
        batch(kernels.slow_kernel, 5, memmap_path=path)(x)
    with pytest.raises(ValueError, match="output dtypes"):
        batch(kernels.slow_kernel, 4, memmap_path=path)(x.astype(np.float32))
    with pytest.raises(ValueError, match="output shapes"):
        batch(kernels.slow_kernel, 4, memmap_path=path)(x[:9])
    with pytest.raises(ValueError, match="x2"):
        batch(kernels.slow_kernel, 4, memmap_path=path)(x, x)
    with pytest.raises(ValueError, match="kernel_fn"):
        batch(lambda a, b=None: kernels.slow_kernel(a, b), 4, memmap_path=path)(x)
    with pytest.raises(ValueError, match="symmetry"):
        batch(kernels.slow_kernel, 4, memmap_path=path, symmetry="none")(x)
    # The refused calls left the data alone.
    assert np.array_equal(np.load(path), want)

    # resume=False starts over on purpose.
    kernels.CALLS.clear()
    other = batch(kernels.slow_kernel, 4, memmap_path=path, resume=False)(x + 1.0)
    assert len(kernels.CALLS) == 6
    np.testing.assert_allclose(np.asarray(other), np.asarray(kernels.slow_kernel(x + 1.0)), rtol=1e-12, atol=1e-12)


def test_record_without_data_file_refuses(tmp_path, kernels):
    x = np.random.default_rng(4).normal(size=(6, 3))
    path = tmp_path / "k.npy"
    batch(kernels.slow_kernel, 4, memmap_path=path)(x)
    os.remove(path)
    with pytest.raises(ValueError, match="resume=False"):
        batch(kernels.slow_kernel, 4, memmap_path=path)(x)
