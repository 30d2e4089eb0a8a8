"""Admission of DHCP packets before any real work: token buckets with an explicit clock (no I/O).

A flood must cost the other clients nothing. Two limits, checked on the raw chaddr before a packet is
decoded:
- per client MAC (chaddr): one machine that sends too much is cut back to `per_mac` packets/s;
- for MACs bootd does not know (no host entry, reservation, lease or offer): one shared budget of
  processing time, `unknown_cpu` seconds per second, because random MACs that send one DISCOVER
  each slip past any per-MAC limit. Known machines are never charged to it (and are handled first),
  so a flood of strangers cannot starve them.
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

    Per MAC it counts packets (`admit`: None, or "rate-limit" when that MAC sends too much). Strangers
    (MACs with no host entry, reservation, lease or offer) share two budgets instead of a packet count:
    processing time (`unknown_cpu` seconds per second) and answers (`unknown_answers` a second: offers,
    acks and boot events, each of which costs a broadcast, memory or a row). Garbage is cheap to refuse
    and answers nothing, so a fuzzer at 5 000 packets/s costs an unknown real PC nothing; a flood of
    valid-looking DISCOVERs from new MACs gets at most its share of answers, and no more state."""

    def __init__(self, per_mac: float, per_mac_burst: float, unknown_cpu: float, unknown_answers: float,
                 unknown_answers_burst: float, max_tracked: int = 16384, now: float = 0.0):
        self.per_mac = KeyedBuckets(per_mac, per_mac_burst, max_tracked)
        self.strangers = TokenBucket(unknown_cpu, unknown_cpu, now)  # tokens are seconds of work
        self.answers = TokenBucket(unknown_answers, unknown_answers_burst, now)  # replies and events

    def admit(self, chaddr: bytes, now: float) -> Optional[str]:
        if not self.per_mac.take(chaddr, now):
            return "rate-limit"
        return None

    def strangers_may_work(self, now: float) -> Optional[str]:
        """None while strangers may be handled, else why not: "overload" once their time is spent
        (it refills at `unknown_cpu` s/s), "unknown-budget" once their answers are."""
        for b in (self.strangers, self.answers):
            elapsed = now - b.stamp
            if elapsed > 0:
                b.tokens = min(b.burst, b.tokens + elapsed * b.rate)
                b.stamp = now
        if self.strangers.tokens <= 0:
            return "overload"
        if self.answers.tokens < 1.0:
            return "unknown-budget"
        return None

    def charge_strangers(self, seconds: float, answers: int = 0) -> None:
        """Work done for strangers (measured by the caller) and the answers it produced (a reply, a
        boot event): both budgets may go into debt, paid back before strangers are handled again."""
        self.strangers.tokens -= seconds
        self.answers.tokens -= answers
