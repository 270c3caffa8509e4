"""What torchrun gives a process: its rank, the world size, and the process group, joined in one place (gloo on the
CPU, nccl on CUDA) by tensor-parallel inference and data-parallel training alike."""

import os

import torch
import torch.distributed as dist


def torchrun_world_size() -> int:
    """The world size torchrun gave this process (WORLD_SIZE); 1 when not launched by torchrun."""
    return int(os.environ.get("WORLD_SIZE", 1))


def is_rank_0() -> bool:
    """Whether this process is rank 0 of a torchrun job, or not launched by torchrun: the one that prints."""
    return int(os.environ.get("RANK", 0)) == 0


def rank_device(device: "torch.device | str") -> torch.device:
    """This process's device. Under torchrun a bare CUDA device is the rank's own GPU, cuda:LOCAL_RANK, made current
    (nccl needs it before the group is joined); a device with an index, or any other, is as given."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


_JOINED: list[bool] = []  # [True] once join_process_group has made the process group: leave_process_group's to end


def join_process_group(device: torch.device) -> None:
    """Join the process group torchrun describes, unless this process has: nccl for CUDA devices, else gloo."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        _JOINED[:] = [True]


def leave_process_group() -> None:
    """Leave the process group join_process_group made, once every rank is done with it, so that its threads
    (gloo's, nccl's) are joined before the interpreter exits instead of being torn down by it: under torch 2.11 a
    rank of a job that had finished its work once aborted at exit ("terminate called without an active exception",
    SIGABRT). A group this process had before (another library's, a caller's) is left as it is."""
    if _JOINED and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _JOINED.clear()
