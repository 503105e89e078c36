"""Runs a function on N CPU ranks joined by a Gloo process group.

`run_ranks(fn, world_size, *args)` starts `world_size` processes from a
forkserver that has already imported torch (cheap starts, and no fork of a
process whose OpenMP pool is live), initializes `torch.distributed` with Gloo
on a free localhost port, calls `fn(rank, world_size, *args)` on every rank
and returns the list of return values ordered by rank. `fn` must be a
module-level function (it is pickled by reference). An exception on any rank
is re-raised in the caller with that rank's traceback; a rank that neither
returns nor fails within `timeout` seconds fails the call (no hang).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import socket
import traceback
from typing import Any, Callable

_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(["torch", "torch.distributed"])
    return _CONTEXT


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(fn, rank, world_size, port, args, results, env):
    os.environ.update(env)
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
        )
        value = fn(rank, world_size, *args)
        results.put((rank, True, value))
    except BaseException:  # report every failure, including SystemExit
        results.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# A failed Gloo mesh shows on the ranks waiting in the store as a closed store connection;
# seen on a 2-core machine whose cores another CPU-bound job shared.
_TRANSIENT_NETWORK_ERRORS = ("Gloo connectFullMesh failed", "Connection closed by peer",
                             "Connection reset by peer", "Address already in use",
                             "Connection was likely closed")


def run_ranks(fn: Callable[..., Any], world_size: int, *args, timeout: float = 300,
              env: dict[str, str] | None = None) -> list[Any]:
    """See the module docstring. A launch whose failures are all transient
    loopback errors (a port taken between choosing and binding it by another
    process on a busy machine) is retried once on a new port."""
    try:
        return _launch(fn, world_size, args, timeout, env)
    except RuntimeError as exc:
        if not all(any(marker in failure for marker in _TRANSIENT_NETWORK_ERRORS)
                   for failure in exc.args[1]):
            raise RuntimeError(exc.args[0]) from None
        try:
            return _launch(fn, world_size, args, timeout, env)
        except RuntimeError as again:
            raise RuntimeError(again.args[0]) from None


def _launch(fn, world_size: int, args: tuple, timeout: float, env) -> list[Any]:
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    child_env = {"OMP_NUM_THREADS": "1", **(env or {})}
    procs = [
        ctx.Process(target=_worker, args=(fn, rank, world_size, port, args, results, child_env))
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    values: dict[int, Any] = {}
    failures: list[str] = []
    try:
        while len(values) + len(failures) < world_size:
            try:
                # After a first failure, give the other ranks a moment to report theirs:
                # the root cause is often another rank's error.
                rank, ok, value = results.get(timeout=2 if failures else timeout)
            except Exception as exc:  # queue.Empty
                if failures:
                    break
                raise TimeoutError(
                    f"run_ranks: {world_size - len(values)} rank(s) of "
                    f"{fn.__name__} did not finish within {timeout} s") from exc
            if ok:
                values[rank] = value
            else:
                failures.append(f"rank {rank} failed:\n{value}")
    finally:
        for proc in procs:
            proc.join(timeout=5 if not failures else 0.5)
            if proc.is_alive():
                proc.kill()
                proc.join()
    if failures:
        raise RuntimeError("\n".join(failures), failures)
    return [values[rank] for rank in range(world_size)]
