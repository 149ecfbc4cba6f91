"""The engines behind ``engine.kind``: how a round's train messages reach the clients and their
replies come back. The server's round loop (:class:`fedpeft.serverapp.Federation`) asks the run's
engine, never the kind's name.

Every engine takes the strategy's per-client train messages (``configure_train`` made one per
sampled client and counted its bytes down) and returns one reply per client for
``aggregate_train`` (which checks each and counts its bytes up); in between:

* :class:`PerClient` (``engine.kind=per_client``, the reference): each message goes to its
  client's node as it is; a worker trains one client per message (``clients.app.train_handler``).
* :class:`Cohort` (``engine.kind=cohort``): up to ``engine.cohort_size`` clients' messages travel as
  one ``train.cohort`` message (:class:`fedpeft.cohorts.Cohorts`) to a simulation worker, which
  trains them together over one resident base (``clients.app.cohort_handler`` with
  :func:`clients.cohort.train_cohort`); its reply is split back into the members' replies.

An engine also says what it can run, checked while the config is composed (:meth:`Engine.check`)
and, on the server's model, before round 1 (:meth:`Engine.check_model`).
"""

from __future__ import annotations

import time
from typing import Any, Callable, ClassVar, Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from fedpeft.cohorts import Cohorts


class EngineError(ValueError):
    """A model or setting the chosen engine cannot train; one line, naming it."""


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float | None,
                     on_poll: Callable[[int], None] | None = None, *, weights: list[int] | None = None,
                     clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep) -> list[Message]:
    """``grid.send_and_receive(messages, timeout=timeout)`` as Flower 1.41's grids implement it
    (``InMemoryGrid`` for simulation, ``HttpGrid`` for a deployment): push the messages, then pull
    their replies until every pushed message has one or ``timeout`` seconds have passed (``None``:
    no limit), sleeping the grid's ``pull_interval`` between pulls (3 s, ``HttpGrid``'s, for a grid
    without one). The same replies in the same order; a message with no reply by then has none in
    the list (:meth:`fedpeft.server.FlowerAdapter.aggregate_train` counts its node as failed).
    After every pull, ``on_poll`` gets the number of pushed messages answered so far (with
    ``weights``, one per message in order: their sum over the answered ones, e.g. clients per cohort)."""
    pushed_ids = list(grid.push_messages(messages))
    weight = dict(zip(pushed_ids, weights if weights is not None else [1] * len(pushed_ids)))
    msg_ids = set(pushed_ids)
    interval = getattr(grid, "pull_interval", 3.0)
    end_time = clock() + (timeout if timeout is not None else 0.0)
    ret: list[Message] = []
    while timeout is None or clock() < end_time:
        res_msgs = list(grid.pull_messages(msg_ids))
        ret.extend(res_msgs)
        msg_ids.difference_update({msg.metadata.reply_to_message_id for msg in res_msgs})
        if on_poll is not None:
            on_poll(sum(w for i, w in weight.items() if i not in msg_ids))
        if len(msg_ids) == 0:
            break
        sleep(interval)
    return ret


class Engine:
    """One way of running a round's clients. Subclasses set the class attributes and may override
    :meth:`check`, :meth:`check_model` and :meth:`exchange`."""

    name: ClassVar[str]
    # Whether a deployment's devices (fedpeft deploy, a real SuperLink) can run it; if not, why.
    deploy_refusal: ClassVar[str | None] = None
    # The engine.precision values it takes: fp32, and bf16 autocast of the frozen base where it has it.
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)

    def __init__(self, settings: Any) -> None:
        self.settings = settings  # the run's ``engine`` config

    @classmethod
    def peft_methods(cls) -> tuple[str, ...] | None:
        """The PEFT methods it trains (None: every one)."""
        return None

    @classmethod
    def check(cls, cfg: Any, need: Callable[[bool, str, str], None]) -> None:
        """What the config asks of this engine that it cannot do, as ``need(ok, key, message)``."""
        if cfg.engine.precision not in cls.precisions:
            able = [n for n, e in ENGINES.items() if cfg.engine.precision in e.precisions]
            need(False, "engine.precision", f"{cfg.engine.precision} autocast is the {' | '.join(able)} engine's: "
                                            f"set engine.kind={' | '.join(able)}, or engine.precision=fp32")
        methods = cls.peft_methods()
        need(methods is None or cfg.peft.name in methods, "engine.kind",
             f"the {cls.name} engine batches peft={' | '.join(methods or ())} only, not peft={cfg.peft.name}: use engine.kind=per_client")

    def check_model(self, lm: Any) -> None:
        """Refuse (:class:`EngineError`), before round 1, a model (the server's, as the workers
        build it) this engine cannot train."""

    def exchange(self, grid: Grid, messages: list[Message], partition_of: dict[int, int],
                 on_poll: Callable[[int], None] | None = None) -> list[Message]:
        """Send one round's per-client train messages, return one reply per client that answered
        within ``engine.round_timeout``; ``on_poll`` gets the number of clients done so far."""
        raise NotImplementedError


class PerClient(Engine):
    """One Flower message per client."""

    name = "per_client"

    def exchange(self, grid, messages, partition_of, on_poll=None):
        return send_and_receive(grid, messages, self.settings.round_timeout, on_poll)


class Cohort(Engine):
    """Up to ``engine.cohort_size`` clients per message, trained together on a simulation worker."""

    name = "cohort"
    deploy_refusal = ("engine.kind=cohort batches clients on a simulation worker; a deployment's devices each train "
                      "their own data: use engine.kind=per_client with fedpeft deploy")
    precisions = ("fp32", "bf16")

    @classmethod
    def peft_methods(cls) -> tuple[str, ...]:
        from clients.cohort import METHODS  # lazy: the cohort trainer (torch, peft) knows what it batches

        return METHODS

    @classmethod
    def check(cls, cfg: Any, need: Callable[[bool, str, str], None]) -> None:
        super().check(cfg, need)
        need(not cfg.strategy.get("prox_mu"), "strategy.prox_mu",
             f"FedProx's proximal term (prox_mu={cfg.strategy.get('prox_mu')}) is not batched by engine.kind=cohort: "
             "use engine.kind=per_client, or strategy.prox_mu=0")
        need(not cfg.strategy.get("scaffold"), "strategy.scaffold",
             "SCAFFOLD's control variates (each client's c_i, its own state) are not batched by engine.kind=cohort: "
             "use engine.kind=per_client, or strategy.scaffold=false")

    def check_model(self, lm):
        from clients.cohort import CohortError, check_model  # lazy: only a cohort run needs the cohort trainer

        try:
            check_model(lm)
        except CohortError as e:
            raise EngineError(f"engine.kind=cohort: {e}") from None

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.states: dict = {}  # client id → its node state (a flwr RecordDict), carried with its cohort (fedpeft.cohorts)

    def exchange(self, grid, messages, partition_of, on_poll=None):
        batch = Cohorts(messages, partition_of, self.settings.cohort_size, self.states)
        return batch.split(send_and_receive(grid, batch.messages, self.settings.round_timeout, on_poll, weights=batch.weights))


ENGINES: dict[str, type[Engine]] = {e.name: e for e in (PerClient, Cohort)}


def get(settings: Any) -> Engine:
    """The engine ``settings.kind`` names (``settings``: the run's ``engine`` config)."""
    try:
        return ENGINES[settings.kind](settings)
    except KeyError:
        raise ValueError(f"engine.kind: unknown value {settings.kind!r}; expected one of {', '.join(ENGINES)}") from None
