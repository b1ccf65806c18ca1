"""The simulator's keys: rotating long-term signing keys and a pool of one-time keys.

RSA-2048 generation costs about 40 ms here, so one-time keys are made ahead in a worker thread
and handed out from a pool; a session never waits for a keygen unless the pool ran dry. The
private halves are held by kid until their context expires, in a bounded map.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import string
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric import rsa

_ALNUM = string.ascii_letters + string.digits
_LOWER_ALNUM = string.ascii_lowercase + string.digits


def new_rsa_key() -> rsa.RSAPrivateKey:
    """A fresh RSA-2048 key with e = 65537."""
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def random_id(length: int, alphabet: str = _ALNUM) -> str:
    """A random id from the alphabet."""
    return "".join(secrets.choice(alphabet) for _ in range(length))


@dataclass(frozen=True, slots=True)
class SigningKey:
    """A long-term key and its short kid."""

    kid: str
    key: rsa.RSAPrivateKey


class LongTermKeys:
    """The current signing key plus retired ones, still served while their contexts live."""

    def __init__(self, context_ttl: float, *, clock: Callable[[], float] = time.time) -> None:
        """Start with one fresh key."""
        self._context_ttl = context_ttl
        self._clock = clock
        self.current = SigningKey(random_id(2, _LOWER_ALNUM), new_rsa_key())
        self._retired: dict[str, tuple[SigningKey, float]] = {}

    def rotate(self) -> SigningKey:
        """Make a new current key; the old one stays verifiable for one context lifetime."""
        old = self.current
        kid = random_id(2, _LOWER_ALNUM)
        while kid == old.kid or kid in self._retired:
            kid = random_id(2, _LOWER_ALNUM)
        self.current = SigningKey(kid, new_rsa_key())
        self._retired[old.kid] = (old, self._clock() + self._context_ttl)
        return self.current

    def find(self, kid: str) -> SigningKey | None:
        """The key for kid if it is current or retired but still live."""
        if kid == self.current.kid:
            return self.current
        now = self._clock()
        for stale in [k for k, (_, until) in self._retired.items() if until <= now]:
            del self._retired[stale]
        entry = self._retired.get(kid)
        return entry[0] if entry else None


class OneTimeKeys:
    """A pool of pre-generated one-time keys, and the issued ones held by kid until expiry."""

    def __init__(
        self,
        *,
        pool_size: int = 32,
        max_issued: int = 20_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """pool_size keys are kept ready; at most max_issued private keys are held."""
        self._pool: asyncio.Queue[rsa.RSAPrivateKey] = asyncio.Queue(maxsize=pool_size)
        self._issued: OrderedDict[str, tuple[rsa.RSAPrivateKey, float]] = OrderedDict()
        self._max_issued = max_issued
        self._clock = clock
        self._refill: asyncio.Task[None] | None = None

    async def start(self, prefill: int = 4) -> None:
        """Fill a few keys now, then keep the pool full in the background."""
        for _ in range(min(prefill, self._pool.maxsize)):
            self._pool.put_nowait(await asyncio.to_thread(new_rsa_key))
        self._refill = asyncio.create_task(self._keep_full(), name="flexsim-keypool")

    async def stop(self) -> None:
        """Stop the background refill."""
        if self._refill is not None:
            self._refill.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refill

    async def issue(self, expires_at: float) -> tuple[str, rsa.RSAPrivateKey]:
        """Take a key from the pool (waiting only if it ran dry) and hold it until expires_at."""
        key = await self._pool.get()
        kid = "0" + random_id(1, string.digits) + random_id(30)
        self._issued[kid] = (key, expires_at)
        self._evict()
        return kid, key

    def find(self, kid: str) -> rsa.RSAPrivateKey | None:
        """The private key for an issued, unexpired kid."""
        entry = self._issued.get(kid)
        if entry is None or entry[1] <= self._clock():
            return None
        return entry[0]

    def __len__(self) -> int:
        """How many issued keys are held."""
        return len(self._issued)

    def _evict(self) -> None:
        now = self._clock()
        while self._issued:
            oldest_kid, (_, expires_at) = next(iter(self._issued.items()))
            if expires_at > now and len(self._issued) <= self._max_issued:
                break
            del self._issued[oldest_kid]

    async def _keep_full(self) -> None:
        while True:
            key = await asyncio.to_thread(new_rsa_key)
            await self._pool.put(key)
