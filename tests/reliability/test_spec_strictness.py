"""Integers in a job spec are integers: ``"5"``, ``5.0`` and ``true`` are refused at every
integer field of a complete spec of every algorithm (a float field still takes ``1``); conv4
on images under 16 pixels is refused at validation, not at run time."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from metaserve.workers.spec import JobSpec
from tests.helpers import bearer, number_paths, valid_specs


def with_value(spec: dict, path: tuple, value: object) -> dict:
    copy = JobSpec.model_validate(spec).model_dump(mode="json")
    node = copy
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return copy


def integer_paths(spec: dict) -> list[tuple]:
    paths = []
    for path in number_paths(spec):
        node = spec
        for key in path:
            node = node[key]
        if isinstance(node, int):
            paths.append(path)
    return paths


def test_string_float_and_bool_at_every_integer_field_are_refused_naming_it():
    refused, tried = {}, 0
    for spec in valid_specs():
        for path in integer_paths(spec):
            value = spec
            for key in path:
                value = value[key]
            for wrong in (str(value), float(value), True):
                tried += 1
                try:
                    JobSpec.model_validate(with_value(spec, path, wrong))
                except ValidationError as error:
                    locs = [tuple(e["loc"]) for e in error.errors()]
                    refused[(spec["algorithm"]["name"], path, repr(wrong))] = any(
                        tuple(str(p) for p in loc)[-len(path[-1:]):] == (str(path[-1]),)
                        for loc in locs)
                else:
                    refused[(spec["algorithm"]["name"], path, repr(wrong))] = False
    assert tried > 150
    assert [key for key, ok in refused.items() if not ok] == []


def test_a_float_field_still_accepts_an_integer():
    spec = JobSpec.model_validate({"algorithm": {"name": "maml", "inner_lr": 1},
                                   "task_family": {"name": "sine"}})
    assert spec.algorithm.inner_lr == 1.0 and isinstance(spec.algorithm.inner_lr, float)


@pytest.mark.parametrize("wrong", ['"1000"', "1000.0", "true"])
def test_api_refuses_a_non_integer_iterations_with_422_naming_it(client, alice_key, wrong):
    body = '{"algorithm": {"name": "maml"}, "task_family": {"name": "sine"}, "iterations": %s}'
    response = client.post("/v1/jobs", content=body % wrong,
                           headers={**bearer(alice_key), "Content-Type": "application/json"})
    assert response.status_code == 422
    assert [d["field"] for d in response.json()["error"]["details"]] == ["iterations"]


@pytest.mark.parametrize("size", [8, 15])
def test_conv4_on_images_under_16_pixels_is_422_naming_the_fields(client, alice_key, size):
    spec = {"algorithm": {"name": "maml"},
            "task_family": {"name": "glyphs", "image_size": size}}
    response = client.post("/v1/jobs", json=spec, headers=bearer(alice_key))
    assert response.status_code == 422
    assert response.json()["error"]["details"] == [{
        "field": "model", "type": "value_error",
        "message": f"Value error, conv4 needs task_family.image_size >= 16 (four 2x poolings), "
                   f"got {size}"}]
    ok = client.post("/v1/jobs", json={**spec, "task_family": {"name": "glyphs", "image_size": 16}},
                     headers=bearer(alice_key))
    assert ok.status_code == 201
