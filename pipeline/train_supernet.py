"""Stage 1: train the one-shot supernet with BN parameters only, on Ray Train (V2).

``train_supernet(cfg, run)`` runs a ``TorchTrainer`` whose workers each hold the whole
supernet and train it data-parallel, then writes the stage's outputs into the run dir.
With ``supernet.seeds`` = S > 1 the workers form S groups, one independent supernet per
seed (its own init, paths and data order, ``seed_of``), each data-parallel within its
group: the search scores the seeds' mean table, and the seeds' agreement on each layer's
op ranking (``ranking.seed_agreement``) says whether that ranking is signal or noise.

    supernet/final.pt            space, fingerprint, mode, epoch, model state (CPU, seed 0),
                                 the seeds' mean BN-indicator table [L, K] (NaN = forbidden
                                 choice), one per epoch ("indicator_history"), each seed's
                                 final table ("indicator_seeds") and model ("seed_models")
    supernet/history.parquet     one row per epoch (loss, acc, images_per_sec, seed_tau, ...)
    supernet/indicators.parquet  long format: epoch, layer, choice, op, score (seeds' mean)
    supernet/seed_indicators.parquet  the same per seed
    supernet/result.json         written LAST: its presence marks the stage done
    supernet/run.json            fingerprint and mode of the supernet being trained
    supernet_train/              Ray's own run folder: checkpoint_*/state.pt (seed 0),
                                 state_seed1.pt ... (each seed's group leader uploads its own)

Finished / partial / fresh. A run dir with ``supernet/result.json`` is finished: the
stage returns that file and trains nothing. Asked for more epochs than it ran, it
continues from the latest checkpoint: with ``schedule: constant`` the result equals one
uninterrupted longer run; a decaying schedule (which has reached zero) is re-planned
over the new ``epochs`` from where it stands. Anything else is partial or fresh and
goes to Ray with the same ``RunConfig(name, storage_path)``, so ``get_checkpoint()``
hands the workers the latest checkpoint and training continues from it.

Bit-for-bit continuation on CPU. A checkpoint is taken at the end of every epoch and
holds model, optimizer and scheduler state, epoch, histories. Everything random inside
an epoch is *derived* from (seed, epoch[, rank]) rather than carried along: the data
order (``make_loader``), the architecture paths (``PathSampler``) and torch's global RNG
(augmentation, dropout), which every rank re-seeds at the start of every epoch. So a
resumed epoch draws exactly what the uninterrupted run drew, whatever happened before.

Data parallelism without DDP. Every rank takes the same path at every step (the paths
come from the seed, not from the rank), so after backward the same set of parameters
holds gradients on every rank. One flattened all-reduce of those gradients (gloo on
CPU, NCCL on GPU) replaces DDP, which for a single-path net would need
``find_unused_parameters=True`` and a graph traversal every step. BN running
statistics are averaged once per epoch so that all ranks end an epoch with one model.

A seam for tests: ``SupernetTrainer(on_step=...)`` is called at the start of every
optimizer step. The pipeline sets it only when the test-only ``BNNAS_FAULT_STEP`` asks
for a crash (``pipeline/faults.py``); otherwise the loop makes no call at all.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import math
import os
import tempfile
import time
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from search_spaces import SearchSpace, Supernet, bn_indicator, freeze, last_bn, space_from_dict

from .budgets import make_budgets
from .checkpoints import load_intact
from .common import (PipelineError, Progress, cluster_address, ensure_ray, read_stage_output, register_ops,
                     resolve_space, resource_shortfall, space_ops)
from .config import Config
from .data import Splits, build_datasets, make_loader
from .faults import FaultSpec
from .finite import FiniteGuard, NonFinite, check_weights
from .progress import Relay, Ticker, eta, meter, send
from .ranking import agreement_line, rank_distance, seed_agreement
from .schedules import lr_schedule
from .seeding import derive_seed, seed_everything
from .storage import RunDir
from .util import one_line

STAGE_DIR = "supernet"
RESULT = f"{STAGE_DIR}/result.json"
FINAL = f"{STAGE_DIR}/final.pt"
HISTORY = f"{STAGE_DIR}/history.parquet"
INDICATORS = f"{STAGE_DIR}/indicators.parquet"
RUN_META = f"{STAGE_DIR}/run.json"
SEED_INDICATORS = f"{STAGE_DIR}/seed_indicators.parquet"  # every seed's tables (indicators.parquet: their mean)
TRAIN_NAME = "supernet_train"  # Ray's RunConfig name: fixed, so a rerun finds its checkpoints
STATE_FILE = "state.pt"


def state_file(index: int) -> str:
    """Seed ``index``'s file in a checkpoint: its group's leader writes it, Ray merges them."""
    return STATE_FILE if index == 0 else f"state_seed{index}.pt"
REFERENCE_BATCH = 512  # the authors' lr 0.25 is for a global batch of 512


# ============================================================================ pure pieces

def init_supernet(space: SearchSpace, seed: int, gamma_init: float = 1.0) -> Supernet:
    """The supernet exactly as every rank initialises it (frozen weights stay like this).

    ``gamma_init`` sets the scored gamma (every candidate op's last BN). At 0, with a
    residual in every layer (``space.shortcut``), every path starts as the same function.
    """
    seed_everything(seed)
    model = Supernet(space)
    if gamma_init != 1.0:
        with torch.no_grad():
            for _, _, op in model.candidate_ops():
                bn = last_bn(op)
                if bn is not None:
                    bn.weight.fill_(gamma_init)
    return model


def seed_of(cfg: Config, index: int) -> int:
    """The seed of supernet ``index`` of ``supernet.seeds``: seed 0 is the run's own seed."""
    return cfg.seed if index == 0 else derive_seed(cfg.seed, "supernet", index)


class PathSampler:
    """Architectures for every optimizer step of an epoch, the same on every rank.

    ``epoch_paths(epoch, steps)`` is an int array [steps, G, L]: for each optimizer
    step, G paths (one choice index per layer). ``uniform``: G = 1, each layer's choice
    uniform over its allowed ops (SPOS). ``fair``: G = K, the most ops any layer allows;
    for each layer a random permutation of its allowed ops, padded to K by re-drawing
    from the allowed ops when the layer allows fewer (identity forbidden), so every
    allowed op is taken at least once per group and exactly once when the layer allows
    all K (FairNAS strict fairness). A layer with one allowed choice (fixed to identity)
    holds it in every path and draws nothing.

    The draws depend only on (seed, epoch): a resumed epoch gets the paths the
    uninterrupted run got, with no generator state to carry in the checkpoint.
    """

    def __init__(self, space: SearchSpace, kind: str, seed: int):
        if kind not in ("uniform", "fair"):
            raise ValueError(f"unknown path sampler {kind!r}; use uniform or fair")
        self.kind, self.seed = kind, seed
        self.allowed = [np.flatnonzero(layer.allowed) for layer in space.layers]
        self.group_size = 1 if kind == "uniform" else max(len(a) for a in self.allowed)

    def epoch_paths(self, epoch: int, steps: int) -> np.ndarray:
        rng = np.random.default_rng(derive_seed(self.seed, "paths", self.kind, epoch))
        out = np.empty((steps, self.group_size, len(self.allowed)), dtype=np.int64)
        for l, allowed in enumerate(self.allowed):
            if len(allowed) == 1:
                out[:, :, l] = allowed[0]
                continue
            if self.kind == "uniform":
                out[:, 0, l] = allowed[rng.integers(0, len(allowed), size=steps)]
                continue
            for s in range(steps):
                column = rng.permutation(allowed)
                if len(column) < self.group_size:
                    extra = rng.choice(allowed, self.group_size - len(column))
                    column = rng.permutation(np.concatenate([column, extra]))
                out[s, :, l] = column
        return out


def paths_digest(paths: np.ndarray) -> str:
    """A short hash of a path sequence, to check that ranks walked the same paths."""
    # 15 hex digits = 60 bits: fits an int64, so ranks can all-reduce them on any backend.
    return hashlib.sha256(np.ascontiguousarray(paths, dtype=np.int64).tobytes()).hexdigest()[:15]


def scaled_lr(cfg: Config, world_size: int) -> float:
    """cfg lr is for a global batch of 512 (authors' 0.25); scale linearly."""
    return cfg.supernet.lr * cfg.supernet.batch_size * world_size / REFERENCE_BATCH


def _finite_or_none(x: float) -> Optional[float]:
    return None if x is None or not math.isfinite(x) else float(x)


def _table_to_list(table: np.ndarray) -> list:
    """Nested list with None for forbidden choices (JSON has no NaN)."""
    return [[_finite_or_none(v) for v in row] for row in table]


# ============================================================================ one rank

class SupernetTrainer:
    """What one data-parallel rank does, with no Ray in it.

    The Ray train loop is a thin wrapper around this class (build, resume from a state
    dict, ``train_epoch`` per epoch, report, checkpoint ``state_dict()``), and tests can
    drive it in-process with ``world_size=1``. With ``world_size > 1`` it expects
    ``torch.distributed`` to be initialised (Ray's TorchTrainer does that). ``on_step``,
    if given, is called as ``on_step(epoch, step)`` before every optimizer step.
    """

    def __init__(self, cfg: Config, splits: Splits, *, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", state: Optional[dict] = None,
                 space: Optional[SearchSpace] = None, on_step: Optional[Callable[[int, int], None]] = None,
                 seed: Optional[int] = None, group=None, on_progress: Optional[Callable[[dict], None]] = None):
        sc = cfg.supernet
        self.cfg, self.splits = cfg, splits
        # rank / world_size are within this supernet's process group (one group per seed).
        self.rank, self.world_size = rank, world_size
        self.seed = cfg.seed if seed is None else seed
        self.group = group  # None: the default (whole) group
        self.device = torch.device(device)
        self.on_gpu = self.device.type == "cuda"
        self.distributed = world_size > 1 and dist.is_available() and dist.is_initialized()
        self.on_step = on_step  # on_step(epoch, step) before every optimizer step; tests only (see module doc)
        self.on_progress = on_progress  # on_progress(numbers) every cfg.progress_s seconds inside an epoch

        info = splits.info
        # The driver resolves the space and ships it: a space or op registered in a user's
        # script, or a space file on the driver's disk only, is unknown on a worker.
        self.space = space or resolve_space(cfg, info.in_channels, info.num_classes, info.image_size)
        # Same seed on every rank: identical weights without a broadcast, and the frozen
        # weights are exactly what init_supernet() rebuilds from the seed.
        self.model = init_supernet(self.space, self.seed, sc.gamma_init)
        self.trainable = freeze(self.model, sc.mode)
        if sc.train_classifier and sc.mode != "all":
            # A frozen random classifier caps the logits' scale (SD 0.11 across a batch at
            # init) and reads each path's random features through a fixed basis.
            for p in self.model.head.fc.parameters():
                p.requires_grad_(True)
            self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.channels_last = cfg.supernet.channels_last
        self.model.to(self.device, memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
        self.autocast = self.on_gpu and sc.amp  # bf16 on GPU; CPU runs fp32 (bit-exact resume)

        # Weight decay never touches BN affine parameters (authors' setting).
        bn_params = {id(p) for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                     for p in m.parameters()}
        groups = [{"params": [p for p in self.trainable if id(p) not in bn_params], "weight_decay": sc.weight_decay},
                  {"params": [p for p in self.trainable if id(p) in bn_params], "weight_decay": 0.0}]
        self.base_lr = scaled_lr(cfg, world_size)
        self.optimizer = torch.optim.SGD([g for g in groups if g["params"]], lr=self.base_lr, momentum=sc.momentum)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=sc.label_smoothing)
        self.sampler = PathSampler(self.space, sc.sampler, self.seed)

        per_rank = len(splits.train) // world_size
        self.steps_per_epoch = per_rank // sc.batch_size  # drop_last: equal steps on every rank
        if self.steps_per_epoch < 1:
            raise ValueError(f"training split has {len(splits.train)} images, fewer than one global batch "
                             f"({sc.batch_size} x {world_size} workers)")
        self._make_scheduler(sc.epochs)

        self.next_epoch = 0
        self.indicator_history: list[np.ndarray] = []
        self.history: list[dict] = []
        self.stable_count = 0
        self.stopped_early = False
        if state is not None:
            self.load_state_dict(state)
        self.start_epoch = self.next_epoch  # where this worker group began (history shows restarts)

    def _make_scheduler(self, epochs: int) -> None:
        sc = self.cfg.supernet
        total = epochs * self.steps_per_epoch
        warmup = round(sc.warmup_epochs * self.steps_per_epoch)
        self.total_steps = total
        self.scheduler = lr_schedule(self.optimizer, total, warmup, sc.schedule)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """Everything needed to continue bit-for-bit (RNG streams are derived, see module doc)."""
        return {
            "fingerprint": self.space.fingerprint,
            "mode": self.cfg.supernet.mode,
            "epoch": self.next_epoch,  # epochs completed = index of the next epoch
            "model": {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
            # Copies, like the model's: torch returns live references to the momentum
            # buffers, and a trainer restored in-process would otherwise share them.
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "scheduler": copy.deepcopy(self.scheduler.state_dict()),
            "indicator_history": list(self.indicator_history),
            "history": list(self.history),
            "stable_count": self.stable_count,
            "stopped_early": self.stopped_early,
        }

    def load_state_dict(self, state: dict) -> None:
        if state.get("fingerprint") != self.space.fingerprint or state.get("mode") != self.cfg.supernet.mode:
            raise ValueError(
                f"checkpoint is for space {state.get('fingerprint')} mode {state.get('mode')}, not "
                f"{self.space.fingerprint} mode {self.cfg.supernet.mode}; use another run dir")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        # The lambda is not in the state dict: it was rebuilt from cfg.supernet.epochs, which
        # differs from the saved run's only when a finished stage is reopened. Recompute the
        # next step's lr from it, exactly as LambdaLR does (the same value when unchanged).
        t = self.scheduler.last_epoch
        for group, base, fn in zip(self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas):
            group["lr"] = base * fn(t)
        self.next_epoch = int(state["epoch"])
        self.indicator_history = list(state["indicator_history"])
        self.history = list(state["history"])
        self.stable_count = int(state["stable_count"])
        self.stopped_early = bool(state["stopped_early"])

    # ------------------------------------------------------------------ distributed helpers
    def _all_reduce(self, t: torch.Tensor, op=None) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM, group=self.group)
        return t

    def _average(self, tensors: list[torch.Tensor]) -> None:
        """Average tensors across ranks in place, as one flat bucket (one collective, not many)."""
        if not self.distributed or not tensors:
            return
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        flat.div_(self.world_size)
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()

    def _sync_grads(self) -> None:
        # Every rank took the same paths, so the same parameters hold gradients everywhere.
        self._average([p.grad for p in self.trainable if p.grad is not None])

    def _sync_bn_stats(self) -> None:
        # Running statistics see only the local shard; averaging once per epoch keeps one
        # model across ranks (what DDP's buffer broadcast would do, at a fraction of the cost).
        self._average([b for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       for b in (m.running_mean, m.running_var) if b is not None])

    # ------------------------------------------------------------------ one epoch
    def train_epoch(self, epoch: int) -> dict:
        sc = self.cfg.supernet
        # Everything random in this epoch comes from (seed, epoch, rank): see module doc.
        torch.manual_seed(derive_seed(self.seed, "torch", epoch, self.rank))
        loader = make_loader(self.splits.train, sc.batch_size, shuffle=True, seed=self.seed, epoch=epoch,
                             rank=self.rank, world_size=self.world_size, drop_last=True,
                             num_workers=self.cfg.data.num_workers)
        paths = self.sampler.epoch_paths(epoch, self.steps_per_epoch)
        self.model.train()

        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        seen = 0
        steps = 0
        lr = self.optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        guard = FiniteGuard(self.device, self._all_reduce if self.distributed else None)  # NonFiniteLoss at the step
        ticker = Ticker(self.cfg.progress_s) if self.on_progress is not None else None
        batches: Iterable = itertools.islice(enumerate(loader), self.steps_per_epoch)
        if self.on_step is not None:  # decided once per epoch: without a hook the loop makes no call
            batches = _announced(batches, epoch, self.on_step)
        for step, (x, y) in batches:
            x = x.to(self.device, non_blocking=True,
                     memory_format=torch.channels_last if self.channels_last else torch.preserve_format)
            y = y.to(self.device, non_blocking=True)
            self.optimizer.zero_grad(set_to_none=True)
            # Fair: the K paths of a group see the same batch and their gradients add up
            # (FairNAS); every op's own parameters get exactly one gradient per group.
            for arch in paths[step]:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                    logits = self.model(x, arch.tolist())
                    loss = self.criterion(logits, y)
                loss.backward()
                guard.step(loss, epoch, step, self.optimizer.param_groups[0]["lr"])
                loss_sum += loss.detach().double() * len(y)
                correct += (logits.detach().argmax(1) == y).sum()
                seen += len(y)
            self._sync_grads()
            if sc.grad_clip > 0:
                nn.utils.clip_grad_norm_(self.trainable, sc.grad_clip)
            lr = self.optimizer.param_groups[0]["lr"]
            self.optimizer.step()
            self.scheduler.step()
            steps += 1
            if ticker is not None and ticker.due():  # this rank's numbers: reading them syncs a GPU, so rarely
                self.on_progress({"epoch": epoch, "step": steps, "steps": self.steps_per_epoch,
                                  "elapsed": time.perf_counter() - t0, "loss": loss_sum.item() / max(seen, 1),
                                  "acc": correct.item() / max(seen, 1),
                                  "images_per_sec": seen * self.world_size / max(time.perf_counter() - t0, 1e-9)})
        guard.check()
        self._sync_bn_stats()

        totals = self._all_reduce(torch.stack([loss_sum, correct, torch.tensor(float(seen), dtype=torch.float64,
                                                                               device=self.device)]))
        elapsed = self._all_reduce(torch.tensor(time.perf_counter() - t0, dtype=torch.float64, device=self.device),
                                   dist.ReduceOp.MAX).item()
        loss_total, correct_total, seen_total = totals.tolist()

        table = bn_indicator(self.model)
        prev = self.indicator_history[-1] if self.indicator_history else None
        distance = rank_distance(prev, table)
        self.indicator_history.append(table)
        if sc.stable_patience > 0 and math.isfinite(distance) and distance <= sc.stable_tol:
            self.stable_count += 1
        else:
            self.stable_count = 0
        stop = sc.stable_patience > 0 and self.stable_count >= sc.stable_patience
        # Ranks hold identical tables, but report() is a barrier: one decision, broadcast
        # from rank 0, guarantees that every rank reports the same number of times.
        if self.distributed:
            flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self.group)  # every rank of the group agrees
            stop = bool(flag.item())
        self.stopped_early = stop

        digest = paths_digest(paths[:steps])
        row = {
            "epoch": epoch,
            "loss": loss_total / max(1.0, seen_total),
            "acc": correct_total / max(1.0, seen_total),
            # images forwarded per second over all ranks (a fair group forwards its batch K times)
            "images_per_sec": seen_total / max(elapsed, 1e-9),
            "rank_distance": distance,
            "lr": lr,
            "time_s": elapsed,
            "steps": steps,
            "start_epoch": self.start_epoch,
            "path_hashes": self._gather_digests(digest),
        }
        self.history.append(row)
        self.next_epoch = epoch + 1
        return row

    def _gather_digests(self, digest: str) -> list[str]:
        """Every rank's path digest, on every rank (so rank 0's report shows them all)."""
        if not self.distributed:
            return [digest]
        t = torch.zeros(self.world_size, dtype=torch.int64, device=self.device)
        t[self.rank] = int(digest, 16)
        dist.all_reduce(t, group=self.group)
        return [f"{v:015x}" for v in t.tolist()]


def _announced(batches: Iterable, epoch: int, on_step: Callable[[int, int], None]) -> Iterator:
    """The (step, batch) pairs of an epoch, calling ``on_step(epoch, step)`` before each."""
    for step, batch in batches:
        on_step(epoch, step)
        yield step, batch


# ============================================================================ Ray train loop

def _quiet_ray_train_logs() -> None:
    """Train V2 logs every report (our metrics carry the whole indicator table) and every
    checkpoint at INFO on each worker; rank 0's one progress line per epoch says it all."""
    import logging

    # No public switch quiets just these: ray.LoggingConfig sets one level for all of a
    # worker's loggers. So the loggers are named; a Ray without them leaves the noise.
    names = ["ray.train.v2._internal.execution.storage", "ray.train._internal.storage"]
    try:  # this module's logger is named after its file path
        from ray.train.v2._internal.execution import context as _ctx
        names.append(_ctx.__file__)
    except ImportError:  # another Ray release: its lines are noise, not an error
        pass
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)


def _train_loop_per_worker(config: dict) -> Optional[dict]:
    """Runs on every Ray Train worker."""
    import ray.train
    from ray.train import Checkpoint

    _quiet_ray_train_logs()
    register_ops(config.get("ops", {}))
    cfg: Config = config["cfg"]
    events = config.get("events")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    def emit(event: dict) -> None:
        if rank == 0:
            send(events, event)

    # supernet.seeds independent supernets side by side: seed g trains on the ranks
    # g*per .. (g+1)*per - 1, data-parallel within its own process group.
    seeds = cfg.supernet.seeds
    per = world // seeds
    index, group_rank = rank // per, rank % per
    group = None
    if seeds > 1 and per > 1:
        # new_group is collective: every rank creates every group, in the same order.
        groups = [dist.new_group(list(range(g * per, (g + 1) * per))) for g in range(seeds)]
        group = groups[index]

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:  # the newest intact one: a damaged file is named and skipped, not retried forever
        # Intact means every seed's file loads: all ranks must resume from the same epoch.
        _, states = load_intact(RunDir(config["run_uri"]), TRAIN_NAME, tuple(state_file(i) for i in range(seeds)),
                                first=checkpoint.path,
                                say=lambda line: emit({"kind": "note", "line": f"supernet: {line}"}))
        state = states[index] if states is not None else None

    if cfg.supernet.use_gpu:
        import ray.train.torch
        device = ray.train.torch.get_device()
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    splits = build_datasets(cfg.data, seed=cfg.seed)
    fault: Optional[FaultSpec] = config.get("fault")
    on_step = fault.injector(config["run_uri"], rank, train_dir=TRAIN_NAME, stage_dir=STAGE_DIR) if fault else None
    trainer = SupernetTrainer(cfg, splits, rank=group_rank, world_size=per, device=device, state=state,
                              space=config.get("space"), on_step=on_step, seed=seed_of(cfg, index), group=group,
                              on_progress=(lambda numbers: emit({"kind": "step", "epochs": cfg.supernet.epochs,
                                                                 **numbers})) if rank == 0 else None)
    epochs = cfg.supernet.epochs
    emit({"kind": "start", "start_epoch": trainer.next_epoch, "epochs": epochs, "world_size": world,
          "seeds": seeds, "lr": trainer.base_lr, "steps_per_epoch": trainer.steps_per_epoch,
          "resumed": state is not None, "stopped_early": trainer.stopped_early})

    for epoch in range(trainer.next_epoch, epochs):
        if trainer.stopped_early:
            break
        nonfinite = ""
        try:
            row = trainer.train_epoch(epoch)
            check_weights(trainer.model.state_dict(), epoch, row["lr"])
        except NonFinite as e:
            # Every rank of the group stops at the same step (the guard all-reduces within it).
            nonfinite = str(e) if index == 0 else f"{e} in seed {index}'s supernet"
        if seeds > 1:  # the other seeds' groups stop too: report() is a barrier for all ranks
            said: list = [None] * world
            dist.all_gather_object(said, nonfinite)
            nonfinite = next((m for m in said if m), "")
        if nonfinite:
            # Nothing is checkpointed; the driver turns rank 0's return value into one line.
            return {"nonfinite": nonfinite}
        seed_rows = _gather_seeds(trainer, index, group_rank, seeds, device) if seeds > 1 else None
        metrics = {**{k: (_finite_or_none(v) if isinstance(v, float) else v) for k, v in row.items()},
                   "stopped_early": trainer.stopped_early,
                   "indicator": _table_to_list(trainer.indicator_history[-1])}
        if seed_rows is not None:
            tables, losses, accs, stop = seed_rows
            # report() is a barrier for all ranks: the seeds stop together, once all are stable.
            trainer.stopped_early = stop
            agree = seed_agreement(tables)
            metrics.update(stopped_early=stop, seed_loss=losses, seed_acc=accs, seed_tau=_finite_or_none(agree["tau"]),
                           seed_tables=[_table_to_list(t) for t in tables])
        with tempfile.TemporaryDirectory(prefix="supernet-ckpt-") as d:
            ckpt = None
            if group_rank == 0:  # each seed's leader uploads its own state file into the one checkpoint
                torch.save(trainer.state_dict(), os.path.join(d, state_file(index)))
                ckpt = Checkpoint.from_directory(d)
            # A barrier: every rank calls it once per epoch.
            ray.train.report(metrics, checkpoint=ckpt)
        emit({"kind": "epoch", **{k: v for k, v in metrics.items() if k not in ("indicator", "seed_tables")},
              "epochs": epochs})


def _gather_seeds(trainer: SupernetTrainer, index: int, group_rank: int, seeds: int, device) -> tuple:
    """Every seed's final table, loss and accuracy of this epoch, and whether all seeds
    would stop: one all-reduce over all ranks, each group's leader filling its own slot."""
    table = trainer.indicator_history[-1]
    row = trainer.history[-1]
    L, K = table.shape
    buf = torch.zeros(seeds, L * K + 3, dtype=torch.float64, device=device)
    if group_rank == 0:
        buf[index, :L * K] = torch.as_tensor(table.reshape(-1), dtype=torch.float64)  # NaN stays NaN
        buf[index, L * K:] = torch.tensor([row["loss"], row["acc"], 1.0 if trainer.stopped_early else 0.0],
                                          dtype=torch.float64)
    dist.all_reduce(buf)
    buf = buf.cpu().numpy()
    tables = [buf[g, :L * K].reshape(L, K) for g in range(seeds)]
    return tables, buf[:, L * K].tolist(), buf[:, L * K + 1].tolist(), bool(buf[:, L * K + 2].min() > 0)


# ============================================================================ driver

class _ProgressRelay(Relay):
    """Rank 0's events (start, steps inside an epoch, epoch ends, notes) as console lines."""

    def __init__(self, progress: Progress):
        super().__init__(progress)
        self.starts: list[dict] = []
        self.epochs: list[dict] = []

    def handle(self, e: dict) -> None:
        if e["kind"] == "note":
            self.progress(e["line"])
            return
        n = e["epochs"]
        if e["kind"] == "step":
            # The stage's ETA: the rest of this epoch, then the epochs after it at this rate.
            per_step = e["elapsed"] / max(e["step"], 1)
            left = (e["steps"] - e["step"]) * per_step + (n - e["epoch"] - 1) * e["steps"] * per_step
            self.progress(f"supernet epoch {e['epoch'] + 1}/{n} {meter(e['step'], e['steps'], e['elapsed'])}  "
                          f"loss {e['loss']:.4f}  acc {100 * e['acc']:.1f}%  {e['images_per_sec']:.0f} img/s  "
                          f"stage ETA {eta(left)}")
            return
        if e["kind"] == "start":
            self.starts.append(e)
            if e["stopped_early"] or e["start_epoch"] >= n:
                self.progress(f"supernet: checkpoint already at epoch {e['start_epoch']}/{n}; nothing left to train")
            elif e["resumed"]:
                self.progress(f"supernet: resuming at epoch {e['start_epoch'] + 1}/{n} from the checkpoint of "
                              f"epoch {e['start_epoch']}/{n} ({e['world_size']} workers)")
            else:
                seeds = e.get("seeds", 1)
                how = (f"{seeds} supernets (seeds) on {e['world_size'] // seeds} worker(s) each" if seeds > 1
                       else f"{e['world_size']} workers")
                self.progress(f"supernet: training {n} epochs, {how}, "
                              f"{e['steps_per_epoch']} steps/epoch, lr {e['lr']:.4g}")
        else:
            self.epochs.append(e)
            dist_txt = "-" if e["rank_distance"] is None else f"{e['rank_distance']:.3f}"
            tau = e.get("seed_tau")
            seed_txt = "" if "seed_tau" not in e else f"  seed-tau {'-' if tau is None else f'{tau:+.2f}'}"
            self.progress(f"supernet epoch {e['epoch'] + 1}/{n}  loss {e['loss']:.4f}  acc {100 * e['acc']:.1f}%  "
                          f"{e['images_per_sec']:.0f} img/s  rank-dist {dist_txt}{seed_txt}  lr {e['lr']:.4g}  "
                          f"({e['time_s']:.1f} s)")
            if e["stopped_early"]:
                self.progress(f"supernet: op ranking stable for the configured patience; stopping after "
                              f"epoch {e['epoch'] + 1}/{n}")


def _check_resources(per_worker: dict[str, float], num_workers: int) -> None:
    """Fail fast on workers the cluster can never run.

    Ray 2.60 only checks this against an autoscaler's cluster config; on a fixed
    cluster (and a local ray.init) it waits 60 s for the placement group, then retries
    forever (controller_failure_limit=-1): a hang, not an error.
    """
    short = resource_shortfall(per_worker, num_workers)
    if short is None:
        return
    wants = ", ".join(f"{v:g} {k}" for k, v in short.need.items())
    # Enough in total but not on any one node: say so, or the numbers would look fine.
    has = ", ".join(f"{short.cluster[k]:g} {k}" + (f" but at most {short.largest_node[k]:g} on one node"
                                                    if short.cluster[k] >= v else "")
                    for k, v in short.need.items())
    raise PipelineError(
        f"supernet training needs {wants} ({num_workers} workers x {per_worker}) "
        f"but the Ray cluster has {has}; lower supernet.num_workers / supernet.cpus_per_worker, "
        f"set supernet.use_gpu=false, or join a bigger cluster (ray.address)")


def _run_meta(space: SearchSpace, cfg: Config) -> dict:
    return {"fingerprint": space.fingerprint, "space": space.name, "mode": cfg.supernet.mode,
            "seeds": cfg.supernet.seeds}


def _check_run_meta(run: RunDir, space: SearchSpace, cfg: Config) -> None:
    """Refuse to resume checkpoints of another space or training mode in this run dir.

    The workers would refuse too (the checkpoint carries fingerprint and mode), but only
    after Ray started them, and each refusal would count as a failure to retry.
    """
    if not run.exists(RUN_META):
        return
    old, new = run.read_json(RUN_META), _run_meta(space, cfg)
    if (old.get("fingerprint"), old.get("mode"), old.get("seeds", 1)) != (new["fingerprint"], new["mode"], new["seeds"]):
        raise PipelineError(
            f"{run.uri} holds a supernet of space {old.get('space')!r} ({old.get('fingerprint')}) mode "
            f"{old.get('mode')!r} with {old.get('seeds', 1)} seed(s), but this config asks for {new['space']!r} "
            f"({new['fingerprint']}) mode {new['mode']!r} with {new['seeds']}; use another run dir")


def space_name(cfg: Config) -> str:
    """The space's name without building anything (the finished-stage check must be cheap)."""
    from search_spaces import get_space

    return get_space(cfg.space.name).name


def train_supernet(cfg: Config, run: RunDir, progress: Progress = print) -> dict:
    """Stage 1. Returns the contents of ``supernet/result.json`` (see module doc)."""
    # Finished means the result *and* every output it stands for: after a damaged one is
    # deleted (as its CorruptFileError message says), the stage rewrites them from the
    # latest checkpoint (or trains again if that is gone too).
    if all(run.exists(rel) for rel in (RESULT, FINAL, HISTORY, INDICATORS)):
        result = run.read_json(RESULT)
        if (result.get("space"), result.get("mode")) != (space_name(cfg), cfg.supernet.mode):
            raise PipelineError(
                f"{run.uri} holds a finished supernet of space {result.get('space')!r} mode {result.get('mode')!r}, "
                f"but this config asks for {space_name(cfg)!r} mode {cfg.supernet.mode!r}; use another run dir")
        if cfg.supernet.epochs <= result["epochs_run"] or result["stopped_early"]:
            progress(f"supernet: already trained ({result['epochs_run']} epochs) in {run.uri}; skipping")
            return result
        # More epochs asked of a finished stage: continue from its last checkpoint. With
        # schedule=constant this is exactly the longer run; a decaying schedule is
        # re-planned over the new total from where it stands.
        progress(f"supernet: extending the finished {result['epochs_run']}-epoch run to {cfg.supernet.epochs} epochs")

    t0 = time.time()
    sc = cfg.supernet
    # Loading the data here first gives a clear DataError before any worker starts, and
    # unpacks/downloads once instead of once per worker.
    splits = build_datasets(cfg.data, seed=cfg.seed)
    info = splits.info
    space = resolve_space(cfg, info.in_channels, info.num_classes, info.image_size)
    if sc.seeds < 1 or sc.num_workers % sc.seeds:
        raise PipelineError(f"supernet.num_workers={sc.num_workers} must be a multiple of supernet.seeds={sc.seeds}")
    per_seed = sc.num_workers // sc.seeds  # each seed's supernet sees the whole split on its workers
    if len(splits.train) // per_seed < sc.batch_size:
        raise PipelineError(
            f"the training split has {len(splits.train)} images, fewer than one global batch "
            f"(supernet.batch_size={sc.batch_size} x {per_seed} workers per seed); "
            f"lower the batch size or use more data (data.fraction)")
    if sc.gamma_init == 0 and sc.mode != "all" and space.shortcut != "pad":
        raise PipelineError(
            f"supernet.gamma_init=0 with space {space.name!r} would train nothing: without a shortcut in every "
            "layer an op whose scored gamma is 0 passes no signal and no gradient; add 'shortcut: pad' to the "
            "space (as mobilenet_small_res has) or set supernet.gamma_init=1.0 (the paper's)")
    _check_run_meta(run, space, cfg)  # before Ray starts: a wrong run dir fails in a second
    # The search budget depends on the space alone: an impossible one fails now, not after training.
    make_budgets(cfg.search, space).check_feasible()

    ensure_ray(cfg)
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Spelled out (Ray would add the GPU itself), so that the check asks for what Ray will.
    per_worker = {"CPU": sc.cpus_per_worker, **({"GPU": 1.0} if sc.use_gpu else {})}
    _check_resources(per_worker, sc.num_workers)
    scaling = ScalingConfig(num_workers=sc.num_workers, use_gpu=sc.use_gpu, resources_per_worker=per_worker)
    run_config = RunConfig(
        name=TRAIN_NAME, storage_path=run.storage_path,
        checkpoint_config=CheckpointConfig(num_to_keep=sc.checkpoints_to_keep),
        failure_config=FailureConfig(max_failures=sc.max_failures),
    )
    if not cluster_address(cfg):
        # One machine of its own: Train's preemption watcher (an extra actor, and an E-line
        # on every start) watches for spot nodes being drained, which only a cluster has;
        # and polling the workers every 0.5 s instead of 2 s registers each epoch's report,
        # and the end, sooner (BENCHMARKS.md §8). Ray passes both on to its controller.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    progress(f"supernet: starting {sc.num_workers} Ray Train worker(s), {sc.cpus_per_worker:g} CPU"
             f"{' + 1 GPU' if sc.use_gpu else ''} each")
    # Written once training is about to produce checkpoints (not on a failed resource check).
    run.write_json(RUN_META, _run_meta(space, cfg))
    with _ProgressRelay(progress) as relay:
        trainer = TorchTrainer(
            _train_loop_per_worker,
            # The test-only fault is read here, once: workers' environment is fixed when Ray starts.
            train_loop_config={"cfg": cfg, "run_uri": run.uri, "events": relay.queue,
                               "fault": FaultSpec.from_env(), "space": space, "ops": space_ops(space)},
            scaling_config=scaling, run_config=run_config)
        try:
            result = trainer.fit()
        except ray.train.TrainingFailedError as e:
            raise PipelineError(
                f"supernet training failed ({one_line(e, last_line=True)}) after {sc.max_failures} restarts; fix the cause and rerun the "
                f"same command to resume from the latest checkpoint in {run.uri}/{TRAIN_NAME}") from None

    nonfinite = (getattr(result, "return_value", None) or {}).get("nonfinite")
    if nonfinite:
        raise PipelineError(f"supernet training stopped: {nonfinite}; nothing was saved as finished; lower "
                            "supernet.lr (or check the data) and start again in a new --run-dir")
    if result.checkpoint is None:
        raise PipelineError(f"supernet training ended without a checkpoint in {run.uri}/{TRAIN_NAME}; rerun it")
    states = [read_stage_output(run, f"{TRAIN_NAME}/{os.path.basename(result.checkpoint.path)}/{state_file(i)}")
              for i in range(sc.seeds)]
    start_epoch = relay.starts[0]["start_epoch"] if relay.starts else int(states[0]["epoch"])
    return _write_outputs(run, states, cfg, space, start_epoch=start_epoch, elapsed=time.time() - t0,
                          checkpoint_path=result.checkpoint.path, progress=progress)


def _write_outputs(run: RunDir, states: list[dict], cfg: Config, space: SearchSpace, *, start_epoch: int,
                   elapsed: float, checkpoint_path: str, progress: Progress) -> dict:
    """Stage 1's files from the seeds' final states (``states[0]`` is the run's own seed).

    The search scores the seeds' mean table; each seed's table and the seeds' agreement
    (``ranking.seed_agreement``, per epoch and at the end) say whether it is signal.
    """
    import pandas as pd

    state = states[0]
    history = state["history"]
    per_seed = [s["indicator_history"] for s in states]  # [seed][epoch] -> table
    tables = [np.mean([h[e] for h in per_seed], axis=0) for e in range(len(per_seed[0]))]
    agreement = [seed_agreement([h[e] for h in per_seed]) for e in range(len(per_seed[0]))]
    final_agreement = agreement[-1] if agreement else seed_agreement([])
    run.write_torch(FINAL, {
        "space": space.to_dict(),
        "fingerprint": space.fingerprint,
        "mode": state["mode"],
        "epoch": state["epoch"],
        "model": state["model"],  # seed 0's supernet (what the acc indicator recalibrates)
        "indicator": tables[-1] if tables else None,  # the seeds' mean: what the search scores
        "indicator_history": tables,
        "indicator_seeds": [h[-1] for h in per_seed] if tables else [],
        "seed_models": [s["model"] for s in states[1:]],
    })
    rows = [{**{k: r.get(k) for k in ("epoch", "loss", "acc", "images_per_sec", "rank_distance", "lr", "time_s",
                                      "steps", "start_epoch", "path_hashes")},
             "seed_tau": agreement[e]["tau"] if e < len(agreement) else math.nan,
             "seed_acc": [s["history"][e]["acc"] for s in states]} for e, r in enumerate(history)]
    run.write_parquet(HISTORY, pd.DataFrame(rows))
    layers = space.layers

    def long(tables_by_epoch, **extra):
        return [{**extra, "epoch": e, "layer": l, "choice": k, "op": layers[l].ops[k], "score": float(t[l, k])}
                for e, t in enumerate(tables_by_epoch) for l in range(t.shape[0]) for k in range(t.shape[1])
                if k < len(layers[l].ops) and np.isfinite(t[l, k])]

    run.write_parquet(INDICATORS, pd.DataFrame(long(tables), columns=["epoch", "layer", "choice", "op", "score"]))
    run.write_parquet(SEED_INDICATORS, pd.DataFrame(
        [row for i, h in enumerate(per_seed) for row in long(h, seed=i)],
        columns=["seed", "epoch", "layer", "choice", "op", "score"]))

    last = history[-1] if history else {}
    result = {
        "epochs_run": int(state["epoch"]),
        "epochs_requested": cfg.supernet.epochs,
        "stopped_early": bool(state["stopped_early"]),
        "start_epoch": int(start_epoch),
        "final": {k: _finite_or_none(last.get(k)) for k in ("loss", "acc", "images_per_sec", "rank_distance", "lr")},
        "fingerprint": space.fingerprint,
        "space": space.name,
        "mode": state["mode"],
        "sampler": cfg.supernet.sampler,
        "num_workers": cfg.supernet.num_workers,
        "seeds": len(states),
        "seed_final": [{k: _finite_or_none(s["history"][-1].get(k)) for k in ("loss", "acc")} if s["history"] else {}
                       for s in states],
        "seed_agreement": _json_agreement(final_agreement),
        "train_time_s": float(sum(r["time_s"] for r in history)),
        "elapsed_s": elapsed,
        "checkpoint": checkpoint_path,
    }
    run.write_json(RESULT, result)  # last: marks the stage done
    progress(f"supernet: done, {result['epochs_run']} epochs ({elapsed:.0f} s); wrote {run.uri}/{STAGE_DIR}/")
    progress(f"supernet: {agreement_line(result['seed_agreement'], 'BN indicator')}")
    return result


def _json_agreement(a: dict) -> dict:
    return {**{k: _finite_or_none(v) if isinstance(v, float) else v for k, v in a.items() if k != "per_layer"},
            "ci95": [_finite_or_none(v) for v in a["ci95"]],
            "per_layer": {str(l): _finite_or_none(v) for l, v in a["per_layer"].items()}}


# ============================================================================ for stage 2

def load_supernet(run: RunDir) -> dict:
    """The trained supernet of stage 1 (``supernet/final.pt``), tensors on CPU.

    final.pt is written atomically, so its presence means stage 1 produced it whole.
    """
    final = read_stage_output(run, FINAL, f"no trained supernet at {run.path(FINAL)}; run stage 1 (train_supernet) first")
    missing = [k for k in ("space", "fingerprint", "model") if not isinstance(final, dict) or k not in final]
    if missing:
        raise PipelineError(f"{run.path(FINAL)} lacks {', '.join(missing)}; "
                            "it was not written by stage 1: rerun stage 1 in a fresh run_dir")
    return final


def supernet_from_final(final: dict) -> Supernet:
    """Rebuild the trained Supernet module from ``load_supernet``'s dict."""
    space = space_from_dict(final["space"], source="supernet/final.pt")
    model = Supernet(space)
    model.load_state_dict(final["model"])
    freeze(model, final["mode"])
    return model
