"""Named registries: the only way a config or a checkpoint turns into objects.

A config (or a checkpoint's stored config) names a component by ``name`` and gives plain
values for its options. ``Registry.build`` looks the name up, checks every option against the
builder's signature and calls it. Nothing is imported, instantiated or interpolated from a
string, so a crafted checkpoint can at most pick among tl's own components (compare Hydra's
``instantiate``, which calls whatever ``_target_`` names).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

from tl_cli.core.errors import TLError

T = TypeVar("T")


def plain(value: Any) -> Any:
    """An OmegaConf node (resolved) or a plain value, as plain Python containers."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def did_you_mean(word: str, options: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(options), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(close)}?)" if close else ""


class Registry(Generic[T]):
    """name -> builder (a class or a function). Duplicates are a programming error.

    Args:
        kind: the config group it serves (``head``, ``strategy``, ...), used in error lines.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str, builder: Callable[..., T] | None = None) -> Any:
        """``REG.register("x", fn)`` or ``@REG.register("x")`` on a class or function."""

        def add(b: Callable[..., T]) -> Callable[..., T]:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = b
            return b

        return add(builder) if builder is not None else add

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: Any) -> Callable[..., T]:
        if not isinstance(name, str) or name not in self._items:
            known = ", ".join(self._items)
            hint = did_you_mean(str(name), self.names())
            raise TLError(
                f"{self.kind}.name={name!r} is not a known {self.kind}{hint}; known: {known}"
            )
        return self._items[name]

    def options(self, name: str) -> list[str]:
        """The option names a builder accepts (its keyword parameters)."""
        b: Any = self.get(name)
        fixed: set[str] = set()
        if isinstance(b, functools.partial):  # e.g. one class registered under several names
            fixed, b = set(b.keywords), b.func
        # a class whose __init__ passes **kw on: its bases' options count too
        funcs = (
            [c.__init__ for c in b.__mro__ if "__init__" in vars(c)] if isinstance(b, type) else [b]
        )
        out: list[str] = []
        for f in funcs:
            params = inspect.signature(f).parameters.values()
            out += [
                p.name
                for p in params
                if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                and p.name != "self"
                and p.name not in out
                and p.name not in fixed
            ]
            if not any(p.kind == p.VAR_KEYWORD for p in params):
                break
        return out

    def build(self, cfg: Mapping[str, Any], **runtime: Any) -> T:
        """Build from ``{name: ..., option: value, ...}`` plus values only the run knows.

        An unknown option is an error naming it (no silent leftovers); a builder's ValueError or
        TypeError becomes one line naming the group.
        """
        cfg = dict(plain(cfg) or {})
        name = cfg.pop("name", None)
        builder = self.get(name)
        allowed = set(self.options(name))
        unknown = sorted(k for k in cfg if k not in allowed)
        if unknown:
            k = unknown[0]
            valid = sorted(allowed - set(runtime))
            raise TLError(
                f"{self.kind}.{k} is not an option of {self.kind}={name}{did_you_mean(k, valid)}; "
                f"options: {', '.join(valid) or 'none'}"
            )
        try:
            return builder(**cfg, **runtime)
        except TLError:
            raise
        except (ValueError, TypeError) as e:
            raise TLError(f"{self.kind}={name}: {e}") from None
