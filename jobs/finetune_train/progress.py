"""What a run reports: `Progress` (finetune_api.status) in `<run>/progress.json`, where
`finetune run` draws its progress bar from and a resumed run continues it, and on Kubernetes
the same report pushed to the operator, which mirrors it into `.status`.

The push goes to `$FINETUNE_STATUS_URL` (set by the operator on the Ray pods) with the pod's
projected ServiceAccount token (audience `finetune-operator`), which the operator checks with a
TokenReview and accepts only from a pod of the job's own Ray cluster. So the operator reads no
Secret and no bucket. The driver also pings every HEARTBEAT_SECONDS while it runs: a run that
goes silent has lost its head, and the operator says so.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

from finetune_api.spec import Resource
from finetune_api.status import Progress
from finetune_train.storage import Store

log = logging.getLogger("finetune.progress")

STATUS_URL = "FINETUNE_STATUS_URL"
TOKEN_FILE = "FINETUNE_STATUS_TOKEN_FILE"
HEARTBEAT_SECONDS = 10.0
POST_TIMEOUT_SECONDS = 5.0


def read_progress(store: Store, uri: str) -> Progress | None:
    doc = store.read_json(uri)
    return None if doc is None else Progress.model_validate(doc)


def write_progress(store: Store, uri: str, progress: Progress) -> None:
    store.write_json(uri, progress.wire())


@dataclass(frozen=True)
class Target:
    """Where a run's reports go, and whose run it is."""

    url: str
    token_file: str
    kind: str
    namespace: str
    name: str
    uid: str

    @classmethod
    def of(cls, resource: Resource) -> Target | None:
        """From the environment the operator gives the Ray pods; None for a local run."""
        url, token_file = os.environ.get(STATUS_URL), os.environ.get(TOKEN_FILE)
        meta = resource.metadata
        if not (url and token_file and meta.uid and meta.namespace):
            return None
        return cls(url, token_file, resource.kind, meta.namespace, meta.name, meta.uid)

    def post(self, progress: Progress | None) -> None:
        """One report (None: only a sign of life). A replica that does not lead answers with a
        redirect to the one that does. Raises OSError when it is not delivered."""
        body = {"kind": self.kind, "namespace": self.namespace, "name": self.name, "uid": self.uid}
        if progress is not None:
            body["progress"] = progress.wire()
        data = json.dumps(body).encode()
        token = Path(self.token_file).read_text().strip()  # the kubelet rotates it: read it every time
        url = self.url
        for _ in range(3):
            request = urllib.request.Request(url, data=data, method="POST", headers={
                "Authorization": f"Bearer {token}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=POST_TIMEOUT_SECONDS):
                    return
            except urllib.error.HTTPError as err:  # urllib follows no redirect of a POST
                if err.code in (307, 308) and err.headers.get("Location"):
                    url = urljoin(url, err.headers["Location"])
                    continue
                raise
        raise OSError(f"{self.url}: too many redirects")


class Reporter:
    """Sends the latest report from a background thread, so training never waits on the
    operator: each report at once (a newer one replaces one not yet sent), and with
    `heartbeat`, the latest again (or a sign of life) every that many seconds."""

    def __init__(self, target: Target, heartbeat: float | None = None):
        self.target, self.heartbeat = target, heartbeat
        self._latest: Progress | None = None
        self._pending, self._stop = threading.Event(), threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._loop, name="finetune-reporter", daemon=True)
        self._thread.start()

    def __reduce__(self):
        # Ray Tune pickles its callbacks (the sweep's tracker holds a reporter): what travels is
        # where reports go; a copy sends its own.
        return Reporter, (self.target, self.heartbeat)

    def report(self, progress: Progress) -> None:
        self._latest = progress
        self._pending.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._pending.wait(self.heartbeat)  # a report, or the heartbeat is due
            self._pending.clear()
            if self._stop.is_set():
                return
            self._send(self._latest)

    def _send(self, progress: Progress | None) -> bool:
        try:
            self.target.post(progress)
        except OSError as err:  # the next report or heartbeat tries again
            if not self._failing:
                log.warning("progress not delivered to the operator (%s): %s", self.target.url, err)
            self._failing = True
            return False
        self._failing = False
        return True

    def close(self, final: Progress | None = None, timeout: float = 60.0) -> None:
        """Stops the thread; `final` is delivered before this returns (retried until `timeout`):
        the run's last word, which the operator must not miss."""
        self._stop.set()
        self._pending.set()
        self._thread.join(POST_TIMEOUT_SECONDS * 3 + 1)
        deadline = time.monotonic() + timeout
        while final is not None and not self._send(final) and time.monotonic() < deadline:
            time.sleep(1)
