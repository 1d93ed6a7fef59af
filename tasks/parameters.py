"""One shape for every flow's parameters: a pydantic model, validated once before anything
is read or changed, whose error names the parameter.

A flow's signature carries the types the Prefect UI renders as its Custom run form; the
flow's `FlowParameters` model carries the rules (ranges, combinations). `parse(**arguments)`
takes the flow's arguments as given: `None` for a parameter that cannot be empty means
its default (the form sends `None` for a field left blank), while for one that can be
empty (`max_minutes`, `late_after_hours`...) it is a real choice. A bad value raises
`ParameterError`, whose message starts with the parameter's name; the command line shows
the same message with the option's name.
"""

from __future__ import annotations

import types
from typing import Any, ClassVar, Self, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationError


class ParameterError(ValueError):
    """A flow parameter that cannot be accepted; the message starts with its name."""


def _can_be_empty(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


class FlowParameters(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # "retention parameters", as error messages call them.
    described_as: ClassVar[str] = "parameters"

    @classmethod
    def parse(cls, **arguments: Any) -> Self:
        given = {
            name: value
            for name, value in arguments.items()
            if value is not None
            or (name in cls.model_fields and _can_be_empty(cls.model_fields[name].annotation))
        }
        try:
            return cls.model_validate(given)
        except ValidationError as error:
            problems = "; ".join(cls.describe_problem(item) for item in error.errors())
            raise ParameterError(f"invalid {cls.described_as}: {problems}") from None

    @classmethod
    def describe_problem(cls, item: dict[str, Any]) -> str:
        """One problem of a `ValidationError`, as `name: what is wrong`."""
        name = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden" and len(item["loc"]) == 1:
            return f"{name}: is not one of the {cls.described_as}"
        return f"{name}: {item['msg'].removeprefix('Value error, ')}"
