"""One typed configuration for the whole pipeline.

Every knob of every stage lives here, grouped by stage. A config is loaded from YAML,
then ``--set section.key=value`` overrides are applied, then it is validated before
anything runs. Validation errors are ``ConfigError`` with one line that names the key
and says what to do; ``pipeline.run`` turns them into exit code 2.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from search_spaces.yaml_file import load_yaml_mapping


class ConfigError(ValueError):
    """A configuration problem, phrased as one line for the user."""


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # fashion_mnist | cifar10 | imagefolder | synthetic
    root: str = "~/.cache/bnnas/data"  # where datasets are (or get downloaded to)
    download: bool = True  # torchvision download when online; offline falls back to Debian's files
    val_size: int = 5000  # held out of the training set; the test set is only for final numbers
    fraction: float = 1.0  # use this fraction of train (and val) for quick runs
    image_size: int = 0  # 0: the dataset's native size (imagefolder needs a value)
    augment: bool = False  # crop + flip; hurts short runs (3 retraining epochs: 91.2% test without, 89.8% with)
    num_workers: int = 0  # DataLoader workers; 0 keeps 2-core laptops responsive
    synthetic_train: int = 2048  # synthetic only: seeded class patterns a network can learn (tests)
    synthetic_test: int = 512  # synthetic only
    synthetic_classes: int = 4  # synthetic only
    synthetic_size: int = 16  # synthetic only: image side in pixels
    synthetic_channels: int = 3  # synthetic only


@dataclass
class SpaceConfig:
    # A built-in space name or a path to a space YAML file. The default's shortcut lets a
    # BN-only supernet learn (BENCHMARKS.md section 7); the paper's plain space: --config bnnas_paper.
    name: str = "mobilenet_small_res"


@dataclass
class SupernetConfig:
    # bn_last is the authors' code, bn_all the paper's text; the default trains every BN,
    # which learnt most in the recipe search (BENCHMARKS.md section 7).
    mode: Literal["bn_last", "bn_all", "all"] = "bn_all"
    sampler: Literal["uniform", "fair"] = "uniform"  # fair = FairNAS strict fairness
    epochs: int = 1  # per seed; 2 seeds x 1 epoch cost what 1 seed x 2 epochs did
    batch_size: int = 128  # per worker
    lr: float = 0.25  # authors' lr for batch 512; scaled linearly with the global batch
    momentum: float = 0.9
    weight_decay: float = 4e-5  # never applied to BN parameters
    schedule: Literal["linear", "cosine", "constant"] = "linear"  # authors': linear; constant lets a run be extended exactly
    warmup_epochs: float = 0.0
    label_smoothing: float = 0.1
    grad_clip: float = 5.0  # 0 disables clipping
    num_workers: int = 2  # Ray Train workers (data-parallel ranks)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    channels_last: bool = True  # faster depthwise convs on CPU (about 1.5-2x here) and GPU
    checkpoints_to_keep: int = 2
    max_failures: int = 3  # worker-group restarts from the latest checkpoint
    stable_patience: int = 0  # stop once ranking distance <= stable_tol this many epochs; 0 = off
    stable_tol: float = 0.0
    # Independent supernets (init, paths, data order), num_workers / seeds workers each: the
    # search uses their mean table, and their agreement says whether the ranking is signal.
    seeds: int = 2
    # Initial gamma of every op's scored (last) BN (torch's default and the paper: 1). 0 with
    # a shortcut in every layer: every path starts as the same function.
    gamma_init: float = 0.0
    # bn_last / bn_all: train the head's FC too. The authors keep it frozen at random init,
    # which caps the logits (SD 0.11) and reads every path through one random basis.
    train_classifier: bool = True


@dataclass
class SearchConfig:
    indicator: str = "bn"  # bn (BN-NAS) | acc (SPOS: recalibrated validation accuracy)
    # bn cannot score identity (no BN): a space where identity competes with ops is refused
    # under bn unless this is true, and then identity scores 0 (the search counts layers).
    identity_scores_zero: bool = False
    method: Literal["evolution", "exact", "both"] = "both"
    max_flops: float = 5.0e6  # multiply-adds; 0 = no limit (10% of mobilenet_small at 28 px; cheap to retrain)
    min_flops: float = 0.0
    max_params: float = 0.0  # 0 = no limit
    min_params: float = 0.0
    latency_table: str = ""  # optional .npy/.csv [layers x choices] of ms, budget max_latency
    max_latency: float = 0.0
    population: int = 50  # paper's evolutionary settings
    generations: int = 20
    parents: int = 10
    mutations: int = 25
    crossovers: int = 25
    mutation_prob: float = 0.1
    top_n: int = 2  # architectures handed to retraining (2 = one per core on a laptop)
    num_actors: int = 2  # Ray scorer actors
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    batch_archs: int = 25  # architectures per actor call
    # An additive indicator (bn) scores a search of at most this many architectures
    # (population x generations) in the driver: its table lookups take microseconds, and
    # starting actors seconds. 0 = always on the actors.
    driver_max_archs: int = 1_000_000
    calib_batches: int = 20  # acc indicator: BN recalibration batches (SPOS used 200)
    val_batches: int = 10  # acc indicator: validation batches per architecture


@dataclass
class RetrainConfig:
    epochs: int = 3  # max_t of ASHA; 3 keeps the default run near 10 minutes on 2 cores
    batch_size: int = 128
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    scheduler: Literal["asha", "sync"] = "asha"  # asha: async, freed CPUs to survivors; sync: reproducible (docs/reliability.md)
    grace_period: int = 1  # epochs before a trial may be stopped (the first rung)
    reduction_factor: int = 2
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0 = as many as resources allow
    max_failures: int = 2  # per trial, resumes from its checkpoint


@dataclass
class RayConfig:
    address: str = ""  # "" starts Ray locally; "auto" or host:port joins a cluster
    num_cpus: int = 0  # local Ray only; 0 = all cores


@dataclass
class Config:
    seed: int = 0  # fixes every random choice in every stage
    run_dir: str = "runs/default"  # local path or pyarrow URI (s3://bucket/path)
    progress_s: float = 10.0  # seconds between progress lines inside an epoch (0: every step)
    data: DataConfig = field(default_factory=DataConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    supernet: SupernetConfig = field(default_factory=SupernetConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    ray: RayConfig = field(default_factory=RayConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- loading

def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return None if value is None else _coerce(value, args[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            # torch and numpy take 64-bit integers (seeds, counts); a larger one fails deep inside them.
            if not -2**63 <= value < 2**63:
                raise ConfigError(f"{key}: {value} does not fit in 64 bits; use a smaller integer")
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value) if abs(value) < 2**1023 else math.inf
        elif isinstance(value, str):  # YAML 1.1 reads 5e6 (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # .inf, .nan, 1e400: no setting means any of them
            raise ConfigError(f"{key}: expected a finite number, got {value!r}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(
            f"unknown key {where}{unknown[0]}; known keys here: {', '.join(sorted(known))}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name], key)
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, key)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set supernet.epochs=4")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def load_config(path: Optional[str | Path] = None, overrides: list[str] = ()) -> Config:
    """Load YAML (or the defaults), apply ``key=value`` overrides, validate."""
    data: dict = {}
    if path is not None:
        data = load_yaml_mapping(path, what="config file", error=ConfigError,
                                 holds="sections such as data, supernet, search",
                                 if_missing="pass an existing YAML file to --config", empty_ok=True)
    for item in overrides:
        keys, value = _parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item}: {k} is not a section")
        node[keys[-1]] = value
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def validate(cfg: Config) -> None:
    """Impossible values, each as one line naming the key."""
    d, s, q, r = cfg.data, cfg.supernet, cfg.search, cfg.retrain
    _check(cfg.seed >= 0, "seed must be >= 0")
    _check(bool(cfg.run_dir.strip()), "run_dir must not be empty; pass --run-dir PATH")
    _check(d.name in ("fashion_mnist", "cifar10", "imagefolder", "synthetic"),
           f"data.name: unknown dataset {d.name!r}; use fashion_mnist, cifar10, imagefolder or synthetic")
    _check(0.0 < d.fraction <= 1.0, f"data.fraction must be in (0, 1], got {d.fraction}")
    _check(d.val_size >= 1, f"data.val_size must be >= 1, got {d.val_size}")
    _check(d.image_size >= 0, f"data.image_size must be >= 0, got {d.image_size}")
    _check(d.name != "imagefolder" or d.image_size > 0, "data.image_size must be set (e.g. 224) for imagefolder")
    _check(d.num_workers >= 0, f"data.num_workers must be >= 0, got {d.num_workers}")
    for k in ("synthetic_train", "synthetic_test", "synthetic_classes", "synthetic_size", "synthetic_channels"):
        _check(getattr(d, k) >= 1, f"data.{k} must be >= 1, got {getattr(d, k)}")
    _check(d.synthetic_classes >= 2, "data.synthetic_classes must be >= 2")
    _check(d.name != "synthetic" or d.val_size < d.synthetic_train,
           f"data.val_size={d.val_size} must be below data.synthetic_train={d.synthetic_train}")
    _check(bool(cfg.space.name), "space.name must name a built-in space or a YAML file")
    _check(s.epochs >= 1, f"supernet.epochs must be >= 1, got {s.epochs}")
    _check(s.batch_size >= 1, f"supernet.batch_size must be >= 1, got {s.batch_size}")
    _check(s.lr > 0, f"supernet.lr must be > 0, got {s.lr}")
    _check(0 <= s.momentum < 1, f"supernet.momentum must be in [0, 1), got {s.momentum}")
    _check(s.weight_decay >= 0, "supernet.weight_decay must be >= 0")
    _check(s.warmup_epochs >= 0, "supernet.warmup_epochs must be >= 0")
    _check(0 <= s.label_smoothing < 1, "supernet.label_smoothing must be in [0, 1)")
    _check(s.grad_clip >= 0, "supernet.grad_clip must be >= 0 (0 disables)")
    _check(s.num_workers >= 1, f"supernet.num_workers must be >= 1, got {s.num_workers}")
    _check(s.cpus_per_worker > 0, "supernet.cpus_per_worker must be > 0")
    _check(s.checkpoints_to_keep >= 1, "supernet.checkpoints_to_keep must be >= 1")
    _check(s.max_failures >= 0, "supernet.max_failures must be >= 0")
    _check(s.stable_patience >= 0, "supernet.stable_patience must be >= 0 (0 disables early stop)")
    _check(0 <= s.stable_tol <= 1, "supernet.stable_tol must be in [0, 1]")
    _check(s.seeds >= 1, f"supernet.seeds must be >= 1, got {s.seeds}")
    _check(0 <= s.gamma_init < float("inf"), f"supernet.gamma_init must be finite and >= 0, got {s.gamma_init}")
    _check(s.num_workers % s.seeds == 0,
           f"supernet.num_workers={s.num_workers} must be a multiple of supernet.seeds={s.seeds} "
           "(each seed trains on num_workers / seeds workers): change one of them, or set supernet.seeds=1 "
           "to train one supernet without the reproducibility check")
    _check(q.method in ("evolution", "exact", "both"), "search.method must be evolution, exact or both")
    for k in ("max_flops", "min_flops", "max_params", "min_params", "max_latency"):
        _check(getattr(q, k) >= 0, f"search.{k} must be >= 0 (0 means no limit)")
    _check(not q.max_flops or q.min_flops <= q.max_flops, "search.min_flops must not exceed search.max_flops")
    _check(not q.max_params or q.min_params <= q.max_params, "search.min_params must not exceed search.max_params")
    _check(not q.max_latency or bool(q.latency_table), "search.max_latency needs search.latency_table")
    for k in ("population", "generations", "parents", "top_n", "num_actors", "batch_archs"):
        _check(getattr(q, k) >= 1, f"search.{k} must be >= 1, got {getattr(q, k)}")
    _check(q.parents <= q.population, "search.parents must not exceed search.population")
    _check(q.mutations >= 0 and q.crossovers >= 0, "search.mutations and search.crossovers must be >= 0")
    _check(q.driver_max_archs >= 0, "search.driver_max_archs must be >= 0 (0 = always score on the actors)")
    _check(0 <= q.mutation_prob <= 1, "search.mutation_prob must be in [0, 1]")
    _check(q.cpus_per_actor > 0 and q.gpus_per_actor >= 0, "search.cpus_per_actor must be > 0, gpus_per_actor >= 0")
    _check(q.calib_batches >= 1 and q.val_batches >= 1, "search.calib_batches and val_batches must be >= 1")
    _check(r.epochs >= 1, f"retrain.epochs must be >= 1, got {r.epochs}")
    _check(r.batch_size >= 1, "retrain.batch_size must be >= 1")
    _check(r.lr > 0, "retrain.lr must be > 0")
    _check(1 <= r.grace_period <= r.epochs, "retrain.grace_period must be between 1 and retrain.epochs")
    _check(r.reduction_factor >= 2, "retrain.reduction_factor must be >= 2")
    _check(r.cpus_per_trial > 0 and r.gpus_per_trial >= 0, "retrain.cpus_per_trial must be > 0, gpus_per_trial >= 0")
    _check(r.max_concurrent >= 0, "retrain.max_concurrent must be >= 0 (0 = as resources allow)")
    _check(r.scheduler != "sync" or r.max_concurrent == 0,
           "retrain.max_concurrent applies to retrain.scheduler=asha only; with sync the trials of a rung run "
           "as resources allow (lower it with retrain.cpus_per_trial), so set retrain.max_concurrent=0")
    _check(cfg.ray.num_cpus >= 0, "ray.num_cpus must be >= 0")
    _check(cfg.progress_s >= 0, "progress_s must be >= 0 (seconds between progress lines; 0 = every step)")


def diff_configs(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ, as 'key: old -> new' lines (for refusing a changed rerun)."""
    out = []
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_configs(a, b, key + ".")
        elif a != b:
            out.append(f"{key}: {a!r} -> {b!r}")
    return out
