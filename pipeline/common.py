"""Small pieces every stage shares: Ray start-up and resource checks, the space for a
dataset, reading another stage's output."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from search_spaces import OPS, SearchSpace, get_space, register_op

from .config import Config
from .storage import RunDir, StorageError

Progress = Callable[[str], None]


class PipelineError(RuntimeError):
    """A user-facing failure: one line naming the problem and what to do."""


def read_stage_output(run: RunDir, rel: str, missing: str = "") -> Any:
    """A file a stage wrote, read by its kind (.json, .parquet, else torch.save).

    A missing file raises PipelineError(``missing``), which should say which stage to
    run first; a damaged one raises PipelineError with the storage layer's text (it
    names the file and says to delete it so that its stage runs again).
    """
    if not run.exists(rel):
        raise PipelineError(missing or f"{run.uri.rstrip('/')}/{rel} not found")
    try:
        if rel.endswith(".json"):
            return run.read_json(rel)
        if rel.endswith(".parquet"):
            return run.read_parquet(rel)
        return run.read_torch(rel)
    except StorageError as e:
        raise PipelineError(str(e)) from None


def resolve_space(cfg: Config, in_channels: int, num_classes: int, image_size: int) -> SearchSpace:
    """The configured space, adapted to the dataset's channels, classes and image size."""
    return get_space(cfg.space.name).with_data(in_channels=in_channels, num_classes=num_classes,
                                               input_size=image_size)


def space_ops(space: SearchSpace) -> dict:
    """The space's op constructors, to ship to Ray workers with the space itself.

    An op registered in the driver (a user's script) is unknown in a fresh Ray worker;
    cloudpickle carries built-in factories by reference and a script's by value.
    """
    names = {op for st in space.stages for op in st.ops} | {s.op for s in space.stem if s.type == "op"}
    return {name: OPS[name] for name in sorted(names)}


def register_ops(ops: dict) -> None:
    """In a worker: register the shipped ops it does not know yet."""
    for name, factory in ops.items():
        if name not in OPS:
            register_op(name, factory)


def cluster_address(cfg: Config) -> str:
    """The Ray cluster this run joins (ray.address, else RAY_ADDRESS); "" = a local instance."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS", "")


def ensure_ray(cfg: Config) -> None:
    """Join the cluster named by ray.address / RAY_ADDRESS, or start Ray in-process."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(cfg)
    # Authentication is Ray's own: a local instance gets token authentication (Ray
    # 2.60's default, a token in ~/.ray/auth_token), a cluster is joined in its mode
    # (RAY_AUTH_MODE / RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN as the user set them).
    _quiet_auth_notice()
    if address:
        unreachable = PipelineError(
            f"cannot reach the Ray cluster at {address!r}; start it (ray up cluster.yaml or "
            "ray start --head) or unset RAY_ADDRESS / --address to run locally")
        _probe(address, unreachable)
        _check_auth(address)
        try:
            ray.init(address=address, log_to_driver=True)
        except ray.exceptions.AuthenticationError:
            raise _auth_refused(address, "it refused this client's token") from None
        except (ConnectionError, RuntimeError, ValueError):
            _check_auth(address)  # a refusal the first check missed (a GCS too busy to answer in time)
            raise unreachable from None
    else:
        # The dashboard (ray[default]) serves the State API, which Ray Train V2 uses to
        # release a dead controller's placement group; without it Train logs warnings
        # every few seconds and a killed driver can leak CPUs.
        # address="local": always a fresh in-process instance; a bare ray.init() would
        # join whatever cluster /tmp/ray/ray_current_cluster names, even a dead one.
        ray.init(address="local", num_cpus=cfg.ray.num_cpus or None, log_to_driver=True)
    _filter_worker_output()


# Lines Ray's own processes print on every run that say nothing a user can act on. They
# stay in Ray's session logs (/tmp/ray/session_latest/logs); everything else a worker
# prints, warnings and errors included, still reaches the console.
RAY_NOISE = re.compile("|".join([
    r"Actor with class name: 'PreemptionWatcher' .* max_restarts",  # Train V2 controller, an E-line, every start
    r"^Requesting resources: ",  # Train's worker-group start-up, in four lines
    r"^Attempting to start training worker group ",
    r"^Started training worker group of size ",
    r"^- \(ip=[^)]*\) world_rank=\d+",
    r"^Setting up process group for: ",
    r"^Restored on \S+ from checkpoint: Checkpoint\(",  # Tune, on every resume; the trial's own line says it
]))


def ray_noise(line: str) -> bool:
    return RAY_NOISE.search(line) is not None


def _filter_worker_output() -> None:
    """Drop ``RAY_NOISE`` lines from what Ray forwards to this console.

    Ray has no public filter: ``log_to_driver`` is all or nothing, and ``ray.LoggingConfig``
    sets levels inside workers, not what the driver prints (the E-line above comes from
    C++). So the driver's printing handler is wrapped; a Ray without it prints as before.
    """
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return
    for name, handle in list(dispatcher.handlers):
        if name != "ray_print_logs" or getattr(handle, "filters_noise", False):
            continue

        def filtered(data: dict, _print=handle) -> None:
            lines = [ln for ln in data.get("lines", []) if not ray_noise(ln)]
            if lines:
                _print({**data, "lines": lines})

        filtered.filters_noise = True
        # Same name: ray.shutdown() removes the handler by it.
        dispatcher.remove_handler(name)
        dispatcher.add_handler(name, filtered)


@dataclass(frozen=True)
class Shortfall:
    """The resources a request can never get, each with what the cluster has of it."""

    need: dict[str, float]  # every unit together
    cluster: dict[str, float]  # the cluster's total
    largest_node: dict[str, float]  # the most any one alive node has


def resource_shortfall(per_unit: Mapping[str, float], units: int = 1) -> Optional[Shortfall]:
    """What ``units`` units running at once (Ray Train workers, or one Tune trial), each
    asking ``per_unit`` on a single node, can never get from the running cluster.

    Short is a resource of which one unit needs more than the largest node has, or all
    units together more than the whole cluster. None when everything fits, and under an
    autoscaler, which may still add nodes (Ray Train checks its limits itself there).
    Without this check Ray waits for the resources forever: Train retries its placement
    group endlessly, Tune keeps the trial pending.
    """
    import ray

    if _autoscaled():
        return None
    total = ray.cluster_resources()
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    largest = {k: max((n.get(k, 0.0) for n in nodes), default=0.0) for k in per_unit}
    short = [k for k, v in per_unit.items() if v > 0 and (v > largest[k] or v * units > total.get(k, 0.0))]
    if not short:
        return None
    return Shortfall(need={k: per_unit[k] * units for k in short}, cluster={k: total.get(k, 0.0) for k in short},
                     largest_node={k: largest[k] for k in short})


def _autoscaled() -> bool:
    """Whether an autoscaler may add nodes to the cluster Ray is connected to."""
    # No public Ray API answers this: ray.cluster_resources() and ray.nodes() describe only
    # the nodes that are up, and ray.autoscaler.sdk can request resources but not say
    # whether anyone will provide them. Ray Train V2 asks this same private call for its
    # own check (WorkerGroup._check_cluster_resources_and_raise_if_insufficient); any
    # failure (another Ray release) counts as "no autoscaler", the safe answer for a
    # fixed cluster.
    try:
        from ray._private.state import state

        return bool(state.get_max_resources_from_cluster_config())
    except Exception:
        return False


def _probe(address: str, error: Exception) -> None:
    # ray.init retries an unreachable host:port for minutes; a plain TCP connect
    # answers in seconds. "auto" and ray:// addresses are left to Ray itself.
    import socket

    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError:
        raise error from None


AUTH_FIX = "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to a file holding the cluster's token"


def _auth_refused(address: str, why: str) -> PipelineError:
    return PipelineError(f"the Ray cluster at {address!r} refused the connection: {why}; {AUTH_FIX} "
                         "(`ray get-auth-token` on the head prints it), or RAY_AUTH_TOKEN to the token itself")


def _check_auth(address: str) -> None:
    """Ask the cluster's GCS once whether it accepts this client, before ray.init.

    Against a cluster that requires a token, ray.init without the right one retries for
    20 s and then says only "Failed to connect". One gRPC call with the token Ray would
    send (none, the one in RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token)
    tells a refusal apart from an unreachable cluster in well under a second. Any other
    answer (a Ray without the call, a timeout) is left to ray.init to report.
    """
    host, sep, port = address.rpartition(":")
    if address == "auto" or "://" in address or not sep or not port.isdigit():
        return
    try:
        import grpc
        from ray._raylet import AuthenticationTokenLoader
    except ImportError:  # another Ray release: ray.init reports what it finds
        return
    loader = AuthenticationTokenLoader.instance()
    try:
        header = loader.get_token_for_http_header() if loader.has_token() else {}
    except Exception:
        header = {}
    finally:
        loader.reset_cache()  # ray.init loads the token again, once RAY_AUTH_MODE is settled
    channel = grpc.insecure_channel(address)
    try:
        channel.unary_unary("/ray.rpc.NodeInfoGcsService/GetClusterId")(b"", timeout=10,
                                                                        metadata=tuple(header.items()))
    except grpc.RpcError as e:
        if e.code() == grpc.StatusCode.UNAUTHENTICATED:
            raise _auth_refused(address, "it requires token authentication and "
                                + ("did not accept this client's token" if header else "this client has no token")
                                ) from None
    finally:
        channel.close()


def _quiet_auth_notice() -> None:
    """Drop Ray's "Token authentication is enabled for this Ray cluster" notice.

    It is printed on every local start and says only that Ray is secure by default (and
    how to switch that off); other authentication warnings still show."""
    import logging

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")

    logger = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, logging.Filter) and type(f).__name__ == "_Drop" for f in logger.filters):
        logger.addFilter(_Drop())
