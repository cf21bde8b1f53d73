"""The retrained winner as files a user can load without running the pipeline.

Layout of ``RUN/model/``:

- ``weights.pt``  the subnet's ``state_dict`` (plain tensors: ``torch.load(weights_only=True)``)
- ``arch.json``   the architecture (space name, fingerprint, choice per layer, op names)
                  plus the full space definition, so the network can be rebuilt from
                  this file alone
- ``model.pt2``   a ``torch.export`` program (batch dimension dynamic), loadable with
                  ``torch.export.load(path).module()`` without this package at all;
                  ``model.ts`` (TorchScript trace) instead if torch.export fails for the ops

Users call::

    from pipeline.export import load
    model = load("runs/default/model")        # nn.Module in eval mode, weights loaded

``load`` needs torch and this package only (no Ray, no run directory beyond ``model/``).
An op that is not built in must be registered (``search_spaces.register_op``) before
``load``; ``model.pt2`` needs no op code at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import warnings
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from search_spaces import SearchSpace, build_subnet, space_from_dict

from .storage import RunDir
from .util import one_line

WEIGHTS = "weights.pt"
ARCH = "arch.json"
PROGRAM = "model.pt2"
SCRIPT = "model.ts"
FORMAT = 1


def arch_document(space: SearchSpace, arch: Sequence[int], **extra: Any) -> dict:
    """``space.arch_to_json`` (name, fingerprint, arch, ops) plus the space definition."""
    doc = json.loads(space.arch_to_json(arch))
    doc.update(format=FORMAT, space_def=space.to_dict(), **extra)
    return doc


def export_model(
    run: RunDir,
    space: SearchSpace,
    arch: Sequence[int],
    state_dict: dict,
    *,
    rel: str = "model",
    info: Optional[dict] = None,
) -> dict:
    """Write weights, arch.json and a standalone program under ``run/rel``.

    Returns what was written: ``{"weights", "arch", "program", "program_format",
    "program_error"}`` (paths relative to the run dir; program None if both exporters
    failed -- the weights and arch.json are the primary artifacts and still load).
    The architecture file is written last, so a complete arch.json means the weights
    beside it are complete too.
    """
    model = build_subnet(space, arch)
    model.load_state_dict(state_dict)  # strict: a mismatch is a bug, not something to skip
    model.eval()
    cpu_state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    run.write_torch(f"{rel}/{WEIGHTS}", cpu_state)

    program, fmt, error = _write_program(run, rel, model, space)
    files = {"weights": f"{rel}/{WEIGHTS}", "arch": f"{rel}/{ARCH}", "program": program,
             "program_format": fmt, "program_error": error}
    doc = arch_document(space, arch, weights=WEIGHTS, program=program and os.path.basename(program),
                        program_format=fmt, **(info or {}))
    run.write_json(f"{rel}/{ARCH}", doc)
    return files


def _write_program(run: RunDir, rel: str, model: nn.Module, space: SearchSpace):
    """torch.export first (the maintained format); a TorchScript trace if that fails."""
    # Batch of 2: torch.export specialises dimensions of size 0 and 1.
    example = torch.randn(2, space.in_channels, space.input_size, space.input_size)
    errors = []
    try:
        batch = torch.export.Dim("batch", min=1, max=1 << 16)
        program = torch.export.export(model, (example,), dynamic_shapes={"x": {0: batch}})
        with run.local_file(f"{rel}/{PROGRAM}") as local:
            torch.export.save(program, local)
        return f"{rel}/{PROGRAM}", "torch.export", None
    except Exception as e:  # any op torch.export cannot trace: fall back, say why
        errors.append(f"torch.export: {type(e).__name__}: {one_line(e, 200)}")
    try:
        # TorchScript is deprecated (FutureWarning) but still the one fallback that
        # loads without this package.
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            traced = torch.jit.trace(model, example)
            with run.local_file(f"{rel}/{SCRIPT}") as local:
                torch.jit.save(traced, local)
        return f"{rel}/{SCRIPT}", "torchscript", "; ".join(errors)
    except Exception as e:
        errors.append(f"torchscript: {type(e).__name__}: {one_line(e, 200)}")
    return None, None, "; ".join(errors)


# ----------------------------------------------------------------------------- loading

def _model_dir(path: str | os.PathLike) -> RunDir:
    # Accept the model folder, its arch.json, or a run dir that holds model/.
    path = os.fspath(path)
    if path.rstrip("/").endswith(ARCH):
        path = path.rstrip("/")[: -len(ARCH)].rstrip("/") or "/"
    d = RunDir(path)
    if not d.exists(ARCH) and d.exists("model", ARCH):
        d = RunDir(d.uri.rstrip("/") + "/model")
    return d


def load_arch(path: str | os.PathLike) -> tuple[SearchSpace, tuple[int, ...], dict]:
    """(space, arch, arch.json document) of an exported model."""
    d = _model_dir(path)
    if not d.exists(ARCH):
        raise FileNotFoundError(f"no {ARCH} under {path}; pass the model folder the pipeline wrote (RUN/model)")
    doc = d.read_json(ARCH)  # CorruptFileError naming the file if damaged
    if not isinstance(doc, dict) or "space_def" not in doc:
        raise ValueError(f"{d.uri}/{ARCH} holds no space definition (space_def); it was not written by pipeline.export")
    space = space_from_dict(doc["space_def"], source=f"{d.uri}/{ARCH}")
    # arch_from_json checks the fingerprint: the rebuilt space must be the one searched.
    return space, space.arch_from_json(json.dumps(doc)), doc


def load(path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """The exported subnet as an ``nn.Module`` in eval mode, with its trained weights."""
    space, arch, doc = load_arch(path)
    d = _model_dir(path)
    model = build_subnet(space, arch)
    state = d.read_torch(doc.get("weights", WEIGHTS), map_location=map_location, weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def load_program(path: str | os.PathLike) -> nn.Module:
    """The standalone program (model.pt2 or model.ts) as a callable module; no op code needed."""
    d = _model_dir(path)
    if d.exists(PROGRAM):
        with _local_copy(d, PROGRAM) as local:
            return torch.export.load(local).module()
    if d.exists(SCRIPT):
        with _local_copy(d, SCRIPT) as local, warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(local, map_location="cpu")
    raise FileNotFoundError(f"neither {PROGRAM} nor {SCRIPT} under {d.uri}; the export step did not write one")


@contextlib.contextmanager
def _local_copy(d: RunDir, rel: str) -> Iterator[str]:
    """A local path for ``rel``: the file itself, or a temporary copy from an object store."""
    if d.is_local:
        yield d.path(rel)
        return
    with tempfile.TemporaryDirectory(prefix="bnnas-model-") as tmp:
        local = os.path.join(tmp, rel)
        with open(local, "wb") as f:
            f.write(d.read_bytes(rel))
        yield local
