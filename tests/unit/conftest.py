"""The unit tier runs torch on one thread, and composes configs through a cache of Hydra's work.

One thread: the tier's tensors are small, and on this project's shared 2-core machine a second
intra-op thread only waits for the core the other processes hold: measured beside three other test
runs, the tier took 217 s with torch's default two threads and 81 s with one.

The composition cache: the tier composes about 150 configs (``fedpeft simulate`` config errors,
strategy and PEFT-method checks), nearly all with distinct overrides, and Hydra's composition was
most of the tier's time. :class:`HydraCache` keeps what Hydra computes from the config *group*
choices alone (the defaults list, and the config composed from it), so that a composition that
differs from an earlier one only in ``key=value`` overrides starts from a deep copy of it; Hydra
itself then applies those overrides and fills ``hydra.*`` as always. The config files it reads
(``configs/``, Hydra's own) are parsed once. ``test_hydra_cache.py`` checks that cached and
uncached compositions are the same.
"""

from __future__ import annotations

import contextlib
import copy

import pytest


@pytest.fixture(autouse=True)
def _one_thread_per_unit_test(one_torch_thread):  # tests/conftest.py's fixture, for every unit test
    yield


def store_key() -> tuple:
    """Every node in Hydra's ConfigStore by its path and identity: any config stored, replaced or
    removed (a strategy registered by a test, ``fedpeft.config.register`` run again) changes it."""
    from hydra.core.config_store import ConfigStore

    out: list[tuple[str, int]] = []

    def walk(prefix: str, group: dict) -> None:
        for name, node in group.items():
            if isinstance(node, dict):
                walk(f"{prefix}{name}/", node)
            else:
                out.append((prefix + name, id(node)))

    walk("", ConfigStore.instance().repo)
    return tuple(out)


class HydraCache:
    """Caches the two steps of Hydra 1.3's ``ConfigLoaderImpl._load_configuration_impl`` that depend
    on the group overrides only (its own code splits the overrides this way, in
    ``hydra._internal.defaults_list.Overrides``): ``create_defaults_list`` and
    ``_compose_config_from_defaults_list``. The key: the primary config, the group overrides, the
    config sources and the ConfigStore (:func:`store_key`). Multirun (sweeps) is not cached. A
    config file is parsed once (its ``ConfigResult`` deep-copied per load): files do not change
    during the tier.

    ``fedpeft.config.register`` rebuilds the generated ``strategy`` and ``peft`` groups on every
    compose, which would change the ConfigStore each time: here it re-registers only when the
    registered strategies or methods, or the store, changed since it last did."""

    def __init__(self) -> None:
        self.defaults: dict[tuple, object] = {}
        self.composed: dict[int, tuple[list, object]] = {}  # id(defaults list) → (that list, the config composed from it)
        self.files: dict[tuple, object] = {}  # (source class, source path, config path) → its ConfigResult
        self.registered: tuple | None = None  # what register() last stored: (strategies, methods, store_key())
        self.enabled = True

    def install(self, mp: pytest.MonkeyPatch) -> None:
        from hydra._internal import config_loader_impl as loader
        from hydra._internal.core_plugins.file_config_source import FileConfigSource
        from hydra._internal.core_plugins.importlib_resources_config_source import ImportlibResourcesConfigSource
        from hydra._internal.defaults_list import DefaultsList

        import strategies
        from fedpeft import composing, config, methods

        create_defaults_list = loader.create_defaults_list
        compose_from = loader.ConfigLoaderImpl._compose_config_from_defaults_list
        register = config.register
        cache = self

        def cached_defaults_list(repo, config_name, overrides_list, prepend_hydra, skip_missing):
            if not cache.enabled or skip_missing or any(o.is_sweep_override() for o in overrides_list):
                return create_defaults_list(repo, config_name, overrides_list, prepend_hydra, skip_missing)
            groups, values = [], []
            for o in overrides_list:  # as hydra._internal.defaults_list.Overrides sorts them
                (values if isinstance(o.value(), dict) or not repo.group_exists(o.key_or_group) else groups).append(o)
            key = (config_name, tuple(o.input_line for o in groups), prepend_hydra,
                   tuple((s.path, s.provider) for s in repo.get_sources()), store_key())
            if key not in cache.defaults:
                cache.defaults[key] = create_defaults_list(repo, config_name, groups, prepend_hydra, skip_missing)
            hit = cache.defaults[key]
            return DefaultsList(defaults=hit.defaults, config_overrides=values, defaults_tree=hit.defaults_tree, overrides=hit.overrides)

        def cached_compose(self_, defaults, repo):
            if not cache.enabled:
                return compose_from(self_, defaults, repo)
            entry = cache.composed.get(id(defaults))
            if entry is None or entry[0] is not defaults:
                entry = cache.composed[id(defaults)] = (defaults, compose_from(self_, defaults, repo))
            return copy.deepcopy(entry[1])  # Hydra applies the value overrides to it in place

        def cached_register():
            now = (tuple(strategies.REGISTRY.items()), tuple(methods.METHODS.items()))
            if cache.enabled and cache.registered is not None and cache.registered == (*now, store_key()):
                return
            register()
            cache.registered = (*now, store_key())

        for source in (FileConfigSource, ImportlibResourcesConfigSource):
            def cached_load(self_, config_path, _load=source.load_config):
                if not cache.enabled:
                    return _load(self_, config_path)
                key = (type(self_), self_.path, config_path)
                if key not in cache.files:
                    cache.files[key] = _load(self_, config_path)
                return copy.deepcopy(cache.files[key])  # Hydra sets fields of the result it gets

            mp.setattr(source, "load_config", cached_load)
        mp.setattr(loader, "create_defaults_list", cached_defaults_list)
        mp.setattr(loader.ConfigLoaderImpl, "_compose_config_from_defaults_list", cached_compose)
        mp.setattr(config, "register", cached_register)
        mp.setattr(composing, "register", cached_register)

    @contextlib.contextmanager
    def disabled(self):
        self.enabled = False
        try:
            yield
        finally:
            self.enabled = True


@pytest.fixture(scope="session", autouse=True)
def hydra_cache():
    """The tier's :class:`HydraCache`, installed for the whole session."""
    mp = pytest.MonkeyPatch()
    cache = HydraCache()
    cache.install(mp)
    yield cache
    mp.undo()
