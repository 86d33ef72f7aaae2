"""The installed version, for `mirror --version`, `mirror_build_info` and the status page."""

from __future__ import annotations

import importlib.metadata

try:
    VERSION = importlib.metadata.version("mirror")
except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
    VERSION = "unknown"
