"""`tandem train SCRIPT [ARGS...] --nproc N`: launch a training script through torch.distributed.run.

torchrun (not a home-made launcher) starts the ranks, sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR, and
stops every rank as soon as one exits non-zero; its error (the failing rank's traceback) reaches stderr.
One process on one node (the default) runs the script directly: torchrun would only add its start-up.
Multi-node: run the same command on each node with --nnodes, --node-rank and either --master-addr/--master-port
(static) or --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB (elastic rendezvous).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
from typing import Annotated

import typer

from tandem.serving._proc import die_with_parent

__all__ = ["build_command", "launch", "register"]


def build_command(script: str, args: list[str], *, nproc: int, nnodes: str = "1", node_rank: int = 0,
                  rdzv_backend: str | None = None, rdzv_endpoint: str | None = None, rdzv_id: str | None = None,
                  master_addr: str | None = None, master_port: int | None = None) -> list[str]:
    """The torch.distributed.run command line for these options."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--nnodes={nnodes}"]
    if rdzv_backend is not None:
        cmd.append(f"--rdzv-backend={rdzv_backend}")
        if rdzv_endpoint:
            cmd.append(f"--rdzv-endpoint={rdzv_endpoint}")
        if rdzv_id:
            cmd.append(f"--rdzv-id={rdzv_id}")
    else:
        if nnodes == "1" and master_port is None:
            cmd.append("--standalone")   # a free local port; no stale-port clashes between jobs
        else:
            cmd.append(f"--node-rank={node_rank}")
            cmd.append(f"--master-addr={master_addr or '127.0.0.1'}")
            cmd.append(f"--master-port={master_port or 29500}")
    return [*cmd, script, *args]


def launch(script: str, args: list[str] | None = None, *, nproc: int = 1, threads: int | None = None,
           **rendezvous: object) -> int:
    """Run `script` on `nproc` ranks through torchrun; returns its exit code (non-zero when a rank failed)."""
    if nproc < 1:
        raise typer.BadParameter(f"--nproc {nproc} must be >= 1")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = threads or max(1, cpus // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    single = nproc == 1 and str(rendezvous.get("nnodes", "1")) == "1" and not any(
        rendezvous.get(k) for k in ("rdzv_backend", "master_addr", "master_port"))
    if single:   # one process on one node: torchrun would add only its start-up (~3-6 s), so run it directly
        cmd = [sys.executable, script, *list(args or [])]
    else:
        cmd = build_command(script, list(args or []), nproc=nproc, **rendezvous)  # type: ignore[arg-type]
    print(f"tandem train: {nproc} process(es) per node, OMP_NUM_THREADS={threads} ({cpus} CPUs // {nproc}); "
          f"{' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    # torchrun must not outlive us: SIGTERM/SIGINT are passed on (it then stops its ranks), and the kernel
    # sends it SIGTERM if we die without a word (kill -9 of a pipeline runner's step, for one)
    proc = subprocess.Popen(cmd, env=env, preexec_fn=functools.partial(die_with_parent, os.getpid()))  # noqa: PLW1509
    forward = {s: signal.signal(s, lambda sig, _frame: proc.send_signal(sig)) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for s, handler in forward.items():
            signal.signal(s, handler)


def train(
    script: Annotated[str, typer.Argument(help="The training script (its arguments follow it)")],
    args: Annotated[list[str] | None, typer.Argument(help="Arguments passed to the script")] = None,
    nproc: Annotated[int, typer.Option(help="Processes per node (one per GPU; CPU: gloo ranks)")] = 1,
    nnodes: Annotated[str, typer.Option(help="Nodes, or MIN:MAX for elastic rendezvous")] = "1",
    node_rank: Annotated[int, typer.Option(help="This node's rank (static rendezvous)")] = 0,
    rdzv_backend: Annotated[str | None, typer.Option(help="Elastic rendezvous backend, e.g. c10d")] = None,
    rdzv_endpoint: Annotated[str | None, typer.Option(help="Rendezvous HOST:PORT (same on every node)")] = None,
    rdzv_id: Annotated[str | None, typer.Option(help="Job id shared by the nodes of one job")] = None,
    master_addr: Annotated[str | None, typer.Option(help="Static rendezvous: rank-0 node's address")] = None,
    master_port: Annotated[int | None, typer.Option(help="Static rendezvous: rank-0 node's port")] = None,
    threads: Annotated[int | None, typer.Option(help="OMP_NUM_THREADS per process (default CPUs // nproc)")] = None,
) -> None:
    """Launch SCRIPT on --nproc processes through torch.distributed.run (gloo on CPU, NCCL on CUDA). Options go
    before SCRIPT; everything after SCRIPT is passed to it (`tandem train --nproc 2 fit.py --lr 0.1`).

    Multi-node: run on every node with --nnodes N --node-rank I --master-addr HOST --master-port PORT, or
    --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id JOB. A rank that fails stops the
    others; its traceback is printed and the exit code is non-zero.
    """
    code = launch(script, args or [], nproc=nproc, threads=threads, nnodes=nnodes, node_rank=node_rank,
                  rdzv_backend=rdzv_backend, rdzv_endpoint=rdzv_endpoint, rdzv_id=rdzv_id,
                  master_addr=master_addr, master_port=master_port)
    raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add the `train` command to `app`."""
    app.command("train", context_settings={"allow_interspersed_args": False})(train)


if __name__ == "__main__":   # python -m tandem.train.command SCRIPT ... (tests; same as `tandem train`)
    _app = typer.Typer(add_completion=False)
    register(_app)
    _app.command("noop", hidden=True)(lambda: None)   # keep `train` a subcommand
    _app()
