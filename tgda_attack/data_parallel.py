"""One TGDA attack spread over the processes of `torchrun --nproc_per_node=K -m tgda_attack run ...`
(torch.distributed; backend gloo on CPUs, nccl on GPUs, one GPU a process).

Every process loads the data and the pretrained models; in each batch of Algorithm 1 a process takes its
strided share of the batch's D_tr, D_p and D_v rows (hypergrad.distributed.strided_shard), and the follower's
gradients, the solve's right-hand side and Hessian-vector products, the mixed term and the logged losses are
summed over the processes with the shares' weights (hypergrad.ShardedMean), so every process takes the same
steps as one process with the whole batch (up to the order of floating-point sums). Stages 1 and 3
(pretraining, retraining) run on rank 0 while the others wait; rank 0 alone writes files. With
--dp-mode partitions each process instead runs the attack alone on its partition (DP_MODES).
"""
import datetime
import os

import torch
import torch.distributed as dist

# "sharded": one attack, every batch shared by the processes (above); "partitions": the paper's way of
# spreading CIFAR-10 over 8 GPUs, each process attacking its own partition of D_tr and D_v (every K-th
# point) independently, their poisons gathered on rank 0 (any attack; a comparison, not the same attack).
DP_MODES = ("sharded", "partitions")


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if world_size() > 1 else 0


def is_main():
    return rank() == 0


def launched():
    """Whether this process was started by torchrun with more than one process: WORLD_SIZE > 1 beside the
    MASTER_ADDR torchrun sets (a WORLD_SIZE left in a shell's environment, or not a number, is no launch)."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return False
    return size > 1 and "MASTER_ADDR" in os.environ


def problem(cfg):
    """None if the run's settings can be spread over processes, else why not (one sentence)."""
    if cfg.dp_mode == "partitions":
        return None
    if cfg.attack != "tgda":
        return (f"torchrun shares the batches of the tgda attack only; run {cfg.attack} in one process (python -m "
                "tgda_attack), or as independent partitions (--dp-mode partitions)")
    if cfg.leader != "attacker" or cfg.game_solver != "tgda" or cfg.cuda_graphs:
        return "torchrun spreads the attacker-led TGDA game (--leader attacker --game-solver tgda, no --cuda-graphs)"
    return None


STAGE_TIMEOUT = datetime.timedelta(days=2)  # how long a rank waits in a collective (init's comment says why)


def init(device):
    """Joins the torchrun process group (gloo for a CPU device, nccl for cuda, one GPU a process by
    LOCAL_RANK); does nothing outside torchrun or when already joined."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # the other ranks wait in on_main while rank 0 pretrains and retrains (the paper's CNN: an hour and more on a
    # CPU), longer than the default timeout of a collective (30 minutes for gloo, 10 for NCCL); a rank that fails
    # says so to the others (on_main), and torchrun stops the others of a killed one, so a long wait is no hang
    dist.init_process_group("nccl" if cuda else "gloo", timeout=STAGE_TIMEOUT)


def on_main(fn, *args, **kwargs):
    """fn(*args, **kwargs) on rank 0, the others waiting; its result on every rank. An exception on rank 0
    is raised on every rank (the others as a RuntimeError naming it), so that no process waits forever."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    outcome = [None]
    if is_main():
        try:
            outcome = [("ok", fn(*args, **kwargs))]
        except BaseException as exc:
            outcome = [("error", f"{type(exc).__name__}: {exc}")]
            dist.broadcast_object_list(outcome, src=0)
            raise
    dist.broadcast_object_list(outcome, src=0)
    status, value = outcome[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def finish():
    """Leaves the process group, all processes together (a process that exits while another still talks to it
    makes gloo abort the other)."""
    if world_size() > 1:
        dist.barrier()
        dist.destroy_process_group()


def barrier():
    if world_size() > 1:
        dist.barrier()


def partition_share(total, n, rank, world):
    """This rank's part of `total` poisons when `n` points are dealt to `world` partitions (rank r: points r, r + world,
    ...): in proportion to the partition's size, the remainder by largest fraction, so that the parts sum to `total`
    (each partition's own floor(epsilon * size) would give fewer: 1,256 of 1,260 for full MNIST on 8)."""
    sizes = [len(range(r, n, world)) for r in range(world)]
    exact = [total * size / n for size in sizes]
    shares = [int(e) for e in exact]
    by_remainder = sorted(range(world), key=lambda r: (-(exact[r] - shares[r]), r))
    for r in by_remainder[:total - sum(shares)]:
        shares[r] += 1
    return shares[rank]


def gather_partitions(x_p, y_p, sources, history):
    """The poisons of every process's partition (--dp-mode partitions), in rank order: (x, y, source indices
    into the whole D_tr, {rank: history}) on every rank."""
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, (x_p.cpu(), y_p.cpu(), sources.cpu(), history))
    return (torch.cat([g[0] for g in gathered]).to(x_p.device), torch.cat([g[1] for g in gathered]).to(y_p.device),
            torch.cat([g[2] for g in gathered]), {f"rank {r}": g[3] for r, g in enumerate(gathered)})
