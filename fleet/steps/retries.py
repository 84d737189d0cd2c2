"""The retry policy of steps, declared once: attempts, backoff, jitter, bounded by the deadline.

A step body signals a retry by the type it raises (:class:`fleet.errors.TransientError`, a
lost connection); the pipeline asks this policy whether and when to try again. Full
jitter (a uniform draw below the exponential cap) spreads the retries of many runs that
failed together, so a recovering Triton is not hit by all of them at once.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from fleet.errors import is_retryable
from fleet.settings import Settings


@dataclass(frozen=True)
class RetryPolicy:
    """When a failed step attempt is tried again.

    Attributes:
        max_attempts: attempts of one step, the first included.
        backoff_base_s: cap of the first backoff; it doubles with every attempt.
        backoff_max_s: largest cap.
        jitter: full jitter (uniform below the cap) instead of the cap itself.
    """

    max_attempts: int
    backoff_base_s: float
    backoff_max_s: float
    jitter: bool = True

    @classmethod
    def from_settings(cls, settings: Settings) -> "RetryPolicy":
        return cls(settings.retry_max_attempts, settings.retry_backoff_base_s, settings.retry_backoff_max_s)

    def backoff_s(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after failed attempt number ``attempt`` (from 1)."""
        cap = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempt - 1))
        return (rng or random).uniform(0, cap) if self.jitter else cap

    def countdown_s(self, exc: BaseException, attempt: int, now: float, deadline_at: float,
                    rng: random.Random | None = None) -> float | None:
        """Seconds until the next attempt after attempt ``attempt`` failed with ``exc``, or
        None when the step must not be tried again (not retryable, attempts spent, or the
        next attempt would start past the run's deadline)."""
        if not is_retryable(exc) or attempt >= self.max_attempts:
            return None
        wait = self.backoff_s(attempt, rng)
        return wait if now + wait < deadline_at else None
