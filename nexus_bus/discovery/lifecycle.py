"""Keeping a process registered: register with backoff, pass TTL checks, deregister on stop.

One task per process. It never sits on a request's path: requests are served whether or not
Consul answers. While the agent is unreachable the task retries with exponential backoff and
logs once per change of state (unreachable, registered), not once per attempt.

TTL checks are passed every third of their TTL while `healthy()` says so; when it does not,
the check is set critical with the reason, and when the process cannot run at all (stopped,
hung, killed) the TTL simply lapses and Consul turns it critical by itself.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Sequence
from enum import StrEnum

from nexus_bus.discovery.documents import ServiceRegistration
from nexus_bus.discovery.registry import (
    CheckStatus,
    NotRegistered,
    RegistryUnavailable,
    ServiceRegistry,
)
from nexus_bus.observability import logger
from nexus_bus.resilience.backoff import ExponentialBackoff, Jitter

_STOP_POLL_S = 0.1
# Why a process is not healthy right now (None: healthy).
HealthProbe = Callable[[], Awaitable[str | None]]


class RegistrationState(StrEnum):
    """Where the registration stands; each change is logged once."""

    PENDING = "pending"
    REGISTERED = "registered"
    UNREACHABLE = "unreachable"
    DEREGISTERED = "deregistered"


class Registration:
    """Registers `registrations` and keeps them so until `stop()`."""

    def __init__(
        self,
        registry: ServiceRegistry,
        registrations: Sequence[ServiceRegistration],
        *,
        health: HealthProbe | None = None,
        heartbeat_s: float,
        backoff: ExponentialBackoff,
        rng: random.Random | None = None,
    ) -> None:
        """Args:
        registry: where to register.
        registrations: the services of this process.
        health: says why the process is unhealthy (None: healthy); TTL checks follow it.
        heartbeat_s: how often TTL checks are passed (a third of their TTL).
        backoff: delays between attempts while the registry is unreachable.
        rng: randomness for the backoff's jitter.
        """
        self._registry = registry
        self._registrations = list(registrations)
        self._health = health
        self._heartbeat_s = heartbeat_s
        self._backoff = backoff
        self._rng = rng or random.Random()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.state = RegistrationState.PENDING
        self.changed = asyncio.Event()  # set on every state change (tests wait on it)

    @property
    def ids(self) -> list[str]:
        """The service ids this process registers."""
        return [r.service_id for r in self._registrations]

    def start(self) -> None:
        """Start registering in the background; returns at once."""
        if self._task is None and self._registrations:
            self._task = asyncio.create_task(self._keep(), name="consul-registration")

    def _enter(self, state: RegistrationState, detail: str = "") -> None:
        if state == self.state:
            return
        self.state = state
        self.changed.set()
        names = ",".join(r.name for r in self._registrations)
        if state is RegistrationState.UNREACHABLE:
            logger.warning("consul unreachable, retrying in the background: {}", detail)
        else:
            logger.info("consul: {} {} {}", state.value, names, detail)

    async def _keep(self) -> None:
        attempt = 0
        registered = False
        while not self._stopping:
            try:
                if not registered:
                    for registration in self._registrations:
                        if self._stopping:  # never register again once stop() began
                            return
                        await self._registry.register(registration)
                    registered = True
                    self._enter(RegistrationState.REGISTERED)
                await self._beat()
                attempt = 0
                await asyncio.sleep(self._heartbeat_s)
            except NotRegistered as exc:
                # The agent forgot us (restarted without its state, or reaped us): again.
                registered = False
                self._enter(RegistrationState.PENDING, exc.detail)
            except RegistryUnavailable as exc:
                registered = False  # registering again is idempotent and restores lost state
                self._enter(RegistrationState.UNREACHABLE, exc.detail)
                attempt += 1
                await asyncio.sleep(self._backoff.compute(attempt, self._rng))
            except Exception as exc:  # this loop must outlive any failure
                # One the adapter does not map (a library's bug, an agent that is not Consul):
                # ending here would leave the process unregistered for good, without a word.
                logger.opt(exception=exc).error("consul registration failed unexpectedly")
                registered = False
                self._enter(RegistrationState.UNREACHABLE, type(exc).__name__)
                attempt += 1
                await asyncio.sleep(self._backoff.compute(attempt, self._rng))

    async def _beat(self) -> None:
        """Pass (or fail, with the reason) every TTL check of this process; make sure the
        agent still knows the services whose check it runs itself (the shim's HTTP check).

        Raises:
            NotRegistered: the agent forgot one of them (a TTL update tells it by a 404).
        """
        others = {r.service_id for r in self._registrations if not r.check.ttl}
        if others:
            # Nothing else would tell: an agent restarted without its state, or one that
            # reaped the shim after a minute of failing /readyz, would never list it again.
            missing = others - await self._registry.local_ids()
            if missing:
                raise NotRegistered(f"the agent does not know {', '.join(sorted(missing))}")
        ttl_checks = [r.check.check_id for r in self._registrations if r.check.ttl]
        if not ttl_checks:
            return
        problem = await self._health() if self._health is not None else None
        status = CheckStatus.PASSING if problem is None else CheckStatus.CRITICAL
        for check_id in ttl_checks:
            await self._registry.update_check(check_id, status, problem or "")

    async def stop(self, timeout_s: float) -> None:
        """Stop the task and deregister every service, within `timeout_s` (best effort)."""
        self._stopping = True
        task, self._task = self._task, None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while task is not None and not task.done() and loop.time() < deadline:
            # Cancelled again until it ends: on Python 3.11 a cancel that lands just as an
            # awaited future completes can be lost (asyncio.wait_for, which nats-py's flush
            # uses). asyncio.wait neither raises the task's CancelledError nor swallows ours.
            task.cancel()
            await asyncio.wait({task}, timeout=_STOP_POLL_S)
        try:
            async with asyncio.timeout(timeout_s):
                for service_id in self.ids:
                    await self._registry.deregister(service_id)
        except (RegistryUnavailable, TimeoutError) as exc:
            # Consul reaps us after DeregisterCriticalServiceAfter once the check fails.
            logger.warning("consul: could not deregister ({!r}); the agent reaps it later", exc)
            return
        self._enter(RegistrationState.DEREGISTERED)


def create_backoff(base_s: float, max_s: float) -> ExponentialBackoff:
    """The registration retry schedule: doubling from `base_s` up to `max_s`, equal jitter."""
    return ExponentialBackoff(base_s=base_s, cap_s=max_s, jitter=Jitter.EQUAL)
