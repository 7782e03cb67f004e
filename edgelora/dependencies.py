"""Which ``pip install`` brings a module that a command needs but the environment lacks.

The extras are declared once, in pyproject.toml; this reads them back from the installed
package's metadata, so a missing optional dependency is one line naming the extra to install.
"""

from __future__ import annotations

import re
from importlib import metadata

DISTRIBUTION = "edgelora"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")
_EXTRA = re.compile(r"""extra\s*==\s*["']([^"']+)["']""")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def extra_for(module: str) -> str | None:
    """The smallest extra of edgelora whose requirements name ``module``'s top-level package; None if none does."""
    try:
        requirements = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        return None
    wanted = _canonical(module.split(".")[0])
    extras = []
    for requirement in requirements:
        name, extra = _NAME.match(requirement), _EXTRA.search(requirement)
        if name and extra and _canonical(name.group(1)) == wanted:
            extras.append(extra.group(1))
    preferred = [extra for extra in extras if extra != "test"] or extras
    return preferred[0] if preferred else None


def install_hint(module: str) -> str:
    """What to run so that ``import module`` works."""
    extra = extra_for(module)
    if extra is not None:
        return f"pip install 'edgelora[{extra}]'"
    return f"pip install {_canonical(module.split('.')[0])} (or reinstall edgelora: a dependency is missing)"
