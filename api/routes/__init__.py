"""Route modules, one per resource; :func:`metaserve.api.app.create_app` includes every router in
:data:`ROUTERS` (add a module's router here to extend the API)."""

from __future__ import annotations

from metaserve.api.routes import (adapt, artifacts, catalog, dashboard, events, health, jobs,
                                   keys, logs, metrics, prometheus, sweeps)

ROUTERS = [health.router, jobs.router, catalog.router, metrics.router, artifacts.router,
           events.router, adapt.router, keys.router, logs.router, prometheus.router,
           dashboard.router, sweeps.router]
