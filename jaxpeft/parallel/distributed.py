"""Joining a multi-process job: `jax.distributed.initialize` from explicit arguments (coordinator address,
process count and id) or from the environment of a Cloud TPU pod slice or SLURM job (jax's own detection).

Imports jax only. Call it first, before anything touches a device: the backend starts with the global view.
"""
from __future__ import annotations

import os

import jax

from jaxpeft.errors import JaxpeftError


class DistributedError(JaxpeftError, RuntimeError):
    """The process could not join the job; the message names what was given and the fix."""


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               cpu_devices: int | None = None) -> tuple[int, int]:
    """Join the job and return (process index, process count).

    coordinator: 'host:port' of process 0 (every process passes the same); num_processes / process_id: the
        job's size and this process's rank. All three None: jax detects a TPU pod slice or a SLURM job from its
        environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID also work).
    cpu_devices: CPU devices per process (tests on one machine: 2 processes x N devices on loopback).
    """
    given = [coordinator, num_processes, process_id]
    if any(v is not None for v in given) and any(v is None for v in given):
        raise DistributedError("pass all of --coordinator, --num-processes and --process-id (or none, to read a TPU "
                               f"pod's or SLURM job's environment); got coordinator={coordinator!r}, "
                               f"num_processes={num_processes!r}, process_id={process_id!r}")
    if num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"process_id={process_id} is outside 0..{num_processes - 1}")
    if cpu_devices:
        jax.config.update("jax_num_cpu_devices", int(cpu_devices))
    try:
        if coordinator is None:
            jax.distributed.initialize()
        else:
            jax.distributed.initialize(coordinator, num_processes, process_id)
    except Exception as e:  # unreachable coordinator, a backend already started, no cluster environment found
        env = {k: v for k, v in os.environ.items() if k.startswith(("JAX_", "SLURM_", "TPU_", "MEGASCALE"))}
        raise DistributedError(f"jax.distributed.initialize failed ({type(e).__name__}: {e}); coordinator="
                               f"{coordinator!r}, num_processes={num_processes!r}, process_id={process_id!r}, "
                               f"cluster environment {sorted(env) or 'none'}: check that process 0 is reachable at "
                               "the coordinator address and that nothing used jax before this call") from e
    return jax.process_index(), jax.process_count()
