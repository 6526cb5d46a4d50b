"""metaserve: a service that meta-trains models on Ray and hands out safe meta-initializations.

The project's folders install under this one import name: ``metaserve.api`` (``api/``),
``metaserve.service`` (``service/``), ``metaserve.workers`` (``workers/``) and
``metaserve.migrations`` (``migrations/``); the folder ``metaserve/`` itself holds the client side:
``metaserve.client`` (the SDK) and ``metaserve.cli`` (the ``metaserve`` command). The public SDK
is ``from metaserve import Client``.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Client", "MetaserveClientError"]


def __getattr__(name: str) -> Any:
    # Lazy: a Ray worker importing ``metaserve.workers`` does not load the HTTP client.
    if name in __all__:
        from metaserve import client

        return getattr(client, name)
    raise AttributeError(f"module 'metaserve' has no attribute {name!r}")
