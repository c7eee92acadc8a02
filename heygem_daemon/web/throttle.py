"""Login throttling: guessing is slowed while the real user still gets in.

Failures are counted per address (any user) and per user (from addresses that user has not logged in
from lately). After the free attempts, each further try waits `login_delay_seconds`, doubling with every
failure up to half of `login_window_seconds`; a key is forgotten after `login_window_seconds` without a
failure. A user who logged in from an address lately is judged there by that (user, address) count only, so
guesses at the password from elsewhere never lock the user out, nor strangers failing at that address.
Every map is bounded (least recently failed keys go first): memory stays flat whatever is sent.
The operator is alerted when an address or a configured user starts being slowed down.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

from heygem_daemon.config import Web

MAX_KEYS = 10_000
GOOD_SECONDS = 30 * 86400
"""How long a successful login makes its (user, address) known."""

OnAlert = Callable[[str, str], None]


@dataclass
class _Strikes:
    count: int
    last: float


class Strikes:
    """Failures per key with a growing wait once `free` of them are spent; at most `max_keys` keys."""

    def __init__(self, free: int, web: Web, clock: Callable[[], float], max_keys: int = MAX_KEYS) -> None:
        self.free, self.clock, self.max_keys = free, clock, max_keys
        self.base, self.window = web.login_delay_seconds, web.login_window_seconds
        self._keys: OrderedDict[str, _Strikes] = OrderedDict()

    def __len__(self) -> int:
        return len(self._keys)

    def _held(self, key: str) -> _Strikes | None:
        held = self._keys.get(key)
        if held is not None and self.clock() - held.last >= self.window:
            del self._keys[key]
            return None
        return held

    def wait(self, key: str) -> float:
        """Seconds until `key` may try again (0: now)."""
        held = self._held(key)
        if held is None or held.count < self.free:
            return 0.0
        delay = min(self.window / 2, self.base * 2 ** min(held.count - self.free, 32))
        return max(0.0, held.last + delay - self.clock())

    def strike(self, key: str) -> int:
        """One more failure; returns the count."""
        held = self._held(key) or _Strikes(0, 0.0)
        held.count, held.last = held.count + 1, self.clock()
        self._keys[key] = held
        self._keys.move_to_end(key)
        while len(self._keys) > self.max_keys:
            self._keys.popitem(last=False)
        return held.count

    def clear(self, key: str) -> None:
        self._keys.pop(key, None)


class LoginThrottle:
    def __init__(self, web: Web, on_alert: OnAlert, clock: Callable[[], float] = time.monotonic) -> None:
        self.web, self.on_alert, self.clock = web, on_alert, clock
        self.addresses = Strikes(web.login_attempts, web, clock)
        self.pairs = Strikes(web.login_attempts, web, clock)
        # Configured users have their own map, so a flood of made-up names never pushes their counts out.
        self.users = Strikes(web.login_user_attempts, web, clock, max_keys=max(1, len(web.users)))
        self.names = Strikes(web.login_user_attempts, web, clock)
        self._good: OrderedDict[tuple[str, str], float] = OrderedDict()

    def _known_here(self, user: str, address: str) -> bool:
        since = self._good.get((user, address))
        return since is not None and self.clock() - since < GOOD_SECONDS

    def _keys(self, user: str | None, address: str) -> list[tuple[Strikes, str]]:
        if user is not None and self._known_here(user, address):
            return [(self.pairs, f"{user}\n{address}")]
        keys = [(self.addresses, address)]
        if user is not None:
            keys.append((self.users if user in self.web.users else self.names, user))
        return keys

    def wait(self, user: str | None, address: str) -> float:
        """Seconds before this user may try from this address (0: now). `user` None: a name too long to keep."""
        return max(strikes.wait(key) for strikes, key in self._keys(user, address))

    def failed(self, user: str | None, address: str) -> None:
        for strikes, key in self._keys(user, address):
            if strikes.strike(key) == strikes.free:
                self._alert(strikes, user, address)

    def succeeded(self, user: str, address: str) -> None:
        self.pairs.clear(f"{user}\n{address}")
        self._good[(user, address)] = self.clock()
        self._good.move_to_end((user, address))
        while len(self._good) > MAX_KEYS:
            self._good.popitem(last=False)

    def _alert(self, strikes: Strikes, user: str | None, address: str) -> None:
        slowed = f"further logins wait {self.web.login_delay_seconds:g} s, doubling with each failure"
        if strikes is self.addresses:
            self.on_alert("web-login-address", f"web console: {strikes.free} failed logins from {address}; {slowed}")
        elif strikes is self.users:
            self.on_alert(f"web-login-user:{user}", f"web console: {strikes.free} failed logins for user {user} "
                          f"from addresses {user} has not logged in from lately (last: {address}); {slowed} "
                          f"(logins from addresses where {user} logged in before go on)")
        elif strikes is self.pairs:
            self.on_alert(f"web-login-user:{user}", f"web console: {strikes.free} failed logins for user {user} "
                          f"from {address}, where {user} logged in before; {slowed}")
