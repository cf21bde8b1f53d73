"""A search space is data: stem, searchable stages, head, input size.

Nothing here builds modules; ``network.py`` turns a space into a supernet or subnet.
A space is frozen and hashable, has a stable ``fingerprint`` (a hash of its
definition, not its name), and validates architectures against itself.

An *architecture* is a tuple of ints, one choice index per searchable layer, into
that layer's op list. It travels as JSON with the space's name and fingerprint so it
is never applied to the wrong space.

Depth is data too. ``identity_layers`` fixes layers to identity (BN-NAS fixes layers
1, 5, 6 and 9 of its space): such a layer's only allowed choice is identity, appended
after the stage's ops, so that choice k names the same op in every layer. The BN
indicator cannot score identity (it has no BN), so the authors never let it compete;
a space whose identity is a free choice is for the ``acc`` indicator. Architectures in
the authors' format, -1 for identity, are accepted wherever an architecture is
(``validate``) and written beside ours (``authors_arch``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

from .ops import IDENTITY, OPS
from .yaml_file import load_yaml_mapping

Arch = tuple[int, ...]


class SpaceError(ValueError):
    """A search space definition is wrong."""


class ArchitectureError(ValueError):
    """An architecture does not fit its search space."""


@dataclass(frozen=True)
class StemLayer:
    type: str  # conv | maxpool | op (a fixed, non-searchable registered op)
    out: int = 0  # output channels (conv, op)
    kernel: int = 3
    stride: int = 1
    act: str = "relu"  # conv only: relu | relu6
    op: str = ""  # type == op: registered op name


@dataclass(frozen=True)
class Stage:
    channels: int
    depth: int
    stride: int  # of the stage's first layer; the rest run at stride 1
    ops: tuple[str, ...]
    identity_first: bool = False  # the first layer changes shape, so identity is off by default


@dataclass(frozen=True)
class Head:
    channels: int  # 1x1 conv before global pooling
    act: str = "relu"
    dropout: float = 0.0
    fc_bias: bool = True


@dataclass(frozen=True)
class Layer:
    """One searchable layer, derived from the stages."""
    index: int
    stage: int
    in_channels: int
    out_channels: int
    stride: int
    ops: tuple[str, ...]
    allowed: tuple[bool, ...]  # per choice; identity may be forbidden, or be the only choice

    @property
    def identity_choice(self) -> Optional[int]:
        """The choice index of identity in this layer, or None."""
        return self.ops.index(IDENTITY) if IDENTITY in self.ops else None

    @property
    def fixed_identity(self) -> bool:
        """Identity is the only allowed choice: the layer is skipped in every architecture."""
        return self.identity_choice is not None and sum(self.allowed) == 1 and self.allowed[self.identity_choice]

    @property
    def free(self) -> bool:
        """More than one allowed choice: search (and mutation) has something to pick here."""
        return sum(self.allowed) > 1


@dataclass(frozen=True)
class SearchSpace:
    name: str
    input_size: int
    stem: tuple[StemLayer, ...]
    stages: tuple[Stage, ...]
    head: Head
    in_channels: int = 3
    num_classes: int = 1000
    identity_layers: tuple[int, ...] = ()  # global layer indices fixed to identity (fixed depth)
    # "pad": a parameter-free shortcut (average pool + zero channels) around every op of a
    # layer that changes shape, so that every layer is residual: with the scored gammas at
    # 0 every path starts as the same function, and a shared head can read them all.
    shortcut: str = ""

    def __post_init__(self):
        _check_definition(self)

    # ------------------------------------------------------------------ structure
    @property
    def stem_channels(self) -> int:
        ch = self.in_channels
        for s in self.stem:
            ch = s.out if s.type in ("conv", "op") else ch
        return ch

    @cached_property  # a frozen space's layers never change; validate() reads them per architecture
    def layers(self) -> tuple[Layer, ...]:
        out, cin = [], self.stem_channels
        fixed = set(self.identity_layers)
        for si, st in enumerate(self.stages):
            for d in range(st.depth):
                first = d == 0
                if len(out) in fixed:
                    ops = st.ops if IDENTITY in st.ops else st.ops + (IDENTITY,)
                    allowed = tuple(op == IDENTITY for op in ops)
                else:
                    ops = st.ops
                    allowed = tuple(not (op == IDENTITY and first and not st.identity_first) for op in ops)
                out.append(Layer(len(out), si, cin, st.channels, st.stride if first else 1, ops, allowed))
                cin = st.channels
        return tuple(out)

    @property
    def num_layers(self) -> int:
        return sum(s.depth for s in self.stages)

    @property
    def num_choices(self) -> int:
        return max(len(layer.ops) for layer in self.layers)

    @property
    def searchable_identity(self) -> tuple[int, ...]:
        """Layers where identity competes with ops: free depth, which the BN indicator cannot score."""
        return tuple(layer.index for layer in self.layers
                     if layer.free and layer.identity_choice is not None and layer.allowed[layer.identity_choice])

    @property
    def size(self) -> int:
        """Number of architectures in the space."""
        n = 1
        for layer in self.layers:
            n *= sum(layer.allowed)
        return n

    def with_data(self, *, in_channels: int, num_classes: int, input_size: Optional[int] = None) -> "SearchSpace":
        """The same space for another dataset (its fingerprint changes with the weights' shapes)."""
        return replace(self, in_channels=in_channels, num_classes=num_classes,
                       input_size=input_size or self.input_size)

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict:
        d = asdict(self)
        for st in d["stages"]:
            st["ops"] = list(st["ops"])
        d["stem"] = [dict(s) for s in d["stem"]]
        d["identity_layers"] = list(d["identity_layers"])
        for key in ("identity_layers", "shortcut"):  # unset: the fingerprint stays what it was without them
            if not d[key]:
                d.pop(key)
        return d

    @property
    def fingerprint(self) -> str:
        """Hash of the definition (not the name): same definition, same weights layout."""
        d = self.to_dict()
        d.pop("name")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ architectures
    def validate(self, arch: Sequence[int]) -> Arch:
        """Return ``arch`` as a tuple of ints or raise ArchitectureError saying why.

        -1 (the authors' identity) is read as the layer's identity choice.
        """
        layers = self.layers
        try:
            arch = tuple(int(a) for a in arch)
        except (TypeError, ValueError):
            raise ArchitectureError(f"architecture must be a sequence of integers, got {arch!r}") from None
        if len(arch) != len(layers):
            raise ArchitectureError(
                f"architecture has {len(arch)} choices but space {self.name!r} has {len(layers)} layers")
        if -1 in arch:
            arch = tuple(self._from_authors(layer, a) for layer, a in zip(layers, arch))
        for layer, a in zip(layers, arch):
            if layer.fixed_identity and a != layer.identity_choice:
                raise ArchitectureError(
                    f"layer {layer.index} is fixed to identity in space {self.name!r} (choice "
                    f"{layer.identity_choice} or -1), got {a}")
            if not 0 <= a < len(layer.ops):
                raise ArchitectureError(
                    f"layer {layer.index}: choice {a} is out of range 0..{len(layer.ops) - 1} ({', '.join(layer.ops)})")
            if not layer.allowed[a]:
                raise ArchitectureError(
                    f"layer {layer.index}: {layer.ops[a]!r} is not allowed there (first layer of stage {layer.stage})")
        return arch

    def _from_authors(self, layer: Layer, a: int) -> int:
        if a != -1:
            return a
        k = layer.identity_choice
        if k is None or not layer.allowed[k]:
            raise ArchitectureError(f"layer {layer.index}: -1 (identity) is not allowed there "
                                    f"({'first layer of stage %d' % layer.stage if k is not None else 'no identity in its ops'})")
        return k

    def authors_arch(self, arch: Sequence[int]) -> list[int]:
        """``arch`` in the authors' format: the same choices, -1 where the op is identity."""
        return [-1 if layer.ops[a] == IDENTITY else a for layer, a in zip(self.layers, self.validate(arch))]

    def op_names(self, arch: Sequence[int]) -> list[str]:
        return [layer.ops[a] for layer, a in zip(self.layers, self.validate(arch))]

    def arch_to_json(self, arch: Sequence[int]) -> str:
        return json.dumps({"space": self.name, "fingerprint": self.fingerprint,
                           "arch": list(self.validate(arch)), "arch_authors": self.authors_arch(arch),
                           "ops": self.op_names(arch)}, indent=1)

    def arch_from_json(self, text: str) -> Arch:
        try:
            d = json.loads(text)
            arch, fp, name = d["arch"], d["fingerprint"], d.get("space", "?")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ArchitectureError(f"not an architecture JSON ({e}); expected keys space, fingerprint, arch") from None
        if fp != self.fingerprint:
            raise ArchitectureError(
                f"architecture is for space {name!r} (fingerprint {fp}), not {self.name!r} "
                f"(fingerprint {self.fingerprint}); use it with the space it was searched in")
        return self.validate(arch)


# ---------------------------------------------------------------------- checking

def _check_definition(space: SearchSpace) -> None:
    def fail(msg: str):
        raise SpaceError(f"space {space.name!r}: {msg}")

    if space.input_size < 1 or space.in_channels < 1 or space.num_classes < 1:
        fail("input_size, in_channels and num_classes must be >= 1")
    if not space.stages:
        fail("needs at least one stage")
    for s in space.stem:
        if s.type not in ("conv", "maxpool", "op"):
            fail(f"stem layer type {s.type!r} is not one of conv, maxpool, op")
        if s.type == "op" and s.op not in OPS:
            fail(f"unknown op {s.op!r} in stem; registered ops: {', '.join(sorted(OPS))}")
        if s.type == "conv" and s.act not in ACTIVATIONS:
            fail(f"stem activation {s.act!r} is not one of {', '.join(ACTIVATIONS)}")
    if space.head.act not in ACTIVATIONS:
        fail(f"head activation {space.head.act!r} is not one of {', '.join(ACTIVATIONS)}")
    for i, st in enumerate(space.stages):
        if st.depth < 1 or st.channels < 1 or st.stride not in (1, 2):
            fail(f"stage {i}: depth and channels must be >= 1 and stride 1 or 2")
        if not st.ops:
            fail(f"stage {i}: needs at least one candidate op")
        for op in st.ops:
            if op not in OPS:
                fail(f"stage {i}: unknown op {op!r}; registered ops: {', '.join(sorted(OPS))}")
        if len(set(st.ops)) != len(st.ops):
            fail(f"stage {i}: duplicate candidate ops")
        if st.depth == 1 and all(op == IDENTITY for op in st.ops) and not st.identity_first:
            fail(f"stage {i}: its only layer allows no op")
    if space.shortcut not in SHORTCUTS:
        fail(f"shortcut {space.shortcut!r} is not one of {', '.join(repr(s) for s in SHORTCUTS)}")
    n = sum(st.depth for st in space.stages)
    firsts = {sum(st.depth for st in space.stages[:i]): i for i, st in enumerate(space.stages)}
    if len(set(space.identity_layers)) != len(space.identity_layers):
        fail(f"identity_layers {list(space.identity_layers)} lists a layer twice")
    for l in space.identity_layers:
        if not isinstance(l, int) or not 0 <= l < n:
            fail(f"identity_layers: {l!r} is not a layer index 0..{n - 1}")
        if l in firsts and not space.stages[firsts[l]].identity_first:
            fail(f"identity_layers: layer {l} is the first layer of stage {firsts[l]}, which changes "
                 "the shape, so it cannot be identity")


ACTIVATIONS = ("relu", "relu6")
SHORTCUTS = ("", "pad")


# ---------------------------------------------------------------------- registry and YAML

_SPACES: dict[str, Callable[[], SearchSpace]] = {}


def register_space(fn: Callable[[], SearchSpace]) -> Callable[[], SearchSpace]:
    """Register a zero-argument factory under its function name (timm style)."""
    _SPACES[fn.__name__] = fn
    return fn


def list_spaces() -> list[str]:
    return sorted(_SPACES)


def space_from_dict(d: dict, *, source: str = "space") -> SearchSpace:
    known = {"name", "input_size", "in_channels", "num_classes", "stem", "stages", "head", "identity_layers",
             "shortcut"}
    if set(d) - known:
        raise SpaceError(f"{source}: unknown key {sorted(set(d) - known)[0]!r}; known keys: {', '.join(sorted(known))}")
    try:
        d = dict(d)
        return SearchSpace(
            name=str(d.pop("name")),
            input_size=int(d.pop("input_size")),
            in_channels=int(d.pop("in_channels", 3)),
            num_classes=int(d.pop("num_classes", 1000)),
            stem=tuple(StemLayer(**s) for s in d.pop("stem", [])),
            stages=tuple(Stage(**{**s, "ops": tuple(s["ops"])}) for s in d.pop("stages")),
            head=Head(**d.pop("head")),
            identity_layers=tuple(int(l) for l in d.pop("identity_layers", ()) or ()),
            shortcut=str(d.pop("shortcut", "") or ""),
        )
    except SpaceError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise SpaceError(f"{source}: not a valid space definition ({type(e).__name__}: {e}); "
                         "see README.md, section 'Adding a search space'") from None


def load_space_yaml(path: str | Path) -> SearchSpace:
    d = load_yaml_mapping(path, what="space file", error=SpaceError, holds="name, input_size, stem, stages, head")
    return space_from_dict(d, source=str(path))


def get_space(name_or_path: str) -> SearchSpace:
    """A built-in space by name, or a space YAML file by path."""
    if name_or_path in _SPACES:
        return _SPACES[name_or_path]()
    if name_or_path.endswith((".yaml", ".yml")) or Path(name_or_path).is_file():
        return load_space_yaml(name_or_path)
    raise SpaceError(f"unknown space {name_or_path!r}; built-in spaces: {', '.join(list_spaces())}, "
                     "or give the path of a space YAML file")
