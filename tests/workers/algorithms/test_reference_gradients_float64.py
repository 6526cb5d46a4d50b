"""Float64 meta-gradients of every gradient-based algorithm against an independent reference.

The reference is the textbook form, written here with plain ``torch.autograd``: a Python loop
over the tasks and the inner steps, ``create_graph=True`` for second order, no ``vmap``, no
``torch.func`` and none of the engine's code — only the network's definition (``model(params,
x)``, ``model.features``, ``model.head``) and its initial parameters. Its learned-optimizer
parts (Meta-SGD's rates, MAML++'s per-step rates and multi-step loss weights, Meta-Curvature's
transform) are written out again here, the transform as an explicit Kronecker product
``(M_out ⊗ M_inᵀ ⊗ M_fᵀ) vec(G)`` rather than the engine's einsum. In float64 the engine's
meta-gradient (the batched fast path and the vmapped one for MLPs; the vmapped one for conv4
and ResNet-12 with each normalization) must equal it within 1e-9 relative (per parameter
tensor, in norm); float32 rounding alone would be ~1e-7.

(tests/workers/algorithms/test_equivalence.py keeps the float32 checks of the fast path
against the vmapped one and of MAML's per-task loop at 1e-6.)
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metaserve.workers.algorithms import build_algorithm
from metaserve.workers.networks import build_model
from metaserve.workers.spec import ANILSpec, Conv4Spec, MAMLSpec, MetaSGDSpec, MLPSpec, ReptileSpec, SineSpec
from metaserve.workers.spec_algorithms import MAMLPlusPlusSpec, MetaCurvatureSpec
from metaserve.workers.spec import ResNet12Spec
from metaserve.workers.tasks import build_task_family

RELATIVE = 1e-9
NORMS = ["batch", "support", "instance", "layer", "none"]


# --------------------------------------------------------------------------- the reference


def mse(prediction, target):
    return ((prediction - target) ** 2).mean()


def msl_weights(steps: int, iteration: int, anneal: int) -> list[float]:
    """MAML++'s per-step loss importance (Antoniou et al.'s get_per_step_loss_importance_vector)."""
    if iteration >= anneal:
        return [0.0] * (steps - 1) + [1.0]
    weights = [1.0 / steps] * steps
    decay = 1.0 / steps / anneal
    floor = 0.03 / steps
    for i in range(steps - 1):
        weights[i] = max(weights[i] - iteration * decay, floor)
    weights[-1] = min(weights[-1] + iteration * (steps - 1) * decay, 1.0 - (steps - 1) * floor)
    return weights


def kronecker_transform(leaves, name, grad):
    """Meta-Curvature's transform as an explicit Kronecker product on the row-major vec(G)."""
    out = leaves[f"curvature.{name}.out"]
    if grad.dim() == 1:
        return out @ grad
    if grad.dim() == 2:
        return (torch.kron(out, leaves[f"curvature.{name}.in"].T.contiguous()) @ grad.reshape(-1)).reshape(grad.shape)
    matrix = torch.kron(torch.kron(out, leaves[f"curvature.{name}.in"].T.contiguous()), leaves[f"curvature.{name}.filter"].T.contiguous())
    return (matrix @ grad.reshape(-1)).reshape(grad.shape)


class Reference:
    """The per-task reference for ``kind`` (maml, fomaml, metasgd, anil, reptile, mamlpp,
    metacurvature) over ``model``; ``loss`` is MSE or cross-entropy; ``norm`` the model's."""

    def __init__(self, kind, model, *, lr, steps, classification, weights=None, first_order=False):
        self.kind, self.model, self.lr, self.steps = kind, model, lr, steps
        self.loss = F.cross_entropy if classification else mse
        self.weights = weights  # MAML++: the multi-step loss weights
        self.first_order = first_order or kind == "fomaml"
        self.norm = getattr(model, "norm_mode", "none")

    def forward(self, fast, x):
        return self.model(fast, x)

    def query_forward(self, fast, support_x, query_x):
        """Training-time query outputs: batch norm transductive (the query's own statistics),
        support norm with the support set's statistics, other norms per example."""
        if self.norm == "support":
            rows = support_x.shape[0]
            return self.model(fast, torch.cat([support_x, query_x]), stats_rows=rows)[rows:]
        return self.model(fast, query_x)

    def step(self, leaves, fast, names, loss, step):
        grads = torch.autograd.grad(loss, [fast[n] for n in names], create_graph=not self.first_order)
        updated = dict(fast)
        for name, g in zip(names, grads):
            if self.kind == "metasgd":
                updated[name] = fast[name] - leaves[f"inner_lr.{name}"] * g
            elif self.kind == "mamlpp":
                rates = leaves[f"lslr.{name}"]
                updated[name] = fast[name] - rates[min(step, rates.shape[0] - 1)] * g
            elif self.kind == "metacurvature":
                updated[name] = fast[name] - self.lr * kronecker_transform(leaves, name, g)
            else:
                updated[name] = fast[name] - self.lr * g
        return updated

    def model_names(self, leaves):
        return [n for n in leaves if not n.startswith(("inner_lr.", "lslr.", "curvature."))]

    def task_objective(self, leaves, support_x, support_y, query_x, query_y):
        names = self.model_names(leaves)
        fast = {n: leaves[n] for n in names}
        if self.kind == "anil":
            head = list(self.model.head_names)
            if self.norm == "support":
                rows = support_x.shape[0]
                both = self.model.features(fast, torch.cat([support_x, query_x]), stats_rows=rows)
                support_h, query_h = both[:rows], both[rows:]
            else:
                support_h, query_h = self.model.features(fast, support_x), self.model.features(fast, query_x)
            for step in range(self.steps):
                loss = self.loss(self.model.head(fast, support_h), support_y)
                fast = self.step(leaves, fast, head, loss, step)
            return self.loss(self.model.head(fast, query_h), query_y)
        objective = 0.0
        for step in range(self.steps):
            fast = self.step(leaves, fast, names, self.loss(self.forward(fast, support_x), support_y), step)
            if self.kind == "mamlpp" and step < self.steps - 1:
                if self.weights[step]:
                    objective = objective + self.weights[step] * self.loss(
                        self.query_forward(fast, support_x, query_x), query_y)
        final = self.loss(self.query_forward(fast, support_x, query_x), query_y)
        return objective + (self.weights[-1] if self.kind == "mamlpp" else 1.0) * final

    def meta_gradient(self, params, support_x, support_y, query_x, query_y):
        total = {name: torch.zeros_like(value) for name, value in params.items()}
        for task in range(support_x.shape[0]):
            leaves = {name: value.detach().clone().requires_grad_(True) for name, value in params.items()}
            if self.kind == "reptile":
                names = self.model_names(leaves)
                fast = {n: leaves[n] for n in names}
                for step in range(self.steps):
                    loss = self.loss(self.forward(fast, support_x[task]), support_y[task])
                    grads = torch.autograd.grad(loss, [fast[n] for n in names])
                    fast = {n: (fast[n] - self.lr * g).detach().requires_grad_(True) for n, g in zip(names, grads)}
                for name in names:
                    total[name] += (leaves[name] - fast[name]).detach()
                continue
            objective = self.task_objective(leaves, support_x[task], support_y[task], query_x[task], query_y[task])
            grads = torch.autograd.grad(objective, list(leaves.values()), allow_unused=True)
            for name, g in zip(leaves, grads):
                if g is not None:
                    total[name] += g
        return total


# --------------------------------------------------------------------------- the comparison


def assert_relative(actual, expected):
    """Each tensor within 1e-9 of its own norm — or, where that norm is below 1e-5 of the whole
    meta-gradient's (a conv bias before a norm: a per-channel constant the norm removes, whose
    true gradient is zero and both sides rounding noise ~1e-15), within 1e-9 of that 1e-5."""
    assert actual.keys() == expected.keys()
    total = float(torch.cat([value.reshape(-1) for value in expected.values()]).norm())
    for name in expected:
        assert actual[name].dtype == torch.float64, name
        scale = max(float(expected[name].norm()), 1e-5 * total)
        error = float((actual[name] - expected[name]).norm())
        assert error <= RELATIVE * scale, f"{name}: |Δ| {error:.3e} vs |g| {scale:.3e}"


def perturbed(params, generator):
    """Learned-optimizer parameters moved off their initial values (so a transform that is
    the identity, or rates all equal, cannot hide a wrong index or transpose)."""
    out = {}
    for name, value in params.items():
        if name.startswith(("inner_lr.", "lslr.")):
            out[name] = value * (0.5 + torch.rand(value.shape, generator=generator, dtype=value.dtype))
        elif name.startswith("curvature."):
            out[name] = value + 0.1 * torch.randn(value.shape, generator=generator, dtype=value.dtype)
        else:
            out[name] = value
    return out


def sine_batch(tasks: int = 3):
    batch = build_task_family(SineSpec(support_shots=5, query_shots=6)).sample(
        seed=0, split="train", iteration=0, task_indices=range(tasks))
    return [t.double() for t in batch]


SINE_CASES = {
    "maml-2": (MAMLSpec(inner_steps=2, inner_lr=0.1), "maml", {}),
    "fomaml-2": (MAMLSpec(inner_steps=2, inner_lr=0.1, first_order=True), "fomaml", {}),
    "metasgd-2": (MetaSGDSpec(inner_steps=2, inner_lr=0.1), "metasgd", {}),
    "anil-3": (ANILSpec(inner_steps=3, inner_lr=0.1), "anil", {}),
    "reptile-3": (ReptileSpec(inner_steps=3, inner_lr=0.05), "reptile", {}),
    # MAML++: halfway through the multi-step loss annealing (every step weighted), second order
    "mamlpp-3-msl": (MAMLPlusPlusSpec(inner_steps=3, inner_lr=0.1, multi_step_loss_iterations=100), "mamlpp",
                     {"iteration": 40}),
    # after the annealing: the last step's loss alone
    "mamlpp-3-final": (MAMLPlusPlusSpec(inner_steps=3, inner_lr=0.1, multi_step_loss_iterations=10), "mamlpp",
                       {"iteration": 50}),
    # derivative-order annealing: still first order at iteration 5 of 20
    "mamlpp-2-first-order": (MAMLPlusPlusSpec(inner_steps=2, inner_lr=0.1, multi_step_loss_iterations=100,
                                              first_order_iterations=20), "mamlpp", {"iteration": 5}),
    "metacurvature-2": (MetaCurvatureSpec(inner_steps=2, inner_lr=0.1), "metacurvature", {}),
}


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast_path", "vmapped"])
@pytest.mark.parametrize("case", sorted(SINE_CASES))
def test_sine_mlp_meta_gradient_equals_the_float64_per_task_reference(case, fast_path):
    spec, kind, extra = SINE_CASES[case]
    model = build_model(MLPSpec(hidden=[16, 16]), (1,), 1)
    algorithm = build_algorithm(spec, model, classification=False, fast_path=fast_path)
    generator = torch.Generator().manual_seed(0)
    params = perturbed({n: v.double() for n, v in algorithm.init_params(generator).items()}, generator)
    weights, first_order = None, False
    if kind == "mamlpp":
        iteration = extra["iteration"]
        algorithm.begin_iteration(iteration)
        weights = msl_weights(spec.inner_steps, iteration, spec.multi_step_loss_iterations)
        first_order = iteration < spec.first_order_iterations
    batch = sine_batch()
    grads, _ = algorithm.meta_gradient(params, *batch)
    reference = Reference(kind, model, lr=spec.inner_lr, steps=spec.inner_steps, classification=False,
                          weights=weights, first_order=first_order)
    assert_relative(grads, reference.meta_gradient(params, *batch))


def test_the_reference_tells_second_from_first_order_and_the_loss_weights_apart():
    """The checks above can fail: FOMAML's, and MAML++ with another iteration's loss weights,
    differ from the second-order / right-weighted reference far beyond 1e-9."""
    model = build_model(MLPSpec(hidden=[16, 16]), (1,), 1)
    batch = sine_batch()
    generator = torch.Generator().manual_seed(0)
    maml = build_algorithm(MAMLSpec(inner_steps=2, inner_lr=0.1, first_order=True), model, classification=False)
    params = {n: v.double() for n, v in maml.init_params(generator).items()}
    grads, _ = maml.meta_gradient(params, *batch)
    second = Reference("maml", model, lr=0.1, steps=2, classification=False).meta_gradient(params, *batch)
    with pytest.raises(AssertionError):
        assert_relative(grads, second)
    spec = MAMLPlusPlusSpec(inner_steps=3, inner_lr=0.1, multi_step_loss_iterations=100)
    mamlpp = build_algorithm(spec, model, classification=False)
    params = {n: v.double() for n, v in mamlpp.init_params(torch.Generator().manual_seed(0)).items()}
    mamlpp.begin_iteration(0)
    grads, _ = mamlpp.meta_gradient(params, *batch)
    wrong = Reference("mamlpp", model, lr=0.1, steps=3, classification=False,
                      weights=msl_weights(3, 60, 100)).meta_gradient(params, *batch)
    with pytest.raises(AssertionError):
        assert_relative(grads, wrong)


def image_batch(tasks: int = 2, ways: int = 3, shots: int = 2, queries: int = 2, size: int = 16):
    generator = torch.Generator().manual_seed(3)
    support_x = torch.rand(tasks, ways * shots, 1, size, size, generator=generator, dtype=torch.float64)
    query_x = torch.rand(tasks, ways * queries, 1, size, size, generator=generator, dtype=torch.float64)
    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return support_x, support_y, query_x, query_y


IMAGE_MODELS = {"conv4": lambda norm: Conv4Spec(filters=4, norm=norm),
                "resnet12": lambda norm: ResNet12Spec(widths=(2, 3, 4, 5), norm=norm)}


@pytest.mark.slow  # second order through convolutions, twice (engine and reference): seconds each
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("network", sorted(IMAGE_MODELS))
def test_image_model_maml_meta_gradient_equals_the_float64_reference_for_each_norm(network, norm):
    model = build_model(IMAGE_MODELS[network](norm), (1, 16, 16), 3)
    steps = 2 if network == "conv4" else 1  # ResNet-12's second-order step costs ~10x conv4's
    algorithm = build_algorithm(MAMLSpec(inner_steps=steps, inner_lr=0.1), model, classification=True)
    params = {n: v.double() for n, v in algorithm.init_params(torch.Generator().manual_seed(0)).items()}
    batch = image_batch()
    grads, _ = algorithm.meta_gradient(params, *batch)
    reference = Reference("maml", model, lr=0.1, steps=steps, classification=True)
    assert_relative(grads, reference.meta_gradient(params, *batch))


@pytest.mark.slow
@pytest.mark.parametrize("kind,spec", [
    ("anil", ANILSpec(inner_steps=2, inner_lr=0.1)),
    ("mamlpp", MAMLPlusPlusSpec(inner_steps=2, inner_lr=0.1, multi_step_loss_iterations=100)),
    ("metacurvature", MetaCurvatureSpec(inner_steps=1, inner_lr=0.1)),
], ids=lambda value: value if isinstance(value, str) else "")
@pytest.mark.parametrize("norm", ["batch", "support"])
def test_conv4_learned_optimizers_and_anil_equal_the_float64_reference(kind, spec, norm):
    model = build_model(Conv4Spec(filters=4, norm=norm), (1, 16, 16), 3)
    algorithm = build_algorithm(spec, model, classification=True)
    generator = torch.Generator().manual_seed(0)
    params = perturbed({n: v.double() for n, v in algorithm.init_params(generator).items()}, generator)
    weights = None
    if kind == "mamlpp":
        algorithm.begin_iteration(30)
        weights = msl_weights(2, 30, 100)
    batch = image_batch()
    grads, _ = algorithm.meta_gradient(params, *batch)
    reference = Reference(kind, model, lr=0.1, steps=spec.inner_steps, classification=True, weights=weights)
    assert_relative(grads, reference.meta_gradient(params, *batch))
