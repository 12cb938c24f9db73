"""Config fields that carry their one-line documentation, the single source of ``--help`` and the README's
config table: ``steps: int = doc_field(3600, "T, the total number of optimizer steps")``."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar, overload

T = TypeVar("T")
_DOC = "doc"  # the key of the field's metadata that holds its doc


@overload
def doc_field(default: T, doc: str) -> T: ...


@overload
def doc_field(*, doc: str) -> Any: ...


def doc_field(default: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """A dataclass field with ``default`` (none: a required field) and its one-line ``doc``. A list default
    is copied for each instance: dataclasses refuse a mutable default that every instance would share."""
    metadata = {_DOC: doc}
    if isinstance(default, list):
        return dataclasses.field(default_factory=default.copy, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_doc(cls: type, name: str) -> str:
    """The doc of field ``name`` of dataclass ``cls``, or "" when it has none. A family's config redeclares an
    inherited field only to change its default, so the nearest class in the MRO that documents it gives it."""
    for klass in cls.__mro__:
        declared = getattr(klass, "__dataclass_fields__", {}).get(name)
        if declared is not None and _DOC in declared.metadata:
            return declared.metadata[_DOC]
    return ""
