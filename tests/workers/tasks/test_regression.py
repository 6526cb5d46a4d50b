import math

import torch

from metaserve.workers.spec import LinearSpec, SineSpec
from metaserve.workers.tasks import build_task_family
from metaserve.workers.tasks.base import task_seed
from metaserve.workers.tasks.regression import counter_uniform

MASK = 2**64 - 1


def splitmix64_reference(key: int, counter: int) -> float:
    z = (key + counter * 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    z = z ^ (z >> 31)
    return (z >> 40) / 2**24


def test_counter_uniform_matches_python_splitmix64():
    keys = [task_seed(0, "train", 0, t) for t in range(3)] + [2**63 - 1, 0]
    values = counter_uniform(torch.tensor(keys, dtype=torch.int64), 7)
    expected = torch.tensor([[splitmix64_reference(k, c) for c in range(1, 8)] for k in keys])
    assert torch.equal(values, expected)


def test_sine_task_is_the_same_whichever_shard_samples_it():
    family = build_task_family(SineSpec())
    whole = family.sample(seed=3, split="train", iteration=7, task_indices=range(6))
    shard = family.sample(seed=3, split="train", iteration=7, task_indices=[4, 5])
    for full, part in zip(whole, shard):
        assert torch.equal(full[4:], part)


def test_sine_tasks_differ_across_iterations_and_splits():
    family = build_task_family(SineSpec())
    first = family.sample(seed=0, split="train", iteration=0, task_indices=[0])
    assert not torch.equal(first.query_y, family.sample(seed=0, split="train", iteration=1, task_indices=[0]).query_y)
    assert not torch.equal(first.query_y, family.sample(seed=0, split="val", iteration=0, task_indices=[0]).query_y)


def test_sine_shapes_ranges_and_function():
    spec = SineSpec(support_shots=7, query_shots=3)
    batch = build_task_family(spec).sample(seed=0, split="train", iteration=0, task_indices=range(500))
    assert [tuple(t.shape) for t in batch] == [(500, 7, 1), (500, 7, 1), (500, 3, 1), (500, 3, 1)]
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    assert x.min() >= -5.0 and x.max() < 5.0
    assert y.abs().max() <= 5.0
    # amplitudes span U[0.1, 5]: the largest |y| per task reaches beyond 3 for some tasks only
    assert y.abs().amax(dim=(1, 2)).min() < 5.0 and y.abs().amax(dim=(1, 2)).max() > 3.0


def test_query_points_do_not_depend_on_support_shots():
    family = build_task_family(SineSpec())
    ten = family.sample(seed=0, split="test", iteration=0, task_indices=range(4))
    five = family.sample(seed=0, split="test", iteration=0, task_indices=range(4), support_shots=5)
    assert torch.equal(ten.query_x, five.query_x) and torch.equal(ten.query_y, five.query_y)
    assert five.support_x.shape == (4, 5, 1)


def test_linear_without_noise_is_exactly_linear():
    batch = build_task_family(LinearSpec()).sample(seed=1, split="train", iteration=0, task_indices=range(20))
    x, y = batch.support_x[..., 0], batch.support_y[..., 0]
    slope = (y[:, 1] - y[:, 0]) / (x[:, 1] - x[:, 0])
    intercept = y[:, 0] - slope * x[:, 0]
    torch.testing.assert_close(slope[:, None] * batch.query_x[..., 0] + intercept[:, None], batch.query_y[..., 0],
                               atol=1e-4, rtol=1e-4)
    assert slope.abs().max() <= 3.0 + 1e-4


def test_linear_noise_has_the_requested_standard_deviation():
    clean = build_task_family(LinearSpec(query_shots=100)).sample(seed=1, split="train", iteration=0,
                                                                   task_indices=range(200))
    noisy = build_task_family(LinearSpec(query_shots=100, noise_std=0.5)).sample(
        seed=1, split="train", iteration=0, task_indices=range(200))
    noise = noisy.query_y - clean.query_y
    assert math.isclose(float(noise.std()), 0.5, rel_tol=0.05)
    assert abs(float(noise.mean())) < 0.02
