"""Validators for plugin option classes (and the engine's own config sections).

A plugin declares its options as an attrs class and passes it to ``register(..., options=Cls)``;
the user's mapping (``scheduler.options``, ``kv_cache.policy_options``, ``metrics.options.<sink>``,
``backend.options``) is structured into it with errors that name the full path, e.g.
``scheduler.options.aging_tokens_per_second: must be >= 0, got -1``::

    import attrs
    from sagellm_core.options import at_least, one_of, with_path

    @attrs.frozen
    class MyOptions:
        window: int = attrs.field(default=8, validator=at_least(1))
        mode: str = attrs.field(default="fast", validator=one_of("fast", "exact"))
        ratio: float = attrs.field(default=0.5, validator=with_path(attrs.validators.le(1.0)))

Types are checked strictly (``"5"`` is not an int, ``1`` is not a bool); unknown keys are refused.
``with_path`` wraps any stock ``attrs.validators`` validator so that its error keeps the field
name (a bare ``attrs.validators.ge`` raises an error cattrs cannot attribute to a field).
"""

from __future__ import annotations

from typing import Any, Callable

import attrs

Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


class FieldError(ValueError):
    """Raised by validators so the error path can name the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def at_least(minimum: float) -> Validator:
    """``value >= minimum`` (None passes: combine with an ``int | None`` field for "optional")."""
    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None and value < minimum:
            raise FieldError(attribute.name, f"must be >= {minimum}, got {value}")
    return check


def in_range(low: float, high: float, *, low_open: bool = False) -> Validator:
    """``low <= value <= high`` (``low < value`` with ``low_open``); None passes."""
    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        bad_low = value <= low if low_open else value < low
        if value is not None and (bad_low or value > high):
            bracket = "(" if low_open else "["
            raise FieldError(attribute.name, f"must be in {bracket}{low}, {high}], got {value}")
    return check


def one_of(*choices: str) -> Validator:
    """``value in choices``."""
    def check(_: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in choices:
            raise FieldError(attribute.name, f"must be one of {', '.join(choices)}; got {value!r}")
    return check


def with_path(validator: Validator) -> Validator:
    """Wrap a stock validator (``attrs.validators.ge(0)``, ``matches_re(...)``, ...) so that the
    error it raises names the field: ``kv_cache.policy_options.ratio: 'ratio' must be <= 1.0: 2.0``."""
    def check(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
        try:
            validator(instance, attribute, value)
        except FieldError:
            raise
        except (ValueError, TypeError) as exc:
            message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
            raise FieldError(attribute.name, message) from None
    return check


def structure_options(options_class: type | None, data: dict[str, Any], path: str) -> Any:
    """Validate a plugin's option mapping against its attrs class (errors name ``path.field``).

    Without an options class, only an empty mapping is accepted and ``{}`` is returned.
    """
    from sagellm_core.config import structure_plugin_options

    return structure_plugin_options(options_class, data, path)


__all__ = ["FieldError", "Validator", "at_least", "in_range", "one_of", "structure_options", "with_path"]
