"""kvlab.params: the shared registrar of named parameter dataclasses."""

import dataclasses

import pytest

from kvlab.params import registrar


def test_a_registrar_makes_frozen_dataclasses_and_refuses_a_second_class_under_one_name():
    registry: dict[str, type] = {}
    register = registrar(registry, "thing")

    @register("a")
    class A:
        x: int = 1

    assert registry == {"a": A} and A.name == "a" and A().x == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        A().x = 2
    assert register("a")(A) is A  # registering the same class again is harmless
    with pytest.raises(ValueError, match="thing 'a' registered twice"):
        @register("a")
        class B:
            pass
