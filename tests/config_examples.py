"""The commented engine examples in config.yaml, uncommented: documentation that is checked to be valid."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

CONFIG_YAML = Path(__file__).resolve().parent.parent / "config.yaml"


def commented_engine_example(name: str) -> dict[str, Any]:
    """The `  # <name>:` block under `engines:` (or `workers:`; its lines start with `  #   `) as a dict."""
    lines = CONFIG_YAML.read_text().splitlines()
    start = lines.index(next(ln for ln in lines if ln.startswith(f"  # {name}:")))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("  #   "):
            break
        block.append(line)
    return yaml.safe_load("\n".join(ln.replace("# ", "", 1)[2:] for ln in block))[name]  # type: ignore[no-any-return]
