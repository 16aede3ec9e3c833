"""Data-parallel bilevel problems on torch.distributed: each rank holds a shard of the data, so its losses
are means over its shard, and a global mean is the sum over ranks of the shard means weighted by the shard's
share of the rows (n_r / N). ShardedMean turns a rank's shard quantities into the global ones with one
all-reduce each; hypergrad.total_grad(..., sharded=ShardedMean(...)) applies it to the right-hand side, to
every Hessian-vector product of the solve and to the mixed term, so that every rank solves the same global
system and returns the same total derivative as one process holding all the data (up to the order of the
floating-point sums). Used by the data-parallel TGDA attack (tgda_attack.attacks.tgda, `torchrun`).
"""
import torch
import torch.distributed as dist


class ShardedMean:
    """The weights of this rank's shard in the global means: `leader_weight` = m_r / M for the leader loss
    (e.g. the validation rows), `follower_weight` = n_r / N for the follower loss; `group` the process
    group (default: the world). leader(t) and follower(t) return the global sums of t * weight over ranks
    (new tensors; t is not changed)."""

    def __init__(self, leader_weight, follower_weight, group=None):
        for name, value in (("leader_weight", leader_weight), ("follower_weight", follower_weight)):
            if not 0 <= value <= 1:
                raise ValueError(f"{name} is this rank's share of the rows, in [0, 1]; got {value!r}")
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("ShardedMean needs an initialised torch.distributed process group "
                               "(torch.distributed.init_process_group, as torchrun sets up)")
        self.leader_weight, self.follower_weight, self.group = leader_weight, follower_weight, group

    def _sum(self, t, weight):
        out = t.detach() * weight
        dist.all_reduce(out, group=self.group)
        return out

    def leader(self, t):
        return self._sum(t, self.leader_weight)

    def follower(self, t):
        return self._sum(t, self.follower_weight)


def strided_shard(indices, rank, world_size):
    """This rank's share of a batch's indices: every world_size-th from position rank (shares differ in size
    by at most one; their union is the batch)."""
    return indices[rank::world_size]
