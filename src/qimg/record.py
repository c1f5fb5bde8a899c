"""``@dataclass`` for qimg's own record classes, without the standard module.

``import dataclasses`` imports inspect, and inspect ast, dis, tokenize and
more: about 9 ms, a quarter of ``qimg info``'s whole run.  This module makes
the same methods the same way (generated source, compiled once per class)
for what qimg's classes use: fields from the class annotations in order,
defaults, ``field(default_factory=...)``, ``frozen``, ``slots`` and
``__post_init__``; instances compare equal field by field and print as
dataclasses do.  No inheritance between records, no ``ClassVar`` fields.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

T = TypeVar("T")


class FrozenInstanceError(AttributeError):
    pass


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], Any]) -> Any:
    return _Factory(default_factory)


def dataclass(cls: type[T] | None = None, /, *, frozen: bool = False, slots: bool = False) -> Any:
    def wrap(c: type[T]) -> type[T]:
        return _build(c, frozen, slots)

    return wrap if cls is None else wrap(cls)


def _frozen_setattr(self: Any, name: str, value: Any) -> None:
    raise FrozenInstanceError(f"cannot assign to field '{name}'")


def _frozen_delattr(self: Any, name: str) -> None:
    raise FrozenInstanceError(f"cannot delete field '{name}'")


def _build(cls: type[T], frozen: bool, slots: bool) -> type[T]:
    names = list(cls.__dict__.get("__annotations__", {}))
    env: dict[str, Any] = {"_object_setattr": object.__setattr__}
    params, body = [], []
    for name in names:
        default = cls.__dict__.get(name, _Factory)
        if isinstance(default, _Factory):
            env[f"_make_{name}"] = default.make
            params.append(f"{name}=_Factory")
            value = f"_make_{name}() if {name} is _Factory else {name}"
        elif default is _Factory:
            params.append(name)
            value = name
        else:
            env[f"_dflt_{name}"] = default
            params.append(f"{name}=_dflt_{name}")
            value = name
        body.append(f"_object_setattr(self, {name!r}, {value})" if frozen else f"self.{name} = {value}")
    if "__post_init__" in cls.__dict__:
        body.append("self.__post_init__()")
    env["_Factory"] = _Factory
    fields = "".join(f"self.{n}, " for n in names)
    other = "".join(f"other.{n}, " for n in names)
    shown = ", ".join(f"{n}={{self.{n}!r}}" for n in names)
    src = (f"def __init__(self, {', '.join(params)}):\n    " + ("\n    ".join(body) or "pass") + "\n"
           "def __eq__(self, other):\n"
           "    if other.__class__ is not self.__class__:\n        return NotImplemented\n"
           f"    return ({fields}) == ({other})\n"
           f"def __repr__(self):\n    return f\"{{self.__class__.__qualname__}}({shown})\"\n"
           f"def __hash__(self):\n    return hash(({fields}))\n")
    exec(src, env)  # noqa: S102 - source made above from the class's own field names
    methods = {key: env[key] for key in ("__init__", "__eq__", "__repr__")}
    methods["__hash__"] = env["__hash__"] if frozen else None
    if frozen:
        methods["__setattr__"], methods["__delattr__"] = _frozen_setattr, _frozen_delattr
    for fn in (env["__init__"], env["__eq__"], env["__repr__"], env["__hash__"]):
        fn.__qualname__ = f"{cls.__qualname__}.{fn.__name__}"
    if not slots:
        for name in names:
            if isinstance(cls.__dict__.get(name), _Factory):
                delattr(cls, name)
        for key, value in methods.items():
            setattr(cls, key, value)
        return cls
    # slots: a new class, as the defaults cannot stay class attributes
    ns = {k: v for k, v in cls.__dict__.items() if k not in names and k not in ("__dict__", "__weakref__")}
    ns.update(methods, __slots__=tuple(names))
    new = type(cls)(cls.__name__, cls.__bases__, ns)
    new.__qualname__ = cls.__qualname__
    return new
