"""Route modules, one per resource; :func:`metaserve.api.app.create_app` includes every router in
:data:`ROUTERS` (add a module's router here to extend the API)."""

from __future__ import annotations

from metaserve.api.routes import (adapt, artifacts, catalog, dashboard, events, health, job_logs,
                                   job_metrics, jobs, keys, prometheus, registered_models,
                                   sweep_analysis, sweeps)

ROUTERS = [health.router, jobs.router, catalog.router, job_metrics.router, artifacts.router,
           events.router, adapt.router, keys.router, job_logs.router, prometheus.router,
           dashboard.router, sweeps.router, sweep_analysis.router, registered_models.router]
