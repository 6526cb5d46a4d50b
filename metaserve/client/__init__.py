"""The Python client of a metaserve server: submit, watch, fetch and adapt in a few lines.

```python
from metaserve import Client

client = Client()                                  # METASERVE_URL / METASERVE_API_KEY or the config file
job = client.submit("examples/sine_maml.yaml")
job = client.wait(job)                             # a progress bar fed by the job's event stream
model, recipe = client.load_meta_init(job)         # downloads meta_init.safetensors + .json
predict = client.adapt(model, support_x, support_y)  # the job's recipe (MAML: inner lr, steps)
```

A meta-RL job (RL², PEARL, MAML-RL) ends with a meta-policy instead (``meta_policy.*``; the
job's :meth:`Client.artifact_kind` says which):

```python
policy = client.load_meta_policy(job)              # downloads meta_policy.safetensors + .json
task = policy.sample_tasks(1, seed=7)[0]           # or a task of your own: {"goal": ...}, ...
adapted = policy.adapt(task)                       # MAML-RL: PG steps; PEARL: posterior z; RL²: new trial
env = policy.make_env(task)
observation, _ = env.reset(seed=0)
action = adapted.act(observation)
```

Connection settings come from, first to last: the arguments, ``METASERVE_URL`` and
``METASERVE_API_KEY``, the config file :func:`config_path` (written by ``metaserve login``).
Every error response of the API (``{"error": {"code", "message", "details"}}``) is raised as
a :class:`ApiError` subclass carrying the server's message. ``load_meta_init``,
``load_meta_policy`` and ``adapt`` work offline on a downloaded directory, with no server and
no API key (a client without a key raises :class:`NotConfigured` at its first request, not
before): they are :mod:`metaserve.workers.engine.final_artifact`'s loader.

torch is imported only by the methods that need it, so importing this package is light.

The folder ``metaserve/`` installs as ``metaserve`` (pyproject's package-dir); this package is
the client side of the project: it talks to a server over HTTP and never imports
``metaserve.api`` or ``metaserve.service`` (``tests/test_import_graph.py`` checks it). Modules:
``http_client`` (:class:`Client`), ``errors`` (every client error), ``config`` (the config
file), ``sse`` (the event-stream parser), ``spec_documents`` (YAML/JSON job documents),
``progress`` (the progress line), ``local`` (offline loading and adaptation),
``model_registry`` (registered models and their ``models:/NAME@ALIAS`` URIs).
"""

from __future__ import annotations

from metaserve.client.config import DEFAULT_URL, config_path, read_config, write_config
from metaserve.client.errors import (ApiError, BadRequest, Conflict, ConnectionFailed, InvalidRequest,
                                     MetaserveClientError, NotConfigured, NotFound, PayloadTooLarge,
                                     ServerError, Unauthorized, error_from_response)
from metaserve.client.http_client import Client, job_id_of, safe_target
from metaserve.client.local import (ARTIFACT_FILES, LOADERS, META_INIT_FILES, META_POLICY_FILES, adapt,
                                    adapt_rows, load_meta_init, load_meta_policy)
from metaserve.client.model_registry import MODEL_URI_PREFIX, parse_model_uri
from metaserve.client.progress import Progress, ProgressBar, evaluation_figure, progress_line
from metaserve.client.spec_documents import load_spec_document
from metaserve.client.sse import Event, parse_sse

__all__ = [
    "ARTIFACT_FILES", "DEFAULT_URL", "MODEL_URI_PREFIX", "LOADERS", "META_INIT_FILES", "META_POLICY_FILES", "ApiError", "BadRequest",
    "Client", "Conflict", "ConnectionFailed", "Event", "InvalidRequest", "MetaserveClientError",
    "NotConfigured", "NotFound", "PayloadTooLarge", "Progress", "ProgressBar", "ServerError",
    "Unauthorized", "adapt", "adapt_rows", "config_path", "error_from_response", "evaluation_figure", "job_id_of",
    "load_meta_init", "load_meta_policy", "load_spec_document", "parse_model_uri", "parse_sse", "progress_line",
    "read_config", "safe_target", "write_config",
]
