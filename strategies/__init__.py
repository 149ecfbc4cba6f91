"""Server strategies as pure math over torch tensors (no Flower, Ray or I/O).

Each method is one module of this package; importing the package imports all of them, and each
strategy class registers itself by subclassing :class:`strategies.base.Strategy` with its own
``name`` (:data:`REGISTRY`). :func:`build` returns the strategy a config names.
"""

from __future__ import annotations

import importlib
import pkgutil

from strategies.base import REGISTRY, ClientSpec, ClientUpdate, GlobalModel, Payload, ServerState, Strategy

for _module in pkgutil.iter_modules(__path__):  # every module: a new strategy is one file here
    importlib.import_module(f"{__name__}.{_module.name}")
del _module
for _name in sorted(REGISTRY):  # by name, not by the order imports happened to define them
    REGISTRY[_name] = REGISTRY.pop(_name)
del _name


def __getattr__(name: str) -> type[Strategy]:
    """A registered strategy class by its class name (``from strategies import FedSB``)."""
    for cls in REGISTRY.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def personalized(name: str) -> bool:
    """Whether strategy ``name`` evaluates each client's own model on a held-out split of its
    partition (``personalized``, FedSA-LoRA) instead of one global model on the server."""
    return REGISTRY[name].personalized


def build(name: str, **kwargs) -> Strategy:
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"strategy.name: unknown strategy {name!r}; expected one of {', '.join(REGISTRY)}") from None
    return cls(**kwargs)


__all__ = ["ClientSpec", "ClientUpdate", "GlobalModel", "Payload", "ServerState", "Strategy", "build", "personalized", "REGISTRY"]
