"""Reading a YAML file of settings, with errors phrased for the user.

Both YAML inputs of the project go through here: a space definition
(``load_space_yaml``) and the pipeline's configuration (``pipeline.config.load_config``).
It lives in search_spaces because the pipeline depends on search_spaces, never the
reverse.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml


def load_yaml_mapping(path: str | Path, *, what: str, error: type[Exception], holds: str,
                      if_missing: Optional[str] = None, empty_ok: bool = False) -> dict:
    """The mapping a YAML file holds; every problem is ``error`` with one line naming the file.

    ``what`` names the file in messages ("config file"), ``holds`` what the mapping
    should contain. ``if_missing``: what to do when the file does not exist (without it,
    a missing file is an unreadable one). ``empty_ok``: an empty file is an empty mapping.
    """
    p = Path(path)
    if if_missing is not None and not p.is_file():
        raise error(f"{what} {p} does not exist; {if_missing}")
    try:
        data = yaml.safe_load(p.read_text())
    except OSError as e:
        raise error(f"cannot read {what} {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise error(f"{what} {p} is not valid YAML{where}; fix the syntax") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise error(f"{what} {p} must hold a mapping ({holds}), not {type(data).__name__}")
    return data
