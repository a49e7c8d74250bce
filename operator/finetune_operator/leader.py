"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it: the
holder renews the Lease; another replica takes it over only after it has seen the same
record unchanged for a whole lease duration (by its own clock, so clocks need not agree)."""

from __future__ import annotations

import logging
import threading
import time
from datetime import datetime, timezone

from kubernetes import client
from kubernetes.client.rest import ApiException

log = logging.getLogger("finetune.operator.leader")
# Where the holder takes reports: the other replicas redirect runs there.
ADDRESS = "finetune.dev/leader-address"


class LeaderElector:
    def __init__(self, coordination: client.CoordinationV1Api, name: str, namespace: str, identity: str, address: str | None = None,
                 lease_seconds: int = 15, renew_seconds: float = 5.0, clock=time.monotonic):
        self.coordination = coordination
        self.name, self.namespace, self.identity, self.address = name, namespace, identity, address
        self._holder_address: str | None = None  # the holder's ADDRESS as last read
        self.lease_seconds, self.renew_seconds, self.clock = lease_seconds, renew_seconds, clock
        self._seen: tuple | None = None  # (holder, renewTime) as last read
        self._seen_at = 0.0

    def _now(self) -> datetime:
        return datetime.now(timezone.utc)

    def try_acquire(self) -> bool:
        """One attempt to take or renew the Lease; True while this replica holds it."""
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
        except ApiException as err:
            if err.status != 404:
                raise
            return self._create()
        spec, annotations = lease.spec, lease.metadata.annotations or {}
        self._holder_address = annotations.get(ADDRESS) if spec.holder_identity not in (None, "", self.identity) else None
        record = (spec.holder_identity, spec.renew_time)
        if record != self._seen:
            self._seen, self._seen_at = record, self.clock()
        held_by_other = spec.holder_identity not in (None, "", self.identity)
        if held_by_other and self.clock() - self._seen_at < (spec.lease_duration_seconds or self.lease_seconds):
            return False
        now = self._now()
        if spec.holder_identity != self.identity:
            spec.acquire_time = now
            spec.lease_transitions = (spec.lease_transitions or 0) + 1
        spec.holder_identity, spec.renew_time, spec.lease_duration_seconds = self.identity, now, self.lease_seconds
        lease.metadata.annotations = {**annotations, ADDRESS: self.address or ""}
        try:  # the resourceVersion read above makes this a compare-and-swap
            self.coordination.replace_namespaced_lease(self.name, self.namespace, lease)
        except ApiException as err:
            if err.status == 409:
                return False  # another replica wrote first
            raise
        return True

    def _create(self) -> bool:
        now = self._now()
        lease = client.V1Lease(
            metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace, annotations={ADDRESS: self.address or ""}),
            spec=client.V1LeaseSpec(holder_identity=self.identity, lease_duration_seconds=self.lease_seconds,
                                    acquire_time=now, renew_time=now, lease_transitions=0),
        )
        try:
            self.coordination.create_namespaced_lease(self.namespace, lease)
        except ApiException as err:
            if err.status == 409:
                return False
            raise
        return True

    def acquire(self, stop: threading.Event) -> bool:
        """Blocks until this replica leads (True) or stop is set (False)."""
        log.info("waiting to lead (Lease %s/%s, identity %s)", self.namespace, self.name, self.identity)
        while not stop.is_set():
            try:
                if self.try_acquire():
                    log.info("leading (Lease %s/%s)", self.namespace, self.name)
                    return True
            except (ApiException, OSError) as err:
                log.warning("Lease %s/%s: %s", self.namespace, self.name, err)
            stop.wait(self.renew_seconds)
        return False

    def keep(self, stop: threading.Event, lost) -> None:
        """Renews until stop is set; calls lost() when renewals failed for a lease duration,
        after which another replica may lead, so this one must stop acting at once."""
        last = self.clock()
        while not stop.wait(self.renew_seconds):
            try:
                if self.try_acquire():
                    last = self.clock()
                    continue
            except (ApiException, OSError) as err:
                log.warning("renewing Lease %s/%s: %s", self.namespace, self.name, err)
            if self.clock() - last >= self.lease_seconds - self.renew_seconds:
                log.error("lost the Lease %s/%s", self.namespace, self.name)
                lost()
                return

    def leader_address(self) -> str | None:
        """The report URL of the replica that holds the Lease, as last read (None: unknown)."""
        return self._holder_address or None

    def release(self) -> None:
        """Hands the Lease over at shutdown, so the next replica need not wait it out."""
        try:
            lease = self.coordination.read_namespaced_lease(self.name, self.namespace)
            if lease.spec.holder_identity == self.identity:
                lease.spec.holder_identity, lease.spec.lease_duration_seconds = None, 1
                self.coordination.replace_namespaced_lease(self.name, self.namespace, lease)
        except (ApiException, OSError) as err:
            log.warning("releasing Lease %s/%s: %s", self.namespace, self.name, err)
