"""Multi-process training under torchrun: process group, gradient sync, rank-0 helpers, FSDP2.

    torchrun --nproc_per_node=K -m stmd_fast.train --batch-size B ...      # B is the GLOBAL batch

Without torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK) nothing here does anything and the
trainer is the single-process one. With it, each process (rank) trains on B / K samples of every
step and the gradients are averaged over the K processes, so K processes at batch B take the same
steps as one process at batch B (to float rounding). The learning rate is per global batch: it
does not change with K.

Gradient sync (--parallel ddp), and why not DDP's wrapper. The loss runs torch.func.jvp through
the network. DDP's gradient hooks are armed by DistributedDataParallel.forward, but the JVP must
call the plain module (py-meanflow's `model.module`): calling it bypasses DDP.forward, and the
backward then accumulates purely local gradients *without an error* - the silent no-sync trap.
So we keep a plain module on every rank and reduce the gradients ourselves after loss.backward():
the gradients are packed into a few flat buckets, summed with asynchronous all_reduce calls and
divided by K (all_reduce_grads). The loss - compiled or not - stays exactly the single-process
code, the JVP sees an ordinary nn.Module, and the sync cannot be skipped by the way the network
is called. The cost next to DDP: the all-reduce starts after the backward instead of overlapping
it (one pass over the gradients per step; not measured on GPUs here). Before each checkpoint the
ranks compare fingerprints of their weights and EMA (replicas_agree) and stop if they differ.
tests/test_distributed.py proves the sync: K = 2 equals one process, and a run with the reduction
switched off (STMD_FAST_SKIP_GRAD_SYNC=1, test-only) does not.

--parallel fsdp shards parameters, gradients and optimizer state with FSDP2 (fully_shard, one unit
per DiT block plus the root). FSDP2 does not wrap the module: its hooks run inside the module's
own __call__, so the JVP goes through them, parameters are all-gathered for the forward and the
gradients reduce-scattered (averaged) in the backward - measured equal to the full-batch gradient
on CPU/gloo for the MLP, the U-Net and the DiT. The EMA net is sharded alike and updated shard by
shard; rank 0 gathers it into a plain copy for sample grids. Checkpoints hold full (unsharded)
state dicts, gathered with torch.distributed.checkpoint.state_dict, so a run resumes with any K and
either mode. Not tried here: FSDP2 with NCCL on GPUs, and with --compile.

Elastic restarts (torchrun --max-restarts=N): the trainer resumes a restarted job from its last
checkpoint (train.elastic_restart_of_this_run); setup() gives each attempt its own store prefix.
"""
from __future__ import annotations

import hashlib
import os
import socket
import sys
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from .cli import clipped

PARALLEL_MODES = ("ddp", "fsdp")
BUCKET_NUMEL = 1 << 24  # elements per all_reduce bucket (64 MB of fp32): a few calls for any model


@dataclass(frozen=True)
class Dist:
    """Where this process stands: read from torchrun's environment (from_env), never changed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    launched: bool = False
    """Started by torchrun (a process group is used, even with one process)."""
    restart_count: int = 0
    """TORCHELASTIC_RESTART_COUNT: how often torchrun restarted the workers of this job."""
    max_restarts: int = 0
    """TORCHELASTIC_MAX_RESTARTS: torchrun's --max-restarts, how often it restarts the workers after any failure."""
    run_id: str | None = None
    """TORCHELASTIC_RUN_ID: the same in every attempt of one torchrun job (a fresh uuid with --standalone)."""

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that prints, logs and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.launched and self.world_size > 1

    @property
    def job_id(self) -> str | None:
        """What tells this torchrun job's checkpoints from another job's, the same in each of its attempts: its
        rendezvous id. Without --rdzv-id (or --standalone) that id is "none" for every job, so on one node the
        agent that restarts the workers (their parent process) tells jobs apart; across nodes nothing does
        (None: a restart then does not resume by itself)."""
        if self.run_id is None or self.run_id != "none":
            return self.run_id
        if self.local_world_size != self.world_size:
            return None
        return f"none@{socket.gethostname()}:{os.getppid()}"


LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def from_env() -> Dist:
    """The torchrun environment of this process, or the single-process default without it (or with one that
    does not parse: check_launch says what is wrong with it)."""
    env = os.environ
    if not all(k in env for k in LAUNCH_VARIABLES):
        return Dist()
    try:
        return Dist(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]), local_rank=int(env["LOCAL_RANK"]),
                    local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), launched=True,
                    restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")), run_id=env.get("TORCHELASTIC_RUN_ID"),
                    max_restarts=int(env.get("TORCHELASTIC_MAX_RESTARTS", "0")))
    except ValueError:
        return Dist()


def process_device(ctx: Dist, device: torch.device) -> torch.device:
    """The device of this process: cuda -> cuda:LOCAL_RANK under torchrun; ValueError naming the fix."""
    if not ctx.launched or device.type != "cuda":
        return device
    if device.index is not None and device.index != ctx.local_rank and ctx.world_size > 1:
        raise ValueError(f"--device {device}: under torchrun each process uses cuda:LOCAL_RANK; pass --device cuda "
                         f"(or auto), and CUDA_VISIBLE_DEVICES to choose the GPUs")
    if ctx.local_world_size > torch.cuda.device_count():  # checked on every rank alike, so rank 0 reports it
        raise ValueError(f"torchrun started {ctx.local_world_size} processes on this machine but it has "
                         f"{torch.cuda.device_count()} CUDA device(s): use --nproc_per_node <= "
                         f"{torch.cuda.device_count()}, or --device cpu")
    return torch.device("cuda", ctx.local_rank)


def torch_older_than(major: int, minor: int) -> bool:
    return tuple(int(x) for x in torch.__version__.split(".")[:2]) < (major, minor)


def check_launch(ctx: Dist) -> None:
    """ValueError for a launch environment torchrun would not make (left by hand or by another launcher): some
    of RANK, WORLD_SIZE and LOCAL_RANK without the others, values that are no ranks, or no rendezvous address.
    Before any work: such a process trained alone without a word, divided by WORLD_SIZE=0, or waited 30
    minutes for peers that were never started."""
    unset = [k for k in LAUNCH_VARIABLES if k not in os.environ]
    fix = ("launch with torchrun --nproc_per_node=K -m stmd_fast.train ..., or unset RANK, WORLD_SIZE and LOCAL_RANK "
           "for one process")
    if 0 < len(unset) < len(LAUNCH_VARIABLES):
        given = [f"{k}={os.environ[k]}" for k in LAUNCH_VARIABLES if k in os.environ]
        raise ValueError(f"{' '.join(given)} is set but {' and '.join(unset)} not: {fix}")
    if unset:
        return
    values = {k: os.environ[k] for k in (*LAUNCH_VARIABLES, "LOCAL_WORLD_SIZE") if k in os.environ}
    bad = [f"{k}={v}" for k, v in values.items() if not v.strip().lstrip("-").isdigit()]
    if not bad:
        rank, world, local = (int(values[k]) for k in LAUNCH_VARIABLES)
        bad = ([f"WORLD_SIZE={world}"] if world < 1 else []) + \
              ([f"RANK={rank} (of WORLD_SIZE={world})"] if world >= 1 and not 0 <= rank < world else []) + \
              ([f"LOCAL_RANK={local}"] if local < 0 or local > rank else [])
    if bad:
        raise ValueError(f"{', '.join(bad)}: not a process of a job (ranks run from 0 to WORLD_SIZE - 1): {fix}")
    absent = [k for k in ("MASTER_ADDR", "MASTER_PORT") if ctx.launched and k not in os.environ]
    if absent:
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK are set but {' and '.join(absent)} not: launch with "
                         f"torchrun --nproc_per_node=K -m stmd_fast.train ..., or unset RANK, WORLD_SIZE and LOCAL_RANK "
                         f"for one process")


def check_parallel(ctx: Dist, parallel: str, batch_size: int, jvp_block: int = 1, resume: bool = False) -> None:
    """ValueError (one line, naming the fix) for a --parallel / --batch-size that cannot run here.

    jvp_block: the rows P of ObjectiveConfig.jvp_block (1 for ddpm), of which each process's batch must be a
    multiple: the batches suggested are then multiples of world_size * P, so that each one runs. resume: the
    batch is the run's own (--resume refuses another), so the fix named is a process count."""
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"unknown --parallel {parallel!r}: choose one of {', '.join(PARALLEL_MODES)}")
    if parallel == "fsdp" and not ctx.launched:
        raise ValueError("--parallel fsdp shards the model over processes: launch with torchrun "
                         "--nproc_per_node=K -m stmd_fast.train ..., or drop --parallel fsdp for one process")
    if parallel == "fsdp" and ctx.launched and torch_older_than(2, 12):
        raise ValueError(f"--parallel fsdp needs torch >= 2.12 (this is {torch.__version__}): torch 2.11's FSDP2 "
                         "all-gather fails inside torch.func.jvp; use --parallel ddp, or upgrade torch")
    unit = ctx.world_size * jvp_block
    # one process: ObjectiveConfig.check_batch says it, and names the other fix (another fraction) too
    if ctx.world_size > 1 and batch_size % unit:
        lower = batch_size // unit * unit
        blocks = (f", into batches of whole JVP blocks ({jvp_block} rows, from --flow-matching-fraction)"
                  if jvp_block > 1 else "")
        if resume:
            counts = [k for k in range(1, batch_size // jvp_block + 1) if batch_size % (k * jvp_block) == 0][:8]
            raise ValueError(f"--batch-size {batch_size}, the resumed run's global batch (--resume keeps it), must "
                             f"split evenly over the processes{blocks}: launch {', '.join(map(str, counts[:-1]))}"
                             f"{' or ' if len(counts) > 1 else ''}{counts[-1]} of them "
                             f"(torchrun --nproc_per_node=K), not {ctx.world_size}")
        raise ValueError(f"--batch-size {batch_size} is the global batch and must split evenly over the "
                         f"{ctx.world_size} processes{blocks}: use a multiple of {unit} "
                         f"(e.g. {' or '.join(map(str, sorted({lower or unit, lower + unit})))})")


def setup(ctx: Dist, device: torch.device) -> None:
    """init_process_group: NCCL for CUDA (this process's GPU), gloo for CPU. No-op without torchrun."""
    if not ctx.launched or dist.is_initialized():
        return
    timeout = timedelta(minutes=30)
    store = _attempt_store(ctx, timeout)
    _wait_for_every_rank(store, ctx, timeout)
    kwargs = dict(timeout=timeout, store=store, rank=ctx.rank, world_size=ctx.world_size)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device, **kwargs)
    else:
        dist.init_process_group("gloo", **kwargs)


def _attempt_store(ctx: Dist, timeout: timedelta) -> dist.Store:
    """The rendezvous store of this attempt: torchrun's agent store under a prefix per restart.

    Why: torch's env:// rendezvous connects the workers to the store that torchrun's agent keeps for
    the whole job, without a per-attempt prefix (torch 2.14 and 2.15 here). After a
    --max-restarts restart the new workers then read the previous attempt's peer addresses:
    measured here, gloo fails with 'connectFullMesh ... Connection refused' (NCCL's unique id is
    exchanged the same way; pytorch issue 135712). TORCHELASTIC_RESTART_COUNT is the same on all
    workers of a single-node job and of multi-node jobs whose nodes all restart for a worker failure.
    """
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    # the agent serves it: every worker is a client. Without an agent store (TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1,
    # or another launcher) rank 0 serves it, as env:// does
    serves = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and ctx.rank == 0
    if not serves:  # torch's own connect retries wait inside C++ (no Ctrl-C) and log a stack trace per try
        _wait_for_server(addr, port, timeout)
    try:
        store = dist.TCPStore(addr, port, world_size=ctx.world_size, is_master=serves, timeout=timeout,
                              wait_for_workers=False, multi_tenant=serves)
    except (RuntimeError, OSError) as err:
        fix = "choose a free MASTER_PORT, or this machine's address" if serves else "check MASTER_ADDR and MASTER_PORT"
        raise RendezvousFailed(f"could not {'serve' if serves else 'reach'} the rendezvous at MASTER_ADDR={addr} "
                               f"MASTER_PORT={port} ({clipped(str(err).strip().splitlines()[0], 160)}): {fix}") from None
    return dist.PrefixStore(f"stmd_fast/attempt_{ctx.restart_count}", store)


JOIN_SAY_AFTER_S = 20.0  # then a waiting process says what it waits for


def _wait_for_server(addr: str, port: int, timeout: timedelta) -> None:
    """Until the rendezvous server (rank 0, or torchrun's agent) accepts connections: plain socket tries from
    Python, so that a stop signal acts and nothing is logged per try; one line after JOIN_SAY_AFTER_S."""
    began, said = time.monotonic(), False
    while True:
        try:
            socket.create_connection((addr, port), timeout=1).close()
            return
        except OSError as err:
            waited = time.monotonic() - began
            if waited > timeout.total_seconds():
                raise RendezvousFailed(f"no rendezvous server at MASTER_ADDR={addr} MASTER_PORT={port} within "
                                       f"{timeout} ({err.strerror or err}): start rank 0 there, or check the "
                                       f"address") from None
            if waited > JOIN_SAY_AFTER_S and not said:
                print(f"waiting for the rendezvous server at MASTER_ADDR={addr} MASTER_PORT={port} (rank 0 serves "
                      f"it; up to {timeout}; Ctrl-C stops)", file=sys.stderr, flush=True)
                said = True
            time.sleep(0.5)


class GradientSyncFailed(Exception):
    """Under torchrun the replicas' weights differ after a step: the gradient all-reduce did not happen."""


class RendezvousFailed(ValueError):
    """The processes of the job could not meet: no server, a port taken, ranks missing after the timeout."""


def _wait_for_every_rank(store: dist.Store, ctx: Dist, timeout: timedelta) -> None:
    """Each rank checks in, then waits (in Python, between short store calls, so that Ctrl-C and SIGTERM act)
    until all WORLD_SIZE have: init_process_group would wait inside C++ for the missing ones, deaf to signals,
    for `timeout`. Rank 0 names the missing ranks after JOIN_SAY_AFTER_S; RendezvousFailed names them at the end."""
    store.set(f"joined/{ctx.rank}", "1")
    began, said = time.monotonic(), False
    while True:
        missing = [r for r in range(ctx.world_size) if not store.check([f"joined/{r}"])]
        if not missing:
            return
        waited = time.monotonic() - began
        if waited > timeout.total_seconds():
            raise RendezvousFailed(f"rank(s) {', '.join(map(str, missing))} of WORLD_SIZE={ctx.world_size} did not "
                                   f"start within {timeout}: start every process of the job (torchrun "
                                   f"--nproc_per_node=K starts them all), or check WORLD_SIZE")
        if waited > JOIN_SAY_AFTER_S and not said and ctx.is_main:
            print(f"waiting for rank(s) {', '.join(map(str, missing))} of WORLD_SIZE={ctx.world_size} to start "
                  f"(up to {timeout}; Ctrl-C stops)", file=sys.stderr, flush=True)
            said = True
        time.sleep(0.2)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 finished writing a checkpoint)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def rank_seed(seed: int, rank: int) -> int:
    """Seed of rank r's own generator where ranks draw different data (latent shards): seed itself on
    rank 0, a hash of (seed, rank) elsewhere, so no two ranks draw the same noise."""
    if rank == 0:
        return seed
    return int.from_bytes(hashlib.sha256(f"stmd_fast/{seed}/{rank}".encode()).digest()[:7], "little")


# ----------------------------------------------------------------------------- replicas (--parallel ddp)

@torch.no_grad()
def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank src's parameters and buffers to every rank (same seed gives the same init; this makes sure)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src)


@torch.no_grad()
def all_reduce_grads(params, world_size: int, bucket_numel: int = BUCKET_NUMEL) -> None:
    """Average the .grad of `params` over all ranks: flat buckets, async all_reduce (SUM), / world_size.

    Every rank must hold gradients for the same parameters (true here: the network's graph does not
    depend on the data). Gloo has no AVG op, hence SUM and a division. Extra memory: one flat copy of
    the gradients while they are reduced.
    """
    if world_size == 1 or skip_grad_sync_for_tests():
        return
    buckets: list[list[torch.Tensor]] = []
    size, key = 0, None
    for p in params:
        if p.grad is None:
            continue
        g = p.grad
        k = (g.device, g.dtype)
        if not buckets or k != key or size + g.numel() > bucket_numel:
            buckets.append([])
            size, key = 0, k
        buckets[-1].append(g)
        size += g.numel()
    pending = []
    for bucket in buckets:  # all launched before the first wait: transfers overlap each other
        flat = torch.cat([g.reshape(-1) for g in bucket])
        pending.append((dist.all_reduce(flat, async_op=True), flat, bucket))
    for work, flat, bucket in pending:
        work.wait()
        flat.div_(world_size)
        for g, part in zip(bucket, flat.split([g.numel() for g in bucket])):
            g.copy_(part.view_as(g))


@torch.no_grad()
def replicas_agree(*modules: torch.nn.Module) -> bool:
    """True when the parameters and buffers of `modules` are the same on every rank: per-tensor fp64
    sums and sums of squares, gathered and compared exactly (a fingerprint, not a full broadcast)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return True
    tensors = [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
    mine = torch.stack([v for t in tensors for v in (t.double().sum(), t.double().square().sum())])
    everyone = gather(mine)
    return bool((everyone == everyone[0]).all())


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the process count (0, 1 without a process group)."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def gather(t: torch.Tensor) -> torch.Tensor:
    """(world_size, *t.shape): every rank's t, on every rank (one all_gather; t itself without torchrun)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return t[None]
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


class StopVote:
    """Under torchrun: whether any rank was asked to stop (Ctrl-C, SIGTERM, SIGHUP) or is due a --ckpt-minutes save,
    agreed every step without slowing it. Each step sends this rank's two flags in an 8-byte all-reduce on a gloo
    group (CPU, in gloo's own thread: no GPU sync) and reads the ones it sent the step before, which every rank
    reads at the same step. So a stop is agreed one step after the signal rather than at the next --log-every
    interval (torchrun SIGKILLs its workers 30 s after passing a SIGTERM on, and an interval, with its checkpoint,
    can be longer), and a timed save one step after it is due, however long the steps. Without torchrun they are
    the flags themselves. Every rank must call agreed() at every step, and close() once."""

    def __init__(self):
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() and dist.get_world_size() > 1 else None
        self.flags = torch.zeros(2, dtype=torch.int32)
        self.pending = None
        self.lagged = self.group is not None  # answers a step late: the vote in flight at a save predates it

    def agreed(self, stop: bool, save: bool = False) -> tuple[bool, bool]:
        """(any rank asked to stop, any rank is due a save): a step ago under torchrun, now without it."""
        if self.group is None:
            return stop, save
        anyone = (False, False)
        if self.pending is not None:  # sent a step ago: by now every rank has sent it too (the step synced them)
            self.pending.wait()
            anyone = tuple(bool(flag) for flag in self.flags.tolist())
        self.flags.copy_(torch.tensor([int(stop), int(save)], dtype=torch.int32))
        self.pending = dist.all_reduce(self.flags, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        return anyone

    def close(self) -> None:
        """Wait for the last vote sent (every rank sent it): none is left in flight when the group goes."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None


def lost_peer(err: BaseException) -> bool:
    """Whether a collective failed because another process of the job is gone (killed, crashed)."""
    text = str(err)
    # the words gloo's TCP pairs and NCCL use for a peer gone, not "NCCL" or "gloo" alone: a CUDA fault or a
    # bug of this rank must keep its traceback
    return isinstance(err, dist.DistError) or any(words in text for words in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "ncclRemoteError",
        "remote process exit", "communicator was aborted"))


def gather_objects(obj) -> list:
    """Every rank's picklable `obj`, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------- FSDP2 (--parallel fsdp)

def shard(*nets: torch.nn.Module, device: torch.device) -> None:
    """fully_shard each net over all ranks: one FSDP unit per DiT block (net.blocks), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for net in nets:
        for block in getattr(net, "blocks", ()):
            fully_shard(block, mesh=mesh)
        fully_shard(net, mesh=mesh)


def _full():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of an FSDP net on CPU, on rank 0 ({} elsewhere). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(net, options=_full())


def full_optimizer_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The unsharded optimizer state of an FSDP net on rank 0, in torch.optim's own layout (parameters
    by index, as optimizer.state_dict() of a single process gives), so any run resumes it. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    by_name = get_optimizer_state_dict(net, optimizer, options=_full())
    if not by_name:
        return {}
    index = {name: i for i, (name, _) in enumerate(net.named_parameters())}
    return {"state": {index[name]: value for name, value in by_name["state"].items()},
            "param_groups": [{**group, "params": [index[name] for name in group["params"]]}
                             for group in by_name["param_groups"]]}


def load_full_optimizer_state(net: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a (single-process layout) optimizer state into the optimizer of an FSDP net; every rank
    passes the full state and keeps its shard. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = [name for name, _ in net.named_parameters()]
    by_name = {"state": {names[i]: value for i, value in state["state"].items()},
               "param_groups": [{**group, "params": [names[i] for i in group["params"]]}
                                for group in state["param_groups"]]}
    set_optimizer_state_dict(net, optimizer, by_name, options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- test-only hooks

def skip_grad_sync_for_tests() -> bool:
    """TEST ONLY: STMD_FAST_SKIP_GRAD_SYNC=1 skips the gradient all-reduce, so tests can show that
    their equality check catches an unsynchronised run. Never set it for real training."""
    return os.environ.get("STMD_FAST_SKIP_GRAD_SYNC") == "1"


def fail_at_step_for_tests(ctx: Dist) -> int | None:
    """TEST ONLY: STMD_FAST_FAIL_AT_STEP=k makes rank 1 (or STMD_FAST_FAIL_RANK) exit (os._exit(1), no cleanup)
    as it starts step k of the first attempt of a torchrun job, to test the elastic restart and the survivors'
    line; None when not asked for here."""
    at, rank = os.environ.get("STMD_FAST_FAIL_AT_STEP"), int(os.environ.get("STMD_FAST_FAIL_RANK", "1"))
    return int(at) if at is not None and ctx.rank == rank and ctx.restart_count == 0 else None
