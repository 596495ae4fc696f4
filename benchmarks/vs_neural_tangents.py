"""This library beside neural-tangents itself, on the same machine and the same inputs.

neural-tangents (NT) is archived and does not import on current JAX, so it runs in a second Python
environment of its own (an older JAX), started by this script as a subprocess: ``--nt-python``
names that interpreter. The library side runs in this process. Both sides draw the same inputs
from seeded NumPy generators (PCG64, the same stream in every NumPy version); NT's outputs come back
in a ``.npz`` file and are compared with the library's (the largest difference relative to the
largest entry), so both sides are seen to compute the same thing.

Every case is compiled and warmed up on both sides first. Then, case by case, the two sides take
``--rounds`` turns of ``--repeats`` calls each (NT's worker process waits while this one runs and
the other way round), so that load drift on a shared machine hits both alike; the ratio is the
median of the per-turn ratios. Cases:

* empirical NTK of the same plain ``(params, x) -> y`` JAX functions: MLP 784-512-512-10 (traced and
  full output axes), CNN 2×conv(32) + flatten + dense on 8×8×3, CNN 4×conv(64) + global average
  pooling on 16×16×3. Library: ``empirical_ntk_fn`` as a user calls it (defaults: ``'auto'``
  implementation and ``vmap_axes``). NT: ``jit(empirical_ntk_fn(..., vmap_axes=0))`` with each of
  its three implementations, of which the fastest (one timed call each) is the one timed.
* infinite-width NNGP + NTK: a Flax model here, the same architecture in NT's ``stax`` there:
  MLP Dense-relu-Dense-erf-Dense on 1000×1000, CNN 2×conv + global average pooling on 8×8 (32×16),
  a Myrtle-5-like CNN on 16×16 (16×16). Weights ``N(0, 1/fan_in)`` without biases on both sides,
  so the NNGPs agree (the NTKs differ by the parameterization: standard here, NT's 'ntk').
* a tiled 4000×4000 infinite-width NTK: ``batch(kernel_fn, 1000)`` against ``nt.batch``.
* ``predict.gradient_descent_mse`` on a 2000-point float32 ReLU NTK (``diag_reg=1e-4``, 500 test
  points): ``t=None`` with the factorization (predictor built and called), the call alone, and 20
  finite times.

Everything runs in float32, JAX's default.

Setting up the NT side (one time, outside this project's environment)::

    python3 -m venv /tmp/ntvenv
    # jax 0.4.23: NT's structured derivatives use JAX internals that later versions removed
    /tmp/ntvenv/bin/pip install jax==0.4.23 jaxlib==0.4.23 'numpy<2' 'scipy<1.13' 'ml_dtypes<0.3' frozendict
    /tmp/ntvenv/bin/pip install --no-deps neural-tangents==0.6.5
    # NT's package __init__ imports its TensorFlow-based `experimental` subpackage; without
    # TensorFlow, empty it (nothing benchmarked here uses it):
    echo > /tmp/ntvenv/lib/python3.11/site-packages/neural_tangents/experimental/__init__.py

Run:  OPENBLAS_NUM_THREADS=1 .venv/bin/python benchmarks/vs_neural_tangents.py --nt-python /tmp/ntvenv/bin/python
      ... --small        # smaller sizes, about a minute
      ... --only empirical,infinite,batch,predict --match MLP     # sections; cases by name
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve()
SECTIONS = ("empirical", "infinite", "batch", "predict")
DIAG_REG = 1e-4
PREDICT_TIMES = 20


# --------------------------------------------------------------------------------------------
# Plain JAX models, imported by both sides (only jax.numpy and lax, which both JAX versions have).


def mlp_apply(params, x):
    import jax.numpy as jnp

    h = x
    for w in params[:-1]:
        h = jnp.tanh(h @ w)
    return h @ params[-1]


def _conv(h, w):
    from jax import lax

    return lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def cnn_flatten_apply(params, x):
    import jax

    h = x
    for w in params[:-1]:
        h = jax.nn.relu(_conv(h, w))
    return h.reshape(h.shape[0], -1) @ params[-1]


def cnn_pool_apply(params, x):
    import jax

    h = x
    for w in params[:-1]:
        h = jax.nn.relu(_conv(h, w))
    return h.mean(axis=(1, 2)) @ params[-1]


def _normal(rng, shape, fan_in):
    return (rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)


def empirical_cases(small: bool) -> dict:
    """name -> (apply function name, params, x1, x2, full output axes?)."""
    rng = np.random.default_rng(0)
    w = 256 if small else 512
    n1, n2 = (32, 16) if small else (128, 64)
    mlp = [_normal(rng, s, s[0]) for s in ((784, w), (w, w), (w, 10))]
    x1, x2 = rng.standard_normal((n1, 784)).astype(np.float32), rng.standard_normal((n2, 784)).astype(np.float32)
    c = 16 if small else 32
    flat = [_normal(rng, (3, 3, 3, c), 27), _normal(rng, (3, 3, c, c), 9 * c), _normal(rng, (64 * c, 10), 64 * c)]
    i1, i2 = (rng.standard_normal((n, 8, 8, 3)).astype(np.float32) for n in ((16, 8) if small else (32, 16)))
    c, hw, n = (32, 8, 8) if small else (64, 16, 16)
    pool = [_normal(rng, (3, 3, 3, c), 27)] + [_normal(rng, (3, 3, c, c), 9 * c) for _ in range(3)]
    pool.append(_normal(rng, (c, 10), c))
    j1, j2 = (rng.standard_normal((n, hw, hw, 3)).astype(np.float32) for _ in range(2))
    return {
        f"MLP 784-{w}-{w}-10, {n1}x{n2}, traced": ("mlp_apply", mlp, x1, x2, False),
        f"MLP 784-{w}-{w}-10, {n1}x{n2}, full": ("mlp_apply", mlp, x1, x2, True),
        f"CNN 2xconv({flat[0].shape[-1]})+flatten, 8x8x3, {len(i1)}x{len(i2)}": (
            "cnn_flatten_apply",
            flat,
            i1,
            i2,
            False,
        ),
        f"CNN 4xconv({c})+GAP, {hw}x{hw}x3, {n}x{n}": ("cnn_pool_apply", pool, j1, j2, False),
    }


def infinite_inputs(small: bool) -> dict:
    rng = np.random.default_rng(1)
    n = 200 if small else 1000
    return {
        "mlp": rng.standard_normal((n, 32)),
        "cnn1": rng.standard_normal((8 if small else 32, 8, 8, 3)),
        "cnn2": rng.standard_normal((4 if small else 16, 8, 8, 3)),
        "myrtle1": rng.standard_normal((4 if small else 16, 16, 16, 3)),
        "myrtle2": rng.standard_normal((4 if small else 16, 16, 16, 3)),
        "tiled": rng.standard_normal((1000 if small else 4000, 32)),
    }


def predict_inputs(small: bool) -> dict:
    rng = np.random.default_rng(2)
    n, m = (500, 125) if small else (2000, 500)
    x = rng.standard_normal((n + m, 10))
    d = x.shape[1]
    dot = 2 * x @ x.T / d
    q = np.sqrt(np.diag(dot))
    norm = np.outer(q, q)
    theta = np.arccos(np.clip(dot / norm, -1, 1))
    ntk = norm / (2 * np.pi) * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) + (np.pi - theta) / (2 * np.pi) * dot
    y = np.stack([np.sin(x[:n, 0]), np.cos(x[:n, 1])], 1)
    return {
        "k_train": ntk[:n, :n].astype(np.float32),
        "k_test": ntk[n:, :n].astype(np.float32),
        "y": y.astype(np.float32),
        "times": np.linspace(0.0, 5e3, PREDICT_TIMES).astype(np.float32),
    }


# --------------------------------------------------------------------------------------------
# Timing, the same on both sides: each case is a thunk, compiled and warmed up when built.


def median_time(fn, repeats: int) -> float:
    import jax

    runs = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        runs.append(time.perf_counter() - t)
    return statistics.median(runs)


def _warm(fn):
    import jax

    jax.block_until_ready(fn())
    return fn


# --------------------------------------------------------------------------------------------
# The neural-tangents side (runs under --side nt, in NT's environment, as a worker process).


def nt_cases(small: bool, sections) -> tuple[dict, dict, dict]:
    """``(cases, outputs, notes)``: name -> warmed thunk, name -> result to compare, name -> text."""
    import jax
    import jax.numpy as jnp
    import neural_tangents as nt
    from neural_tangents import stax

    cases, outs, notes = {}, {}, {}
    if "empirical" in sections:
        for name, (fn_name, params, x1, x2, full) in empirical_cases(small).items():
            apply_fn = globals()[fn_name]
            p = [jnp.asarray(w) for w in params]
            # NT's fastest implementation here, chosen by one timed call of each after a warm-up
            timed = {}
            for impl in (1, 2, 3):
                kfn = jax.jit(
                    nt.empirical_ntk_fn(apply_fn, trace_axes=() if full else (-1,), vmap_axes=0, implementation=impl)
                )
                fn = _warm(lambda kfn=kfn, x1=x1, x2=x2, p=p: kfn(x1, x2, p))
                timed[impl] = (median_time(fn, 1), fn)
            best = min(timed, key=lambda i: timed[i][0])
            cases[f"empirical/{name}"] = timed[best][1]
            outs[f"empirical/{name}"] = np.asarray(timed[best][1]())
            notes[f"empirical/{name}"] = "NT impl " + "/".join(f"{1e3 * timed[i][0]:.0f}" for i in timed) + " ms"
    if "infinite" in sections or "batch" in sections:
        inf = {k: jnp.asarray(v, jnp.float32) for k, v in infinite_inputs(small).items()}
        dense = lambda n: stax.Dense(n, W_std=1.0, b_std=None)
        conv = lambda c: stax.Conv(c, (3, 3), padding="SAME", W_std=1.0, b_std=None)
        mlp = stax.serial(dense(512), stax.Relu(), dense(512), stax.Erf(), dense(10))[2]
        cnn = stax.serial(conv(64), stax.Relu(), conv(64), stax.Relu(), stax.GlobalAvgPool(), dense(10))[2]
        myrtle = stax.serial(
            conv(64), stax.Relu(), conv(64), stax.Relu(), stax.AvgPool((2, 2), (2, 2)),
            conv(64), stax.Relu(), stax.AvgPool((2, 2), (2, 2)), conv(64), stax.Relu(),
            stax.GlobalAvgPool(), dense(10),
        )[2]  # fmt: skip
        if "infinite" in sections:
            for name, (kfn, a, b) in {"mlp": (mlp, "mlp", "mlp"), "cnn": (cnn, "cnn1", "cnn2"),
                                      "myrtle": (myrtle, "myrtle1", "myrtle2")}.items():  # fmt: skip
                fn = jax.jit(kfn, static_argnames="get")
                cases[f"infinite/{name}"] = _warm(lambda fn=fn, a=a, b=b: fn(inf[a], inf[b], ("nngp", "ntk")))
                outs[f"infinite/{name}"] = np.asarray(fn(inf[a], inf[b], "nngp"))
        if "batch" in sections:
            x = inf["tiled"]
            fn = nt.batch(mlp, batch_size=250 if small else 1000)
            cases["batch"] = _warm(lambda: fn(x, x, "ntk"))
            outs["batch"] = np.asarray(fn(x, x, "nngp"))
    if "predict" in sections:
        cases.update(_predict_cases(nt.predict.gradient_descent_mse, outs))
    return cases, outs, notes


def _predict_cases(gd, outs: dict) -> dict:
    """The predict cases, written once for both sides (the same call in NT and here)."""
    import jax.numpy as jnp

    data = predict_inputs(SMALL)
    k, kt, y, ts = (jnp.asarray(data[v]) for v in ("k_train", "k_test", "y", "times"))
    z = jnp.zeros_like(y)
    zt = jnp.zeros((kt.shape[0], y.shape[1]), y.dtype)
    pred = gd(k, y, diag_reg=DIAG_REG)
    cases = {
        "predict/t=None, built and called": lambda: gd(k, y, diag_reg=DIAG_REG)(None, z, zt, kt),
        "predict/t=None, the call alone": lambda: pred(None, z, zt, kt),
        "predict/20 times, built and called": lambda: gd(k, y, diag_reg=DIAG_REG)(ts, z, zt, kt),
    }
    for name, fn in cases.items():
        outs[name] = np.asarray(_warm(fn)()[1])
    return cases


def nt_worker(small: bool, sections, outputs_path: str) -> None:
    """Build NT's cases, save their outputs, then time one case per request line until 'quit'."""
    import jax
    import neural_tangents as nt

    cases, outs, notes = nt_cases(small, sections)
    np.savez(outputs_path, **{k.replace("/", "|"): v for k, v in outs.items()})
    print(
        json.dumps({"ready": sorted(cases), "notes": notes, "jax": jax.__version__, "nt": nt.__version__}), flush=True
    )
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            return
        print(json.dumps({"t": median_time(cases[request["case"]], request["repeats"])}), flush=True)


# --------------------------------------------------------------------------------------------
# The library side.


def library_cases(small: bool, sections) -> tuple[dict, dict]:
    import jax.numpy as jnp
    from flax import linen as nn
    from jax.scipy.special import erf

    import ntk_adapters
    import ntk_adapters.flax as nflax
    from ntk_adapters import predict

    cases, outs = {}, {}
    if "empirical" in sections:
        for name, (fn_name, params, x1, x2, full) in empirical_cases(small).items():
            p = [jnp.asarray(w) for w in params]
            model = ntk_adapters.adapt(globals()[fn_name], p, x1[:2])
            fn = ntk_adapters.empirical_ntk_fn(model, trace_axes=() if full else (-1,))
            cases[f"empirical/{name}"] = _warm(lambda fn=fn, x1=x1, x2=x2: fn(x1, x2))
            outs[f"empirical/{name}"] = np.asarray(fn(x1, x2))
    if "infinite" in sections or "batch" in sections:
        inf = {k: jnp.asarray(v, jnp.float32) for k, v in infinite_inputs(small).items()}
        dense = lambda n: nn.Dense(n, use_bias=False)
        conv = lambda: nn.Conv(64, (3, 3), use_bias=False)
        pool = lambda h: nn.avg_pool(h, (2, 2), (2, 2))

        class MLP(nn.Module):
            @nn.compact
            def __call__(self, x):
                return dense(10)(erf(dense(512)(nn.relu(dense(512)(x)))))

        class CNN(nn.Module):
            @nn.compact
            def __call__(self, x):
                h = nn.relu(conv()(nn.relu(conv()(x))))
                return dense(10)(h.mean(axis=(1, 2)))

        class Myrtle(nn.Module):
            @nn.compact
            def __call__(self, x):
                h = pool(nn.relu(conv()(nn.relu(conv()(x)))))
                h = nn.relu(conv()(pool(nn.relu(conv()(h)))))
                return dense(10)(h.mean(axis=(1, 2)))

        models = {"mlp": (MLP, "mlp", "mlp"), "cnn": (CNN, "cnn1", "cnn2"), "myrtle": (Myrtle, "myrtle1", "myrtle2")}
        kfns = {
            name: ntk_adapters.infinite_kernel_fn(nflax.adapt(m(), None, inf[a][:2]))
            for name, (m, a, _) in models.items()
        }
        if "infinite" in sections:
            for name, (_, a, b) in models.items():
                kfn = kfns[name]
                cases[f"infinite/{name}"] = _warm(lambda kfn=kfn, a=a, b=b: kfn(inf[a], inf[b]))
                outs[f"infinite/{name}"] = np.asarray(kfn(inf[a], inf[b], get="nngp"))
        if "batch" in sections:
            x = inf["tiled"]
            fn = ntk_adapters.batch(kfns["mlp"], 250 if small else 1000)
            cases["batch"] = _warm(lambda: fn(x, x, get="ntk"))
            outs["batch"] = np.asarray(fn(x, x, get="nngp"))
    if "predict" in sections:
        cases.update(_predict_cases(predict.gradient_descent_mse, outs))
    return cases, outs


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


SMALL = "--small" in sys.argv[1:]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nt-python", help="a Python interpreter that imports neural_tangents")
    ap.add_argument("--small", action="store_true", help="smaller sizes (about a minute)")
    ap.add_argument("--repeats", type=int, default=3 if SMALL else 5, help="calls per turn")
    ap.add_argument("--rounds", type=int, default=3 if SMALL else 5, help="turns each side takes per case")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--match", default="", help="only the cases whose name contains this text")
    ap.add_argument("--side", choices=["library", "nt"], default="library", help=argparse.SUPPRESS)
    ap.add_argument("--outputs", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sections = tuple(s for s in args.only.split(",") if s)
    if unknown := set(sections) - set(SECTIONS):
        ap.error(f"--only: unknown sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.side == "nt":
        nt_worker(args.small, sections, args.outputs)
        return
    if not args.nt_python:
        ap.error("--nt-python is required: an interpreter whose environment imports neural_tangents (see --help)")

    sys.path.insert(0, str(HERE.parent))
    from _common import describe_machine

    outputs_path = os.path.join(tempfile.mkdtemp(), "nt.npz")
    cmd = [args.nt_python, str(HERE), "--side", "nt", "--only", ",".join(sections), "--outputs", outputs_path]
    worker = subprocess.Popen(
        cmd + ["--small"] * args.small, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )  # fmt: skip
    ready = worker.stdout.readline()
    if not ready:
        sys.exit(f"the neural-tangents side failed (exit status {worker.wait()}); see its error above")
    info = json.loads(ready)
    nt_outs = {k.replace("|", "/"): v for k, v in np.load(outputs_path).items()}
    lib_cases, lib_outs = library_cases(args.small, sections)

    def nt_time(case: str) -> float:
        worker.stdin.write(json.dumps({"case": case, "repeats": args.repeats}) + "\n")
        worker.stdin.flush()
        return json.loads(worker.stdout.readline())["t"]

    rows = []
    for case, fn in lib_cases.items():
        if args.match not in case:
            continue
        lib_t, nt_t = [], []
        for _ in range(args.rounds):  # the two sides take turns, so load drift hits both alike
            lib_t.append(median_time(fn, args.repeats))
            nt_t.append(nt_time(case))
        ratio = statistics.median(a / b for a, b in zip(lib_t, nt_t))
        agree = rel_diff(lib_outs[case], nt_outs[case])
        rows.append(
            (case, statistics.median(lib_t), statistics.median(nt_t), ratio, agree, info["notes"].get(case, ""))
        )
    worker.stdin.write(json.dumps({"quit": True}) + "\n")
    worker.stdin.flush()
    worker.wait()

    print(describe_machine())
    print(f"neural-tangents {info['nt']} on jax {info['jax']} (its own environment, same machine)")
    print(
        f"ms: median over {args.rounds} turns of the median of {args.repeats} calls; ratio = library / NT, "
        "the median of the per-turn ratios (lower is better)"
    )
    print(f"{'case':52s} {'library':>9s} {'NT':>9s} {'ratio':>6s} {'rel diff':>9s}  note")
    for case, t_lib, t_nt, ratio, agree, note in rows:
        print(f"{case:52s} {1e3 * t_lib:9.2f} {1e3 * t_nt:9.2f} {ratio:6.2f} {agree:9.1e}  {note}")


if __name__ == "__main__":
    main()
