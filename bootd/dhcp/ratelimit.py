"""Admission of DHCP packets before any real work: token buckets with an explicit clock (no I/O).

A flood must cost the other clients nothing. Two limits, both checked on the raw chaddr before a
packet is decoded:
- per client MAC (chaddr): one machine that sends too much is cut back to `per_mac` packets/s;
- for MACs bootd does not know (not in `hosts`, no reservation, no lease): one shared budget of
  `unknown` packets/s, because random MACs that send one DISCOVER each slip past any per-MAC limit.
Known machines are never charged to the shared budget, so a flood of strangers cannot starve them.
Memory is bounded: at most `max_tracked` per-MAC buckets are held (idle ones are dropped first).
"""
from __future__ import annotations

from typing import Optional


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved; one token per packet."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def take(self, now: float) -> bool:
        elapsed = now - self.stamp
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class KeyedBuckets:
    """One token bucket per key (a chaddr), created full on first use, at most `max_tracked` held."""

    def __init__(self, rate: float, burst: float, max_tracked: int = 65536):
        self.rate = rate
        self.burst = burst
        self.max_tracked = max_tracked
        self.buckets: dict[bytes, TokenBucket] = {}

    def take(self, key: bytes, now: float) -> bool:
        b = self.buckets.get(key)
        if b is None:
            if len(self.buckets) >= self.max_tracked:
                self._evict(now)
            b = self.buckets[key] = TokenBucket(self.rate, self.burst, now)
        return b.take(now)

    def _evict(self, now: float) -> None:
        """Drop buckets that have refilled (the same as absent); if none has, the older half."""
        refill = self.burst / self.rate if self.rate > 0 else float("inf")
        full = [k for k, b in self.buckets.items() if now - b.stamp >= refill]
        if not full:
            full = list(self.buckets)[: max(1, len(self.buckets) // 2)]
        for k in full:
            del self.buckets[k]


class Admission:
    """Decides, per packet and before decoding it, whether bootd spends work on it.

    `admit` returns None for a packet to handle, else the reason it is dropped ("rate-limit" when its
    MAC sends too much, "unknown-budget" when strangers together exceed their shared budget)."""

    def __init__(self, per_mac: float, per_mac_burst: float, unknown: float, unknown_burst: float,
                 max_tracked: int = 65536, now: float = 0.0):
        self.per_mac = KeyedBuckets(per_mac, per_mac_burst, max_tracked)
        self.unknown = TokenBucket(unknown, unknown_burst, now)

    def admit(self, chaddr: bytes, known: bool, now: float) -> Optional[str]:
        if not known and not self.unknown.take(now):
            return "unknown-budget"  # checked first: a stranger over budget costs no bucket of its own
        if not self.per_mac.take(chaddr, now):
            return "rate-limit"
        return None
