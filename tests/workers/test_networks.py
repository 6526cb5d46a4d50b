import pytest
import torch
import torch.nn.functional as F
from torch.func import vmap

from metaserve.workers.algorithms import build_algorithm
from metaserve.workers.networks import build_model, max_pool2
from metaserve.workers.spec import ANILSpec, Conv4Spec, MAMLSpec, MLPSpec, PromptSpec


def images(tasks=3, shots=4, size=28, channels=1):
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(tasks, shots, channels, size, size, generator=generator)
    y = torch.arange(shots).remainder(2).repeat(tasks, 1)
    return x, y


def test_mlp_matches_torch_sequential_with_the_same_weights():
    model = build_model(MLPSpec(hidden=[8, 5], activation="tanh"), (3,), 2)
    params = model.init_params(torch.Generator().manual_seed(1))
    reference = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 5), torch.nn.Tanh(),
                                    torch.nn.Linear(5, 2))
    with torch.no_grad():
        for layer, prefix in zip(reference[::2], ["layers.0", "layers.1", "head"]):
            layer.weight.copy_(params[f"{prefix}.weight"])
            layer.bias.copy_(params[f"{prefix}.bias"])
    x = torch.randn(7, 3)
    torch.testing.assert_close(model(params, x), reference(x))


def test_model_init_is_a_function_of_the_seed():
    model = build_model(Conv4Spec(filters=4), (1, 28, 28), 5)
    first = model.init_params(torch.Generator().manual_seed(3))
    second = model.init_params(torch.Generator().manual_seed(3))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.mark.parametrize("norm", ["batch", "layer", "none"])
def test_conv4_vmapped_over_tasks_equals_each_task_alone(norm):
    model = build_model(Conv4Spec(filters=6, norm=norm), (1, 28, 28), 5)
    params = model.init_params(torch.Generator().manual_seed(0))
    x, _ = images()
    batched = vmap(model, in_dims=(None, 0))(params, x)
    assert batched.shape == (3, 4, 5)
    for task in range(3):
        torch.testing.assert_close(batched[task], model(params, x[task]), atol=1e-6, rtol=1e-6)


def test_conv4_batch_norm_uses_the_statistics_of_each_task_batch():
    model = build_model(Conv4Spec(filters=6, norm="batch"), (1, 28, 28), 5)
    params = model.init_params(torch.Generator().manual_seed(0))
    x, _ = images(tasks=1)
    shifted = x.clone()
    shifted[0, 1:] += 0.5  # changes the other examples of the batch only
    assert not torch.allclose(model(params, x[0])[0], model(params, shifted[0])[0])
    layer = build_model(Conv4Spec(filters=6, norm="layer"), (1, 28, 28), 5)
    torch.testing.assert_close(layer(params, x[0])[0], layer(params, shifted[0])[0])


def test_conv4_rejects_images_too_small_for_four_poolings():
    with pytest.raises(ValueError, match="at least 16×16"):
        build_model(Conv4Spec(), (1, 8, 8), 5)


@pytest.mark.parametrize("spec", [MAMLSpec(inner_steps=1, inner_lr=0.05), ANILSpec(inner_steps=2, inner_lr=0.4),
                                  PromptSpec(inner_steps=1, prompt_dim=2)], ids=lambda s: s.name)
def test_conv4_meta_gradient_on_images_has_every_parameter_and_lowers_support_loss(spec):
    prompt_dim = getattr(spec, "prompt_dim", 0)
    model = build_model(Conv4Spec(filters=8), (3, 28, 28), 2, prompt_dim)
    algorithm = build_algorithm(spec, model, classification=True)
    params = algorithm.init_params(torch.Generator().manual_seed(0))
    x, y = images(channels=3)
    grads, metrics = algorithm.meta_gradient(params, x, y, x, y)
    assert grads.keys() == params.keys()
    assert all(torch.isfinite(g).all() and g.shape == params[n].shape for n, g in grads.items())
    assert set(metrics) == {"loss_before", "loss_after", "accuracy_before", "accuracy_after"}
    assert (metrics["loss_after"] < metrics["loss_before"]).all()
    assert params["blocks.0.conv.weight"].shape == (8, 3 + prompt_dim, 3, 3)


@pytest.mark.parametrize("shape", [(3, 4, 28, 28), (2, 5, 7, 7), (2, 3, 3, 5)])
def test_the_pool_without_autograd_is_max_pool2d_bit_for_bit(shape):
    x = torch.randn(shape)
    x[0, 0, :2, :2] = 0.5  # a tied window
    with torch.no_grad():
        assert torch.equal(max_pool2(x), F.max_pool2d(x, 2))
    leaf = x.clone().requires_grad_(True)
    out = max_pool2(leaf)  # with autograd: the pooling kernel, its gradient to the first maximum
    grad, = torch.autograd.grad(out.sum(), leaf)
    expected, = torch.autograd.grad(F.max_pool2d(leaf, 2).sum(), leaf)
    assert torch.equal(grad, expected)


@pytest.mark.parametrize("activation", [F.relu, lambda h: F.leaky_relu(h, 0.1)])
def test_the_activation_after_the_pool_gives_the_same_bits_forward_and_backward(activation):
    """conv4 and ResNet-12 apply their activation after the max-pool: it commutes with a max."""
    x = torch.randn(4, 8, 14, 14)
    x[:, :, :4, :4] = -1.0  # blank borders: ties of negative values
    x[:, :, 4:6, 4:6] = 0.0
    leaf = x.clone().requires_grad_(True)
    before = F.max_pool2d(activation(leaf), 2)
    after = activation(F.max_pool2d(leaf, 2))
    assert torch.equal(before, after)
    upstream = torch.randn_like(before)
    assert torch.equal(*(torch.autograd.grad(out, leaf, upstream)[0] for out in (before, after)))


def test_per_task_first_layer_without_autograd_is_the_convolution():
    """``conv3x3``'s unfold-and-matmul form (per-task weights under vmap, no autograd) gives the
    convolution's values; with autograd it is the convolution itself."""
    from metaserve.workers.networks import conv3x3

    x, weight, bias = torch.rand(3, 6, 1, 9, 9), torch.randn(3, 8, 1, 3, 3), torch.randn(3, 8)
    expected = vmap(lambda h, w, b: F.conv2d(h, w, b, padding=1))(x, weight, bias)
    with torch.no_grad():
        torch.testing.assert_close(vmap(conv3x3)(x, weight, bias), expected, atol=1e-6, rtol=0)
    assert torch.equal(vmap(conv3x3)(x, weight, bias), expected)


@pytest.mark.parametrize("norm", ["batch", "support", "instance", "layer", "none"])
def test_a_forward_without_autograd_gives_the_outputs_of_one_with_it(norm):
    """Without autograd conv4 skips the conv bias where its norm subtracts it again (and pools
    by strided views): the outputs equal the autograd forward's within float rounding."""
    model = build_model(Conv4Spec(filters=8, norm=norm), (1, 28, 28), 5)
    params = model.init_params(torch.Generator().manual_seed(0))
    params = {name: value + 0.3 if name.endswith("conv.bias") else value for name, value in params.items()}
    x = torch.rand(6, 1, 28, 28)
    stats = 2 if norm in ("batch", "support") else None
    with_grad = model(params, x, stats_rows=stats)
    with torch.no_grad():
        torch.testing.assert_close(model(params, x, stats_rows=stats), with_grad, atol=1e-5, rtol=1e-5)
