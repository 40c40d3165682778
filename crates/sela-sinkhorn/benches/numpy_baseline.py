#!/usr/bin/env python3
"""The baseline of the Sinkhorn benchmark: the same scheme as sela-sinkhorn in float64 numpy.

Kernel exp(lambda * (z - rowmax)); each iteration d = K v, s = (1/d) K, error
max_j |v_j s_j - t_j| / t_j with t_j = N r_j; stop below tol, else v = t / s (plain), or with
`--acceleration anderson:M` the same Anderson step on log v as sela-sinkhorn (memory M, a step
that makes the error grow threefold replaced by the plain update from the point before). Run by
`cargo bench -p sela-sinkhorn --bench sinkhorn`, which writes the logits as raw little-endian
float32 (N*K values) and reads one JSON line per solve from stdout.
"""

import argparse
import json
import time

import numpy as np


class Anderson:
    """Anderson acceleration (type II) of x <- G(x) with the growth safeguard."""

    def __init__(self, memory):
        self.memory, self.xs, self.fs, self.previous = memory, [], [], None

    def next(self, x, g, err):
        if self.previous is not None:
            before, g_before = self.previous
            self.previous = None
            if err > 3.0 * before:
                self.xs, self.fs = [], []
                return g_before
        self.previous = (err, g)
        self.xs.append(x)
        self.fs.append(g - x)
        if len(self.xs) > self.memory + 1:
            self.xs.pop(0)
            self.fs.pop(0)
        if len(self.xs) < 2:
            return g
        d_f = np.diff(np.stack(self.fs, axis=1), axis=1)
        d_x = np.diff(np.stack(self.xs, axis=1), axis=1)
        gamma = np.linalg.lstsq(d_f, self.fs[-1], rcond=1e-10)[0]
        step = g - (d_x + d_f) @ gamma
        if not np.all(np.isfinite(step)):
            self.xs, self.fs = [], []
            return g
        return step


def solve(z, lam, tol, max_iters, log_beta=None, memory=None):
    start = time.perf_counter()
    n, k = z.shape
    kern = np.exp(lam * (z - z.max(axis=1, keepdims=True)))
    target = np.full(k, n / k)
    v = np.ones(k) if log_beta is None else np.exp(log_beta - log_beta.max())
    accel = Anderson(memory) if memory else None
    iterations = 0
    while True:
        d = kern @ v
        s = (1.0 / d) @ kern
        iterations += 1
        err = float(np.max(np.abs(v * s - target) / target))
        if not np.isfinite(err):
            raise FloatingPointError(f"iteration {iterations}: marginal error {err}")
        if err < tol or iterations == max_iters:
            break
        if accel is None:
            v = target / s
        else:
            x = accel.next(np.log(v), np.log(target) - np.log(s), err)
            v = np.exp(x - x.max())
    return time.perf_counter() - start, iterations, err


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--logits", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--k", type=int, required=True)
    p.add_argument("--lambda", dest="lam", type=float, default=25.0)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--max-iters", type=int, default=1000)
    p.add_argument("--warm-log-beta", help="raw float64 column duals to warm-start a second solve")
    p.add_argument("--acceleration", default="none", help="none, anderson (memory 5) or anderson:<memory>")
    a = p.parse_args()
    memory = None if a.acceleration == "none" else int(a.acceleration.partition(":")[2] or 5)
    z = np.fromfile(a.logits, dtype="<f4").reshape(a.n, a.k).astype(np.float64)
    runs = [("cold", None)]
    if a.warm_log_beta:
        runs.append(("warm", np.fromfile(a.warm_log_beta, dtype="<f8")))
    for name, lb in runs:
        seconds, iterations, err = solve(z, a.lam, a.tol, a.max_iters, lb, memory)
        print(json.dumps({"run": name, "seconds": seconds, "iterations": iterations, "error": err}), flush=True)


if __name__ == "__main__":
    main()
