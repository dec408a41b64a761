"""A manager client that follows the leader among several manager URLs.

``manager_client("http://m1:7700,http://m2:7700", key)`` gives a ``LeaderClient`` (one URL: a
plain ``ManagerClient``). Every call goes first to the manager that answered last; when that
one cannot be reached, is a standby (its answer has ``"role": "standby"``, HTTP 307 or 503), or
answers 503 (a deposed, fenced leader), the call goes on to the leader the standby named, then
to the other URLs, each at most once per call.

Invariants:

- the key is only ever sent to the URLs given: a standby's ``leader`` (or ``Location``) that is
  not one of them is not followed;
- a call is sent again to another manager only after a connection failure or a standby's or
  fenced manager's answer, so an answer of the leader (2xx or a 4xx refusal) is never retried;
- when no manager leads (standbys only), the call answers 503 with the standbys' reason; when
  none can be reached, it raises ``ConnectionFailed`` naming every URL tried.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

from netsvc.cluster.client import ConnectFn, ConnectionFailed, JSONObject, ManagerClient


def split_urls(text: str) -> list[str]:
    """``URL[,URL...]`` -> the URLs, without trailing slashes (a ``ValueError`` if none)."""
    urls = [u.strip().rstrip("/") for u in text.split(",") if u.strip()]
    if not urls:
        raise ValueError(f"no manager URL in {text!r}")
    return urls


class LeaderClient(ManagerClient):
    """A ``ManagerClient`` over several managers that sends each call to the leader."""

    def __init__(
        self,
        urls: Sequence[str] | str,
        key: str | bytes,
        timeout: float = 5.0,
        connect: ConnectFn | None = None,
        *,
        max_response: int = 16 * 1024 * 1024,
        **options: Any,
    ) -> None:
        """``options``: what each ``ManagerClient`` takes besides (TLS: ``ca_file``,
        ``client_cert``, ``client_key``, ``context``; ``persistent``)."""
        self.urls = split_urls(urls) if isinstance(urls, str) else [u.rstrip("/") for u in urls]
        if not self.urls:
            raise ValueError("no manager URL given")
        super().__init__(self.urls[0], key, timeout, connect, max_response=max_response,
                         **options)
        self._clients = {u: ManagerClient(u, key, timeout, connect, max_response=max_response,
                                          **options)
                         for u in self.urls}
        self._lock = threading.Lock()
        self._leader = self.urls[0]

    @property
    def leader_url(self) -> str:
        """The URL that answered last (the leader, as far as this client knows)."""
        with self._lock:
            return self._leader

    def request(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        *,
        query: Mapping[str, Any] | None = None,
        auth: bool = True,
    ) -> tuple[int, JSONObject]:
        with self._lock:
            first = self._leader
        order = [first, *(u for u in self.urls if u != first)]
        tried: list[str] = []
        failures: list[str] = []
        unavailable: tuple[int, JSONObject] | None = None
        while order:
            url = order.pop(0)
            if url in tried:
                continue
            tried.append(url)
            try:
                status, obj = self._clients[url].request(method, path, body, query=query,
                                                         auth=auth)
            except ConnectionFailed as exc:
                failures.append(str(exc))
                continue
            if (obj.get("role") == "standby" and status in (307, 503)) or status == 503:
                unavailable = (503, obj)
                named = obj.get("leader")
                if isinstance(named, str) and named.rstrip("/") in self._clients:
                    order.insert(0, named.rstrip("/"))
                continue
            with self._lock:
                self._leader = url
                self.base_url = url
            return status, obj
        if unavailable is not None:
            status, obj = unavailable
            why = obj.get("error") or "no manager is the leader"
            return status, {**obj, "error": f"{why} (tried {', '.join(tried)})"}
        raise ConnectionFailed("cannot reach any manager: " + "; ".join(failures))


def manager_client(
    urls: str, key: str | bytes, timeout: float = 5.0, connect: ConnectFn | None = None,
    **options: Any,
) -> ManagerClient:
    """A ``LeaderClient`` for a comma-separated list of URLs, a ``ManagerClient`` for one;
    ``options`` go to each ``ManagerClient`` (TLS, ``persistent``)."""
    parts = split_urls(urls)
    if len(parts) == 1:
        return ManagerClient(parts[0], key, timeout=timeout, connect=connect, **options)
    return LeaderClient(parts, key, timeout=timeout, connect=connect, **options)
