"""python -m pipeline.arch SPACE ARCH: what an architecture is, and what it costs.

ARCH is a list of choices, ours or the authors' (-1 = identity), e.g. the published
BN-NAS network ``"[3,-1,0,4,0,-1,-1,0,4,-1,4,4,1,4,2,0,0,4,0,2,2]"`` (commas without
brackets work too), or the path of an architecture JSON (``model/arch.json``).
It prints the op of every layer, both forms, multiply-adds and parameters. Bad input
is one line on stderr and exit 2.

    python -m pipeline.arch bnnas_mobilenet "[3,-1,0,4,0,-1,-1,0,4,-1,4,4,1,4,2,0,0,4,0,2,2]"
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from search_spaces import ArchitectureError, SearchSpace, SpaceError, cost_tables, get_space

from .budgets import human


def parse_arch(text: str, space: SearchSpace) -> tuple[int, ...]:
    """An architecture from a JSON list, comma-separated ints, or an architecture JSON file."""
    if Path(text).is_file():
        return space.arch_from_json(Path(text).read_text())
    try:
        value = json.loads(text if text.lstrip().startswith("[") else f"[{text}]")
    except json.JSONDecodeError:
        raise ArchitectureError(f"architecture {text!r} is neither a list of integers like [3,-1,0] "
                                "nor an architecture JSON file") from None
    if not isinstance(value, list):
        raise ArchitectureError(f"architecture {text!r} is not a list of integers")
    return space.validate(value)


def describe(space: SearchSpace, arch) -> dict:
    """Ops, both forms, multiply-adds and parameters of ``arch`` (validated) in ``space``."""
    arch = space.validate(arch)
    flops, params = cost_tables(space).cost(arch)
    return {"space": space.name, "arch": list(arch), "arch_authors": space.authors_arch(arch),
            "ops": space.op_names(arch), "flops": flops, "params": params}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.arch", description=__doc__.split("\n\n")[0])
    p.add_argument("space", help="built-in space name or space YAML file")
    p.add_argument("arch", help="choices as [3,-1,0,...] (-1 = identity) or an architecture JSON file")
    p.add_argument("--in-channels", type=int, help="input channels (default: the space's)")
    p.add_argument("--num-classes", type=int, help="classes (default: the space's)")
    p.add_argument("--input-size", type=int, help="input size in pixels (default: the space's)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = p.parse_args(argv)
    try:
        space = get_space(args.space)
        if args.in_channels or args.num_classes or args.input_size:
            space = space.with_data(in_channels=args.in_channels or space.in_channels,
                                    num_classes=args.num_classes or space.num_classes,
                                    input_size=args.input_size or space.input_size)
        d = describe(space, parse_arch(args.arch, space))
    except (SpaceError, ArchitectureError) as e:
        print(f"bnnas: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(d))
        return 0
    width = max(len(op) for op in d["ops"])
    print(f"space {space.name} ({space.input_size}px, {space.num_classes} classes, fingerprint {space.fingerprint})")
    for layer, a, op in zip(space.layers, d["arch"], d["ops"]):
        fixed = "  (fixed)" if layer.fixed_identity else ""
        print(f"  layer {layer.index:>2}  stage {layer.stage}  {op:<{width}}  choice {a}{fixed}")
    print(f"choices        {d['arch']}")
    print(f"authors' form  {d['arch_authors']}")
    print(f"multiply-adds  {human(d['flops'])}  ({d['flops']:.0f})")
    print(f"params         {human(d['params'])}  ({d['params']:.0f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
