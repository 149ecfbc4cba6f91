"""The unit tier's composition cache (tests/unit/conftest.py: HydraCache) composes exactly what
Hydra composes without it: the whole config, ``hydra.*`` included, and the same errors."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from fedpeft.config import CONFIG_DIR, register

CASES = [  # each set of group choices twice, with other values or none: a miss, then a hit
    [],
    ["clients=4", "seed=3"],
    ["+train.bogus=3"],
    ["~train.lr"],
    ["rounds=abc"],  # errors: a value of the wrong type, an unknown key
    ["foo=1"],
    ["strategy=flora", "ranks=flora", "ranks.levels=[4,2]"],
    ["ranks.levels=[8,2]", "strategy=flora", "ranks=flora", "fraction=0.5", "hydra.run.dir=somewhere"],
    ["strategy=hetlora", "peft=ia3"],
    ["strategy.gamma=0.5", "strategy=hetlora", "peft.rank=4", "peft=ia3"],
    ["strategy=nope"],  # an unknown group option, twice
    ["strategy=nope", "clients=2"],
]


def composed(overrides: list[str]) -> str:
    """The whole composed config (``hydra`` included, interpolations unresolved) as YAML, or the error."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            return OmegaConf.to_yaml(compose(config_name="config", overrides=overrides, return_hydra_config=True))
    except Exception as e:  # noqa: BLE001 — the error is part of what must agree
        chain = []
        while e is not None:
            chain.append(f"{type(e).__name__}: {e}")
            e = e.__cause__
        return " <- ".join(chain)
    finally:
        GlobalHydra.instance().clear()


def test_cached_compositions_are_hydras_own(hydra_cache):
    register()  # the store as fedpeft.composing leaves it
    with hydra_cache.disabled():
        want = [composed(c) for c in CASES]
    before = len(hydra_cache.defaults)
    assert [composed(c) for c in CASES] == want
    assert want[0].startswith("hydra:") and want[1] != want[0] and want[6] != want[7] and "Could not find 'strategy/nope'" in want[-1]
    assert "Error merging override rounds=abc" in want[4] and "Could not override 'foo'" in want[5]
    # one entry per distinct sequence of group choices (and primary config, sources, store), not per composition
    assert len(hydra_cache.defaults) - before == 3  # (), (strategy=flora, ranks=flora), (strategy=hetlora, peft=ia3); nope is an error


def test_a_changed_config_store_is_composed_anew(hydra_cache, monkeypatch):
    from strategies.fedavg import FedAvg

    register()
    first = composed(["strategy=fedavg"])
    monkeypatch.setattr(FedAvg, "config_fields", classmethod(lambda cls: {"weighting": "uniform"}))  # other defaults, stored anew
    register()
    assert "weighting: uniform" in composed(["strategy=fedavg"]) and "weighting: num_examples" in first
    monkeypatch.undo()
    register()
    assert composed(["strategy=fedavg"]) == first
