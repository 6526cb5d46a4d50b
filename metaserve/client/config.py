"""Where a client connects: ``metaserve login`` writes the URL and API key to the config file
(:func:`config_path`, mode 0600); :class:`~metaserve.client.Client` reads them after its
arguments and ``METASERVE_URL`` / ``METASERVE_API_KEY``."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

from metaserve.client.errors import MetaserveClientError

DEFAULT_URL = "http://127.0.0.1:8000"


def config_path() -> Path:
    """``$METASERVE_CONFIG``, else ``$XDG_CONFIG_HOME/metaserve/config.toml``, else
    ``~/.config/metaserve/config.toml``."""
    if os.environ.get("METASERVE_CONFIG"):
        return Path(os.environ["METASERVE_CONFIG"])
    base = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(base) / "metaserve" / "config.toml"


def read_config(path: Path | None = None) -> dict[str, str]:
    """``{"url": ..., "api_key": ...}`` from the config file ({} when there is none)."""
    path = path or config_path()
    if not path.exists():
        return {}
    try:
        document = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as error:
        raise MetaserveClientError(f"{path} is not valid TOML: {error}") from None
    return {key: str(document[key]) for key in ("url", "api_key") if key in document}


def write_config(*, url: str, api_key: str, path: Path | None = None) -> Path:
    """Write the config file with mode 0600 (it holds the API key)."""
    path = path or config_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    text = f"url = {json.dumps(url)}\napi_key = {json.dumps(api_key)}\n"  # JSON strings are TOML strings
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.chmod(path, 0o600)
    return path
