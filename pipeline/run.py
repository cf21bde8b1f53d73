"""python -m pipeline.run: the whole BN-NAS search in one command.

    config (YAML + --set overrides, validated)  ->  run directory (locked, config saved)
      -> stage 1 train_supernet  -> stage 2 search  -> stage 3 retrain  -> report

Every stage skips when its finished output is in the run directory and resumes from
its Ray checkpoints when only partial output is, so rerunning the same command after
any interruption continues the run. Bad input of any kind ends with one line on
stderr and exit code 2, before anything in the run directory is touched.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from importlib import resources
from pathlib import Path

import yaml

from search_spaces import ArchitectureError, OpError, SpaceError, get_space

from .common import PipelineError, ensure_ray
from .config import Config, ConfigError, diff_configs, load_config
from .data import DataError
from .storage import RunDir, StorageError

# Keys that say how to run, not what to compute: they may change between reruns of one
# run directory (a resumed run may land on another cluster, with more actors).
OPERATIONAL = {
    "run_dir", "progress_s", "ray.address", "ray.num_cpus", "data.root", "data.download", "data.num_workers",
    "search.num_actors", "search.cpus_per_actor", "search.gpus_per_actor", "search.batch_archs",
    "search.driver_max_archs",
    "retrain.cpus_per_trial", "retrain.gpus_per_trial", "retrain.max_concurrent", "retrain.max_failures",
    "supernet.checkpoints_to_keep", "supernet.max_failures",
}
ALL_STAGES = ("supernet", "search", "retrain", "report")
USER_ERRORS = (ConfigError, SpaceError, ArchitectureError, OpError, PipelineError, StorageError, DataError)


def shipped_configs() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("pipeline.configs").iterdir() if p.name.endswith(".yaml"))


def resolve_config_path(name: str | None) -> str | None:
    """A YAML path, or the name of a shipped config (pipeline/configs/NAME.yaml)."""
    if name is None or Path(name).exists() or name.endswith((".yaml", ".yml")):
        return name
    shipped = resources.files("pipeline.configs") / f"{name}.yaml"
    if shipped.is_file():
        return str(shipped)
    raise ConfigError(f"config {name!r} is neither a file nor a shipped config ({', '.join(shipped_configs())})")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipeline.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help=f"YAML file or shipped config name ({', '.join(shipped_configs())})")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set supernet.epochs=4 (repeatable)")
    p.add_argument("--run-dir", help="run directory: local path or URI (s3://bucket/path)")
    p.add_argument("--num-workers", type=int, help="Ray Train workers for the supernet (supernet.num_workers)")
    p.add_argument("--use-gpu", action="store_true", help="GPUs for training, search actors and trials")
    p.add_argument("--address", help="Ray cluster to join ('auto' or host:port); default: RAY_ADDRESS or local")
    p.add_argument("--force", action="store_true", help="continue a run directory whose saved config differs")
    p.add_argument("--stages", default="supernet,search,retrain,report",
                   help="comma-separated subset of supernet,search,retrain,report")
    return p.parse_args(argv)


def _not_empty(args: argparse.Namespace) -> None:
    """An argument given as "" (an unset shell variable, a stray comma) is refused, not skipped."""
    fix = {"config": "a YAML file or a shipped config name", "run_dir": "a directory path or URI",
           "address": "'auto' or host:port, or leave it out to run locally"}
    for key, what in fix.items():
        value = getattr(args, key)
        if value is not None and not value.strip():
            raise ConfigError(f"--{key.replace('_', '-')} is empty; pass {what}")


def parse_stages(text: str) -> list[str]:
    stages = [s.strip() for s in text.split(",") if s.strip()]
    if not stages:
        raise ConfigError(f"--stages {text!r} names no stage; use a comma-separated subset of {','.join(ALL_STAGES)}")
    unknown = set(stages) - set(ALL_STAGES)
    if unknown:
        raise ConfigError(f"--stages: unknown stage {sorted(unknown)[0]!r}; use {','.join(ALL_STAGES)}")
    return stages


def build_config(args: argparse.Namespace) -> Config:
    _not_empty(args)
    overrides = list(args.overrides)
    if args.run_dir is not None:
        overrides.append(f"run_dir={args.run_dir}")
    if args.num_workers is not None:
        overrides.append(f"supernet.num_workers={args.num_workers}")
    if args.use_gpu:
        overrides += ["supernet.use_gpu=true", "retrain.gpus_per_trial=1"]
    if args.address:
        overrides.append(f"ray.address={args.address}")
    cfg = load_config(resolve_config_path(args.config), overrides)
    space = get_space(cfg.space.name)  # an unknown space or a broken space file fails before any work
    check_ops(space)
    from .search.indicators import get_indicator

    get_indicator(cfg.search.indicator).check_space(space, cfg.search)  # e.g. bn on a free-depth space
    return cfg


def check_ops(space) -> None:
    """Build the space's supernet once on the meta device (no memory; milliseconds).

    An op BN-NAS cannot score (no trailing affine BatchNorm) raises OpError here, before
    Ray starts or the run dir is touched, instead of inside the Ray Train workers later.
    """
    import torch

    from search_spaces import Supernet

    with torch.device("meta"):
        Supernet(space)


def check_saved_config(run: RunDir, cfg: Config, force: bool) -> None:
    """Refuse to continue a run directory with a different configuration."""
    if not run.exists("config.yaml"):
        return
    try:
        saved = yaml.safe_load(run.read_text("config.yaml")) or {}
    except yaml.YAMLError:
        raise PipelineError(f"{run.uri}/config.yaml is corrupt; delete it or use another --run-dir") from None
    diffs = [d for d in diff_configs(saved, cfg.to_dict()) if d.split(":")[0] not in OPERATIONAL]
    if diffs and not force:
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise PipelineError(f"run dir {run.uri} holds another configuration ({shown}); "
                            "use another --run-dir, or --force to continue it with this one")


# What the report draws from (docs/architecture.md); with none of it there is nothing to report.
REPORT_INPUTS = ("supernet/result.json", "supernet/history.parquet", "supernet/indicators.parquet",
                 "search/result.json", "search/scored.parquet", "search/topn.parquet", "retrain/result.json",
                 "retrain/trials.parquet", "retrain/history.parquet", "retrain_tune")


def check_reportable(run: RunDir) -> None:
    if not any(run.exists(rel) for rel in REPORT_INPUTS):
        raise PipelineError(f"nothing to report in {run.uri}: no stage has written output there yet; run the "
                            "stages first (--stages supernet,search,retrain,report) or pass the run dir that has them")


STAGES = {  # stage -> (module, function); imported lazily so a report-only run needs no Ray
    "supernet": ("train_supernet", "train_supernet"),
    "search": ("search", "run_search"),
    "retrain": ("retrain", "run_retrain"),
}


def run_pipeline(cfg: Config, run: RunDir, stages: list[str], progress=print) -> dict[str, float]:
    timings: dict[str, float] = {}
    for name, (module, function) in STAGES.items():
        if name in stages:
            progress(f"== stage {name}")
            t0 = time.time()
            getattr(importlib.import_module(f"pipeline.{module}"), function)(cfg, run, progress)
            timings[name] = time.time() - t0
    if "report" in stages:
        from .report import format_summary, write_report

        written = write_report(run, timings=timings)
        progress(format_summary(run, timings))
        progress(f"report: {run.uri}/report/ ({len(written.get('written', []))} files)")
    return timings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run, created, fresh = None, [], False
    try:
        cfg = build_config(args)
        stages = parse_stages(args.stages)
        run = RunDir(cfg.run_dir)
        created = run.prepare()  # a path that cannot hold a run dir fails here, leaving nothing
        fresh = bool(created) or not run.listdir()
        with run.lock():
            check_saved_config(run, cfg, args.force)
            if stages == ["report"]:
                check_reportable(run)
            if set(stages) - {"report"}:
                ensure_ray(cfg)  # an unreachable cluster fails before the run dir is written
            run.write_text("config.yaml", cfg.to_yaml())
            print(f"bnnas: run dir {run.uri} (space {cfg.space.name}, data {cfg.data.name}, seed {cfg.seed})")
            run_pipeline(cfg, run, stages)
    except USER_ERRORS as e:
        # A new run dir that a stage refused before writing anything (data, resources,
        # budgets) is taken away again: no .lock and config.yaml of a run that never was.
        if fresh:
            run.discard_if_bare(created)
        print(f"bnnas: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bnnas: interrupted; rerun the same command to continue from the last checkpoint", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
