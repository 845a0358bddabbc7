"""A tiny CPU torch training task for pgexecutor examples (used by torch_training.py).

Standalone: needs only ``torch==2.13.0`` (CPU build); psutil is used if present.

    python examples/_torch_cases.py          # one task, in this process

``train_task`` trains a 2-layer MLP on a synthetic regression set through a
``DataLoader(num_workers=2)``, then evaluates it on a held-out split through a second
``DataLoader(num_workers=2)``. On Linux (Python < 3.14) the DataLoader workers are
forked children of the calling process, so they inherit its process group: a
pgexecutor worker that leads its own group takes them down with it when killed.

Every DataLoader worker appends one line ``pid pgid ppid create_time role`` to
``pid_log`` (if given) as it starts, so the caller learns their pids even when the
task never returns.

Faults, all INJECTED (deliberately not torch behaviour), clearly labelled:

* ``hang=True``: ``SyntheticDataset.__getitem__`` of the training split blocks forever
  inside the DataLoader worker processes. The task's process then waits forever for
  batches (DataLoader ``timeout=0``; torch's liveness check only notices workers
  that *died*). Killing only that process leaves the two DataLoader workers behind as
  orphans (they block in ``__getitem__`` and never run torch's parent-alive check);
  killing the process group removes all three.
* ``crash=True``: the first ``__getitem__`` in a DataLoader worker segfaults; torch
  notices and raises ``RuntimeError: DataLoader worker (pid N) is killed by signal:
  Segmentation fault`` in the task (the task fails, its process survives).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, get_worker_info


class SyntheticDataset(Dataset):
    """y = x @ w + 0.1 * noise. ``w`` depends on ``seed`` only, ``x`` on seed and split,
    so the "test" split is held-out data from the same problem. Items: (x, y, pid)."""

    def __init__(
        self,
        n: int = 512,
        dim: int = 8,
        seed: int = 0,
        split: str = "train",
        hang: bool = False,
        crash: bool = False,
    ) -> None:
        w = torch.randn(dim, 1, generator=torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed * 1000 + (0 if split == "train" else 1))
        self.x = torch.randn(n, dim, generator=g)
        self.y = self.x @ w + 0.1 * torch.randn(n, 1, generator=g)
        self.hang = hang
        self.crash = crash

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        in_worker = get_worker_info() is not None
        if self.hang and in_worker:
            threading.Event().wait()  # INJECTED FAULT: blocks forever
        if self.crash and in_worker:
            import ctypes

            ctypes.string_at(0)  # INJECTED FAULT: NULL read -> SIGSEGV
        return self.x[i], self.y[i], os.getpid()


def make_model(dim: int = 8, hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))


def _log_worker(path: str | None, role: str, worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: record this DataLoader worker's identity."""
    if path is None:
        return
    pid = os.getpid()
    ctime = 0.0
    try:
        import psutil

        ctime = psutil.Process(pid).create_time()
    except Exception:
        pass
    line = f"{pid} {os.getpgid(0)} {os.getppid()} {ctime!r} {role}\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())  # one short O_APPEND write: lines never interleave
    finally:
        os.close(fd)


def train_task(
    seed: int,
    hang: bool = False,
    *,
    crash: bool = False,
    epochs: int = 2,
    n: int = 512,
    lr: float = 0.05,
    batch_size: int = 32,
    num_workers: int = 2,
    threads: int = 1,
    pid_log: str | None = None,
) -> dict[str, Any]:
    """Train for ``epochs`` epochs, then evaluate on held-out data.

    Both phases read through a ``DataLoader(num_workers=num_workers)``; the training
    loader keeps its workers across epochs (``persistent_workers=True``), so a task
    starts ``2 * num_workers`` DataLoader workers in all. ``threads`` sets torch's
    intra-op threads for this process (1 avoids oversubscribing cores when several
    tasks run at once).

    Returns ``{"seed", "lr", "train_loss", "eval_loss", "epochs", "seconds", "pid",
    "pgid", "start_method", "dataloader_worker_pids"}``.
    """
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    common: dict[str, Any] = {"batch_size": batch_size, "num_workers": num_workers}
    train = DataLoader(
        SyntheticDataset(n=n, seed=seed, split="train", hang=hang, crash=crash),
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        persistent_workers=num_workers > 0,
        worker_init_fn=functools.partial(_log_worker, pid_log, "train"),
        **common,
    )
    test = DataLoader(
        SyntheticDataset(n=max(n // 4, batch_size), seed=seed, split="test"),
        worker_init_fn=functools.partial(_log_worker, pid_log, "eval"),
        **common,
    )
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = nn.MSELoss()
    worker_pids: set[int] = set()

    model.train()
    train_loss = float("nan")
    for _ in range(epochs):
        total, count = 0.0, 0
        for x, y, pids in train:
            worker_pids.update(int(p) for p in pids)
            opt.zero_grad()
            batch_loss = loss_fn(model(x), y)
            batch_loss.backward()
            opt.step()
            total += batch_loss.item() * len(x)
            count += len(x)
        train_loss = total / count
    start_method = _start_method(train)
    del train  # shuts its persistent DataLoader workers down now

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y, pids in test:
            worker_pids.update(int(p) for p in pids)
            total += loss_fn(model(x), y).item() * len(x)
            count += len(x)
    eval_loss = total / count

    me = os.getpid()
    worker_pids.discard(me)  # num_workers=0 yields our own pid
    return {
        "seed": seed,
        "lr": lr,
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "epochs": epochs,
        "seconds": time.perf_counter() - t0,
        "pid": me,
        "pgid": os.getpgid(0),
        "start_method": start_method,
        "dataloader_worker_pids": sorted(worker_pids),
    }


def _start_method(loader: Any) -> str:
    ctx = getattr(loader, "multiprocessing_context", None)
    if ctx is None:
        import multiprocessing

        return multiprocessing.get_start_method()
    return ctx.get_start_method()


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        log = os.path.join(d, "pids")
        t = time.perf_counter()
        print(train_task(0, pid_log=log), f"total {time.perf_counter() - t:.2f}s")
        with open(log) as f:
            print("DataLoader workers (pid pgid ppid create_time role):", f.read(), sep="\n")
