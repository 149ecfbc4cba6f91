"""Flower's Ray backend with an actor pool that heals: a worker process that dies (the kernel's
out-of-memory killer, a ``kill -9``) costs the one client it was running, not the run.

Flower 1.41's ``RayBackend.process_message`` returns the actor that ran a message to its pool
whatever happened, a dead one included, so every later message given to that actor fails at once
and a round's other clients fail with it. :class:`HealingRayBackend` instead drops a dead actor and
starts a fresh one in its place (its first client loads the model again); the client it was running
fails alone, with one line (:class:`WorkerDied`). :func:`healing` puts it where Flower's simulation
engine looks for its Ray backend (``start_vce`` imports ``RayBackend`` from Flower's module when it
starts: there is no other way to give it a backend).
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any, Iterator

import ray
from flwr.common.constant import PARTITION_ID_KEY
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool, ClientAppActor

log = logging.getLogger("fedpeft")


class WorkerDied(RuntimeError):
    """The Ray worker process running a client died; a fresh one replaced it."""


def _run(actor, app_fn, message, cid, context):
    return actor.run.remote(app_fn, message, cid, context)


class HealingActorPool(BasicActorPool):
    """Flower's ``BasicActorPool`` that can swap a dead actor for a fresh one."""

    def replace(self, future: Any) -> Any:
        """Forget the actor that ran ``future`` (it died), kill what may be left of it, and put a
        fresh actor with the same resources in the pool: the pool keeps its size."""
        dead = self._future_to_actor.pop(future)
        with contextlib.suppress(Exception):
            ray.kill(dead, no_restart=True)
        fresh = self.create_actor_fn()
        self.pool.append(fresh)
        return fresh


def died_line(ex: BaseException) -> str:
    """One line for a client whose worker died, from Ray's many-line error: its pid where Ray says it."""
    pid = re.search(r"\bpid[:=]\s*(\d+)", str(ex))
    return (f"its Ray worker process{f' (pid {pid.group(1)})' if pid else ''} died (killed: out of memory, or a signal); "
            "a fresh worker replaces it")


class HealingRayBackend(raybackend.RayBackend):
    """Flower's ``RayBackend``, with a :class:`HealingActorPool` (see the module's docstring)."""

    def build(self, app_fn) -> None:
        self.pool = HealingActorPool(actor_type=ClientAppActor, client_resources=self.client_resources, actor_kwargs=self.actor_kwargs)
        self.pool.add_actors_to_pool(self.pool.actors_capacity)
        self.app_fn = app_fn

    def process_message(self, message, context):
        if self.pool is None or self.app_fn is None:
            raise ValueError("The actor pool is not built: call the backend's build() before processing messages.")
        cid = str(context.node_config[PARTITION_ID_KEY])
        future = self.pool.submit(_run, (self.app_fn, message, cid, context))
        try:
            _, out, updated = ray.get(future)
        except ray.exceptions.RayActorError as ex:  # the actor's process is gone: it cannot run another message
            self.pool.replace(future)
            log.debug("client %s: its actor died (%s); replaced", cid, ex)
            raise WorkerDied(died_line(ex)) from None
        except BaseException:
            self.pool.add_actor_back_to_pool(future)  # the client's own exception: the actor is well
            raise
        self.pool.add_actor_back_to_pool(future)
        return out, updated


@contextlib.contextmanager
def healing() -> Iterator[None]:
    """Flower's simulation engine, while inside, builds a :class:`HealingRayBackend`."""
    original = raybackend.RayBackend
    raybackend.RayBackend = HealingRayBackend
    try:
        yield
    finally:
        raybackend.RayBackend = original
