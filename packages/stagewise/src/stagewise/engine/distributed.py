"""Data-parallel training through torch.distributed when launched by ``torchrun``.

``torchrun --nproc_per_node=2 -m stagewise run RECIPE`` sets RANK/WORLD_SIZE/LOCAL_RANK; the
engine then joins the process group (gloo on CPU, nccl on CUDA), wraps the training module in
DistributedDataParallel, splits each global batch across ranks, and logs and checkpoints on
rank 0 only.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, TypeVar

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from stagewise.recipe import Recipe

T = TypeVar("T")
K = TypeVar("K")


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """The number of processes torchrun started (1 without torchrun), known before they join."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Whether this process speaks for the job: rank 0 under torchrun (known before it joins), or the only one."""
    return os.environ.get("RANK", "0") == "0"


def launcher() -> list[str]:
    """How this process was started, before ``stagewise``: ``torchrun --nproc_per_node=N -m`` in a torchrun
    job (``--nnodes`` too across machines, whose rendezvous options are the user's), else nothing."""
    world = launched_world_size()
    if world <= 1:
        return []
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    nodes = [f"--nnodes={world // per_node}"] if per_node != world else []
    return ["torchrun", *nodes, f"--nproc_per_node={per_node}", "-m"]


_FAILED = "failed"  # the counter of the job's processes that failed


def first_to_report(message: str) -> bool:
    """Whether this process is the first of its torchrun job to report the error ``message`` (True outside
    torchrun), so that each error is printed once: the processes may all meet it (a recipe they check alike, a
    loss term's output the model lacks) or one alone (a check on its share of a batch), and the first to meet it
    need not be rank 0, whom torchrun stops as soon as another process has ended. It also marks the job failed
    (see :func:`another_process_failed`). Counted in the key-value store of torchrun's agent, which each process
    reaches alone, not waiting for the others as a collective would (they may be waiting in one); True when it
    cannot be reached: a message said twice, not never."""
    counts = _count([_FAILED, hashlib.sha256(message.encode()).hexdigest()])
    return counts is None or counts[-1] == 1


def mark_failed() -> None:
    """Mark this torchrun job failed, for its other processes to know (see :func:`another_process_failed`)."""
    _count([_FAILED])


def another_process_failed() -> bool:
    """Whether a process of this torchrun job has failed (see :func:`mark_failed`): a collective of this one that
    breaks off now only follows that failure (gloo: 'Connection closed by peer')."""
    store = _agent_store()
    try:
        return store is not None and store.check([_key(_FAILED)])
    except RuntimeError:  # the agent has gone
        return False


def _count(names: list[str]) -> list[int] | None:
    """Add 1 to each of this job's counters ``names``; their new values, None without torchrun's agent."""
    store = _agent_store()
    try:
        return None if store is None else [store.add(_key(name), 1) for name in names]
    except RuntimeError:  # the agent has gone
        return None


def _key(name: str) -> str:
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")  # a restarted job's processes start afresh
    return f"stagewise/{attempt}/{name}"


def _agent_store() -> dist.Store | None:
    """A client of the key-value store of the torchrun agent that started this process, None when there is none."""
    if launched_world_size() <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=timedelta(seconds=3))  # on the error path only: a gone agent must not hold it up
    except (KeyError, ValueError, RuntimeError):  # no address, or no agent there any more
        return None


_joined = False  # a run of this process joined a process group, whose threads outlive it (cli.main)


def joined_a_group() -> bool:
    """Whether a run in this process took part in a torchrun process group."""
    return _joined


def setup(device: torch.device) -> DistInfo:
    """Join the process group if launched by torchrun, once: a later run in this process (compare's second)
    reuses it rather than leaving it and joining anew under the same rendezvous, which hung a compare under
    torchrun in 3 of 5 test runs on a loaded machine. A no-op in a single process."""
    global _joined
    if launched_world_size() <= 1:
        return DistInfo()
    _joined = True
    if not dist.is_initialized():
        if device.type == "cuda":  # NCCL's collectives (a barrier, the sums below) run on the current device
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return _group_info()


def group_info() -> DistInfo:
    """This process's place in the process group a run here joined (:func:`setup`); DistInfo() if none did."""
    return _group_info() if dist.is_available() and dist.is_initialized() else DistInfo()


def _group_info() -> DistInfo:
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_reduce_sums(values: list[float], info: DistInfo) -> list[float]:
    """Sum a list of floats over ranks (float64, so sums of counts stay exact)."""
    if not info.enabled:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_keys(keys: list[K], info: DistInfo) -> list[K]:
    """The keys any process has, in the order rank 0, then rank 1, ... first has them: what every process
    must send to :func:`all_reduce_sums` (one with no batch of a split smaller than the job has none)."""
    if not info.enabled:
        return keys
    gathered: list[list[K] | None] = [None] * info.world_size
    dist.all_gather_object(gathered, keys)
    return list(dict.fromkeys(key for rank_keys in gathered for key in rank_keys or []))


def main_process_choice(value: T, info: DistInfo) -> T:
    """Rank 0's ``value`` in every process, for a choice each would make alone and could make differently:
    a default run folder numbered past the folders in use, which rank 0 may already have made."""
    if not info.enabled:
        return value
    chosen = [value]
    dist.broadcast_object_list(chosen, src=0)
    return chosen[0]


def collective_device() -> torch.device:
    """Where a collective's own tensors live: NCCL reduces CUDA tensors only (this process's GPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def resolve_device(recipe: Recipe) -> torch.device:
    """The torch device for the recipe's ``run.device``; the recipe's error (marked when ``--set``
    gave the device) when it asks for CUDA this machine cannot give."""
    name = recipe.run.device
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise recipe.error(["run.device: 'cuda' was asked for but no CUDA device is available; use 'auto' or 'cpu'"])
    local_rank, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
    # each process takes the GPU of its local rank (NCCL refuses two on one GPU); checked on the machine's
    # process count, not this process's rank, so every process refuses alike and rank 0 says it
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", str(local_rank + 1)))
    if processes > gpus:
        raise recipe.error([f"run.device: {name!r} gives each process one GPU, but this machine has {gpus} and "
                            f"torchrun started {processes} processes here; start at most {gpus} per machine "
                            f"(torchrun --nproc_per_node={gpus}) or set run.device = 'cpu'"])
    if recipe.run.precision == "bf16" and not _bf16_supported(local_rank):  # else autocast refuses at the first step
        raise recipe.error([f"run.precision: 'bf16' needs a GPU with bfloat16 (compute capability 8.0 or newer), and "
                            f"{torch.cuda.get_device_name(local_rank)} has none; set run.precision = 'fp32', or "
                            f"run.device = 'cpu'"])
    return torch.device("cuda", local_rank)


def _bf16_supported(index: int) -> bool:
    with torch.cuda.device(index):  # torch.autocast asks this of the current device
        return torch.cuda.is_bf16_supported()
