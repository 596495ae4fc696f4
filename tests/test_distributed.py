"""``batch`` and ``kernel_regression_cg`` shared between processes of ``jax.distributed``.

Each test starts real processes (coordinator on 127.0.0.1, CPU devices, gloo collectives) that
all make the same call, and compares with a single-process run bit for bit. The kernel is the
closed-form NTK of a one-hidden-layer ReLU MLP, so that compiling and running it is quick.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from ntk_adapters import batch, kernel_regression_cg

pytestmark = pytest.mark.xdist_group("distributed")

_KERNEL_MODULE = textwrap.dedent(
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    CALLS = []

    def _tick():
        CALLS.append(1)

    def mlp_ntk(x1, x2=None):
        # NTK of a one-hidden-layer ReLU MLP at infinite width (arc-cosine kernels, written out):
        # cheap to compile, so that the processes spend their time on the protocol.
        jax.debug.callback(_tick)
        same = x2 is None
        x2 = x1 if same else x2
        d = x1.shape[-1]
        s12 = x1 @ x2.T / d + 0.1
        n1 = jnp.sum(x1 * x1, -1) / d + 0.1
        n2 = jnp.sum(x2 * x2, -1) / d + 0.1
        norm = jnp.sqrt(n1[:, None] * n2[None, :])
        cos = jnp.clip(s12 / norm, -1.0, 1.0)
        if same:
            cos = jnp.where(jnp.eye(len(x1), dtype=bool), 1.0, cos)
        theta = jnp.arccos(cos)
        nngp = norm * (jnp.sin(theta) + (jnp.pi - theta) * cos) / (2 * jnp.pi) + 0.1
        return nngp + s12 * (jnp.pi - theta) / (2 * jnp.pi)

    def data():
        rng = np.random.default_rng(1)
        x = rng.normal(size=(23, 3))
        return x, rng.normal(size=(9, 3)), np.sin(x[:, :2]), rng.normal(size=(5, 3))
    """
)

_WORKER = textwrap.dedent(
    """
    import json, sys
    import jax
    jax.config.update("jax_enable_x64", True)
    rank, n_proc, port, tmp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    if n_proc > 1:
        jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=n_proc, process_id=rank)
    import numpy as np
    sys.path.insert(0, tmp)
    import dist_kernels as m
    from ntk_adapters import batch, kernel_regression_cg

    x, x2, y, xt = m.data()
    report = dict(rank=rank, processes=jax.process_count(), devices=len(jax.devices()))
    tag = "multi" if n_proc > 1 else "single"
    m.CALLS.clear()
    k = batch(m.mlp_ntk, 4, memmap_path=f"{tmp}/{tag}_sym.npy", progress=True)(x)
    report["sym_calls"] = len(m.CALLS)
    m.CALLS.clear()
    batch(m.mlp_ntk, 4, memmap_path=f"{tmp}/{tag}_rect.npy")(x, x2)
    report["rect_calls"] = len(m.CALLS)
    res = kernel_regression_cg(m.mlp_ntk, x, y, xt, diag_reg=0.1, batch_size=4, tol=1e-10, get=None)
    np.savez(f"{tmp}/{tag}_cg_{rank}.npz", alpha=np.asarray(res.alpha), test=np.asarray(res.test),
             train=np.asarray(res.train), residual=float(res.residual), iterations=res.iterations)
    if n_proc > 1:
        # A different input in each process: every process must refuse (none may wait forever).
        for kwargs in (dict(memmap_path=f"{tmp}/mismatch.npy"), {}):
            try:
                batch(m.mlp_ntk, 4, **kwargs)(x + rank)
            except ValueError as e:
                report.setdefault("refused", []).append(str(e))
        # A path that names a different file in each process, as on disks of their own.
        try:
            batch(m.mlp_ntk, 4, memmap_path=f"{tmp}/own_{rank}.npy")(x)
        except ValueError as e:
            report["refused"].append(str(e))
    print("REPORT" + json.dumps(report), flush=True)
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp_path, rank, n_proc, port, n_devices):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # Same compiler flags as this process (conftest), plus the host device count: the same tile
    # program must be compiled for the results to agree bit for bit.
    env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={n_devices}".strip()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "worker.py"), str(rank), str(n_proc), str(port), str(tmp_path)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(procs, timeout=120):
    reports, errors = [], []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        if p.returncode != 0:
            errors.append(err[-3000:])
        line = next((l for l in out.splitlines() if l.startswith("REPORT")), None)
        reports.append(None if line is None else json.loads(line[len("REPORT") :]))
        reports[-1] = (reports[-1], err)
    assert not errors, "\n-----\n".join(errors)
    return reports


@pytest.fixture
def kernels(tmp_path, monkeypatch):
    (tmp_path / "dist_kernels.py").write_text(_KERNEL_MODULE)
    (tmp_path / "worker.py").write_text(_WORKER)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("dist_kernels", None)
    import dist_kernels

    yield dist_kernels
    sys.modules.pop("dist_kernels", None)


def test_two_processes_equal_one_bit_for_bit_refuse_mismatches_and_resume(tmp_path, kernels):
    port = _free_port()
    # Two processes with two devices each, and one process with all four (the CG reference:
    # the same four-way split of the tile pairs).
    procs = [_start(tmp_path, r, 2, port, 2) for r in range(2)] + [_start(tmp_path, 0, 1, 0, 4)]
    (r0, err0), (r1, err1), (single, _) = _finish(procs)
    assert (r0["processes"], r0["devices"], single["devices"]) == (2, 4, 4)

    x, x2, y, xt = kernels.data()
    one = jax.local_devices()[:1]
    kernels.CALLS.clear()
    want_sym = np.asarray(batch(kernels.mlp_ntk, 4, store_on_host=True, devices=one)(x))
    assert len(kernels.CALLS) == 21  # 6 row tiles: 6 diagonal + 15 upper
    want_rect = np.asarray(batch(kernels.mlp_ntk, 4, store_on_host=True, devices=one)(x, x2))
    np.testing.assert_allclose(want_sym, np.asarray(kernels.mlp_ntk(x)), rtol=1e-12, atol=1e-12)

    # Tiles dealt out round-robin between the processes, the symmetric saving kept (6 diagonal,
    # then 15 upper tiles; 6 × 3 for x2), each process evaluating its share in groups of its 2
    # devices (a short last group is padded with a repeated tile, which also counts).
    def evaluations(n_tiles, rank):
        share = len(range(rank, n_tiles, 2))
        return 2 * -(-share // 2)

    for rank, r in enumerate((r0, r1)):
        assert r["sym_calls"] == evaluations(6, rank) + evaluations(15, rank), r
        assert r["rect_calls"] == evaluations(18, rank), r
    assert np.array_equal(np.load(tmp_path / "multi_sym.npy"), want_sym)
    assert np.array_equal(np.load(tmp_path / "multi_rect.npy"), want_rect)
    assert np.array_equal(np.load(tmp_path / "single_sym.npy"), want_sym)
    # One progress bar, on process 0.
    assert "kernel tiles (process 0 of 2)" in err0 and "kernel tiles" not in err1

    # kernel_regression_cg: every process holds the same answer, bit for bit that of one process
    # over as many devices, and that of a direct solve.
    cg = [np.load(tmp_path / f"multi_cg_{r}.npz") for r in range(2)]
    ref = np.load(tmp_path / "single_cg_0.npz")
    for c in cg:
        for key in ("alpha", "test", "train", "residual", "iterations"):
            assert np.array_equal(c[key], ref[key]), key
    alpha = np.linalg.solve(want_sym + 0.1 * np.eye(len(x)), y)
    np.testing.assert_allclose(ref["alpha"], alpha, atol=1e-8 * np.abs(alpha).max())
    k_test = np.asarray(kernels.mlp_ntk(xt, x))
    np.testing.assert_allclose(ref["test"], k_test @ alpha, atol=1e-8 * np.abs(k_test @ alpha).max())

    # Different inputs in different processes, or files that are not shared: all refuse.
    for r in (r0, r1):
        assert len(r["refused"]) == 3, r
        assert "differs between processes" in r["refused"][0] and "distributed=False" in r["refused"][0]
        assert "memmap_path" in r["refused"][1]
        assert "file system that every process sees" in r["refused"][2]
    assert not os.path.exists(tmp_path / "mismatch.npy")

    # Resume here, in one process, what the two processes recorded: nothing is left to do; with
    # process 1's record gone (as if it died before writing one), exactly its tiles are redone.
    kernels.CALLS.clear()
    again = batch(kernels.mlp_ntk, 4, memmap_path=tmp_path / "multi_sym.npy", devices=one)(x)
    assert kernels.CALLS == [] and np.array_equal(np.asarray(again), want_sym)
    os.remove(tmp_path / "multi_rect.npy.tiles.1.json")
    kernels.CALLS.clear()
    again = batch(kernels.mlp_ntk, 4, memmap_path=tmp_path / "multi_rect.npy", devices=one)(x, x2)
    assert len(kernels.CALLS) == len(range(1, 18, 2)) and np.array_equal(np.asarray(again), want_rect)


def test_single_process_options():
    x = np.random.default_rng(5).normal(size=(6, 3))

    def k(x1, x2=None):
        x2 = x1 if x2 is None else x2
        return x1 @ x2.T

    # With one process there is nothing to share: distributed=True is the plain local call.
    np.testing.assert_allclose(batch(k, 4, distributed=True)(x), x @ x.T, rtol=1e-14)
    res = kernel_regression_cg(k, x, np.ones(6), diag_reg=1.0, batch_size=4, get=None, distributed=True)
    np.testing.assert_allclose(res.alpha, np.linalg.solve(x @ x.T + np.eye(6), np.ones(6)), rtol=1e-9)
    with pytest.raises(ValueError, match="distributed=True .* devices=None"):
        batch(k, 4, distributed=True, devices=jax.local_devices())
