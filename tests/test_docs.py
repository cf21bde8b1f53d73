"""The README's configuration reference is the code's: every key, every default."""

import ast
import dataclasses
import re
from pathlib import Path

from pipeline.config import Config

README = Path(__file__).resolve().parents[1] / "README.md"


def _flat_defaults() -> dict:
    out = {}
    cfg = Config()
    for section in dataclasses.fields(cfg):
        value = getattr(cfg, section.name)
        if dataclasses.is_dataclass(value):
            for f in dataclasses.fields(value):
                out[f"{section.name}.{f.name}"] = getattr(value, f.name)
        else:
            out[section.name] = value
    return out


def test_readme_configuration_reference_matches_the_dataclasses():
    rows = dict(re.findall(r"^\| `([a-z_.]+)` \| `([^`]*)` \|", README.read_text(), flags=re.M))
    defaults = _flat_defaults()
    assert sorted(set(defaults) - set(rows)) == [], "keys missing from the README's reference"
    assert sorted(set(rows) - set(defaults)) == [], "README documents keys the config does not have"
    wrong = {k: (rows[k], v) for k, v in defaults.items() if ast.literal_eval(rows[k]) != v}
    assert wrong == {}, "README default differs from the code: {key: (README, code)}"
