"""What a job will cost, estimated from its spec before anything runs.

The server refuses a job above its configured caps (``metaserve.service.limits``) and sizes
the Ray ``memory`` requests of the job's driver and inner-loop workers from these figures.
Nothing is allocated: the network is built on PyTorch's ``meta`` device, where one forward
pass gives the parameter count, the forward FLOPs and the activation sizes of one example
without touching memory, so a billion-parameter spec is estimated in milliseconds.

The figures are estimates of the dominant terms, not measurements:

- ``parameters``: exact.
- ``task_bytes``: one task's support and query inputs (float32), as sampled.
- ``worker_bytes``: one inner-loop worker: the process (:data:`RUNTIME_BYTES`), the tasks it
  adapts at once (``task_chunk``, else its shard of the meta-batch) each holding its inputs,
  a copy of the parameters and of their gradient per training inner step (second-order MAML
  keeps them for the meta-gradient) and the outputs of every operation of the forward pass
  per step (an upper bound on what autograd saves). Evaluation adapts without a graph and is
  not the peak.
- ``driver_bytes``: the process, the parameters with the outer optimizer's state, the
  meta-gradient, and the copies a checkpoint and the artifact export make.
- ``work_flop``: meta-tasks × examples per task × forward FLOPs of one example × 3 (forward
  and backward) × (inner steps + 1).

Meta-RL jobs (:func:`metaserve.workers.cost_rl.rl_figures`) are estimated from their policies' sizes and the
environment steps they collect: ``parameters`` the networks the algorithm trains (MAML-RL's
Gaussian MLP, Finn et al. 2017; RL²'s LSTM, Duan et al. 2016; PEARL's encoder, policy and
critics, Rakelly et al. 2019), ``env_steps`` iterations × the steps of one iteration,
``worker_bytes`` the learner process with the batch it holds, ``work_flop`` the forward FLOPs
of every step sampled and its backward passes.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from metaserve.workers.cost_rl import rl_figures
from metaserve.workers.exceptions import PluginSpecInvalid
from metaserve.workers.plugins import Plugin
from metaserve.workers.spec import PLUGINS, JobSpec

RUNTIME_BYTES = 400 * 2**20
"""A Ray worker process with torch and the engine imported: 280 MiB resident measured on
this 2-vCPU machine, rounded up."""
FLOAT_BYTES = 4
DRIVER_STATE_COPIES = 16
"""Copies of the parameters a driver holds at its peak: its state (parameters, two Adam
moments) twice while a new one arrives from the worker, the object store's mapped copy,
the checkpoint's serialization, the export. Measured: a 12.6 M-parameter MLP's driver peaked
at 1,083 MiB resident, 280 MiB of it the process: 16 copies of 50 MiB."""


@dataclass(frozen=True)
class CostEstimate:
    """See the module docstring for what each figure counts."""

    parameters: int
    task_bytes: int
    task_memory_bytes: int
    """Adapting one task: its inputs, parameter copies and activations."""
    tasks_at_once: int
    """Tasks one inner-loop worker adapts at once."""
    worker_bytes: int
    driver_bytes: int
    job_bytes: int
    meta_tasks: int
    work_flop: float
    env_steps: int = 0
    """Meta-RL: environment steps the job samples (0 for supervised jobs)."""
    parameters_field: str = "model"
    """The spec field that sizes the network (what a refusal for its size names)."""

    def as_dict(self) -> dict:
        return asdict(self)


class _ActivationCounter(TorchDispatchMode):
    """Counts the elements of every tensor an operation returns (on the meta device)."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(tensor, torch.Tensor):
                self.elements += tensor.numel()
        return out


def _example_figures(spec: JobSpec) -> tuple[int, int, int]:
    """(parameters, forward FLOPs of one example, activation elements of one example).

    A plugin's network is built and run here like a built-in; its code failing on this spec
    (its constructor refusing the family's shapes, a forward pass that does not run on the
    meta device) is :class:`PluginSpecInvalid` naming the plugin, not a server error."""
    from metaserve.workers.networks import network_of

    try:
        model, input_shape, output_dim, prompt_dim = network_of(spec)
        return _network_figures(model.model_dump_json(), input_shape, output_dim, prompt_dim)
    except Exception as error:
        field, plugin = _plugin_of(spec)
        if plugin is None:
            raise
        raise PluginSpecInvalid(field, (
            f"the plugin {plugin.kind.replace('_', ' ')} {plugin.name!r} (package "
            f"{plugin.package}) fails on this spec: {type(error).__name__}: {error}")) from error


def _plugin_of(spec: JobSpec) -> tuple[str, Plugin | None]:
    """The spec's field and plugin a network failure is blamed on: its network's plugin,
    else its task family's (whose shapes the network was built for)."""
    if spec.model is not None and spec.model.name in PLUGINS.models:
        return "model", PLUGINS.models[spec.model.name]
    return "task_family", PLUGINS.task_families.get(spec.task_family.name)


@functools.lru_cache(maxsize=1024)
def _network_figures(model_json: str, input_shape: tuple[int, ...], output_dim: int,
                     prompt_dim: int) -> tuple[int, int, int]:
    # Cached: a meta-device forward pass costs milliseconds, and submissions repeat networks.
    from metaserve.workers.networks import build_model
    from metaserve.workers.spec import MODELS

    name = json.loads(model_json)["name"]
    model = build_model(MODELS[name].model_validate_json(model_json), input_shape, output_dim,
                        prompt_dim)
    with torch.device("meta"):
        params = model.init_params(torch.Generator())
        example = torch.empty((1, *model.input_shape))
        prompt = torch.empty(model.prompt_dim) if model.prompt_dim else None
        flops = FlopCounterMode(display=False)
        activations = _ActivationCounter()
        with flops, activations:
            model(params, example, prompt)
    return (sum(value.numel() for value in params.values()), int(flops.get_total_flops()),
            activations.elements)


def _examples_per_task(spec: JobSpec) -> int:
    family = spec.task_family
    per_class = family.ways if spec.is_classification else 1
    shots = max(family.support_shots, spec.evaluation.support_shots or 0) + family.query_shots
    return per_class * shots


def estimate(spec: JobSpec) -> CostEstimate:
    """The cost of ``spec`` (see the module docstring)."""
    resources = spec.resources
    meta_tasks = spec.iterations * spec.meta_batch_size
    if spec.is_rl:
        return CostEstimate(**rl_figures(spec, RUNTIME_BYTES, FLOAT_BYTES))
    parameters, flop_per_example, activations_per_example = _example_figures(spec)
    examples = _examples_per_task(spec)
    steps = spec.algorithm.inner_steps
    task_bytes = examples * math.prod(spec.task_family.input_shape) * FLOAT_BYTES
    per_task = (task_bytes
                + 2 * (steps + 1) * parameters * FLOAT_BYTES
                + (steps + 1) * examples * activations_per_example * FLOAT_BYTES)
    shard = math.ceil(spec.meta_batch_size / min(resources.workers, spec.meta_batch_size))
    at_once = min(resources.task_chunk or shard, shard)
    worker_bytes = RUNTIME_BYTES + at_once * per_task + 2 * parameters * FLOAT_BYTES
    driver_bytes = RUNTIME_BYTES + DRIVER_STATE_COPIES * parameters * FLOAT_BYTES
    work = float(meta_tasks) * examples * flop_per_example * 3 * (steps + 1)
    return CostEstimate(parameters=parameters, task_bytes=task_bytes, task_memory_bytes=per_task,
                        tasks_at_once=at_once, worker_bytes=worker_bytes,
                        driver_bytes=driver_bytes,
                        job_bytes=driver_bytes + resources.workers * worker_bytes,
                        meta_tasks=meta_tasks, work_flop=work)


@dataclass(frozen=True)
class CostLimits:
    """A server's per-job caps (its settings of the same names, ``METASERVE_MAX_*``)."""

    max_parameters: int
    max_worker_memory_mb: int
    max_job_memory_mb: int
    max_meta_tasks: int
    max_job_pflop: float
    max_runtime_s: int
    max_env_steps: int = 0
    """Meta-RL: environment steps a job may sample (0: no cap)."""


def _gib(size: float) -> str:
    return f"{size / 2**30:,.2f} GiB"


def limit_problems(spec: JobSpec, cost: CostEstimate, limits: CostLimits) -> dict[str, str]:
    """Every cap of ``limits`` that ``spec`` (estimated as ``cost``) breaks: ``{field: why}``
    (empty: none). The API refuses such a job at submit; a sweep's trial fails before it
    trains."""
    problems: dict[str, str] = {}

    def refuse(field: str, text: str) -> None:
        problems[field] = f"{problems[field]}; {text}" if field in problems else text

    if cost.parameters > limits.max_parameters:
        refuse(cost.parameters_field, f"the network has {cost.parameters:,} parameters, more than the cap of "
                        f"{limits.max_parameters:,} (METASERVE_MAX_PARAMETERS)")
    worker_cap = limits.max_worker_memory_mb * 2**20
    if cost.worker_bytes > worker_cap:
        one_task_too_big = cost.worker_bytes - (cost.tasks_at_once - 1) * cost.task_memory_bytes > worker_cap
        refuse("task_family" if one_task_too_big else "meta_batch_size",
               f"{'the learner' if spec.is_rl else 'an inner-loop worker'} would need about {_gib(cost.worker_bytes)} "
               f"({cost.tasks_at_once} task(s) at once × {_gib(cost.task_memory_bytes)}, one task's "
               f"inputs {_gib(cost.task_bytes)}), more than the cap of {_gib(worker_cap)} "
               "(METASERVE_MAX_WORKER_MEMORY_MB)"
               + ("" if one_task_too_big else "; lower meta_batch_size" if spec.is_rl else
                  "; set resources.task_chunk, add workers or lower meta_batch_size"))
    job_cap = limits.max_job_memory_mb * 2**20
    if cost.job_bytes > job_cap:
        held = (f"the learner's {_gib(cost.worker_bytes)} + {spec.resources.workers} helper "
                f"process(es)" if spec.is_rl else
                f"{spec.resources.workers} worker(s) × {_gib(cost.worker_bytes)} + the driver's "
                f"{_gib(cost.driver_bytes)}")
        refuse("resources.workers",
               f"the job would hold about {_gib(cost.job_bytes)} ({held}), "
               f"more than the cap of {_gib(job_cap)} (METASERVE_MAX_JOB_MEMORY_MB)")
    if cost.meta_tasks > limits.max_meta_tasks:
        refuse("iterations", f"iterations × meta_batch_size = {cost.meta_tasks:,} tasks, more than "
                             f"the cap of {limits.max_meta_tasks:,} (METASERVE_MAX_META_TASKS)")
    if limits.max_env_steps and cost.env_steps > limits.max_env_steps:
        refuse("iterations", f"about {cost.env_steps:,} environment steps, more than the cap of "
                             f"{limits.max_env_steps:,} (METASERVE_MAX_ENV_STEPS)")
    if cost.work_flop > limits.max_job_pflop * 1e15:
        refuse("iterations", f"about {cost.work_flop / 1e15:,.1f} PFLOP of training, more than the "
                             f"cap of {limits.max_job_pflop:,} PFLOP (METASERVE_MAX_JOB_PFLOP)")
    if spec.max_runtime_s is not None and spec.max_runtime_s > limits.max_runtime_s:
        refuse("max_runtime_s", f"{spec.max_runtime_s:,} s is more than the cap of "
                                f"{limits.max_runtime_s:,} s (METASERVE_MAX_RUNTIME_S)")
    return problems
