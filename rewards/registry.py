"""Domain registry: how a problem record's `domain` finds its verifier.

A verifier is `fn(record: dict, answer: str) -> float` in [0, 1], where `answer` is the graded
region of the response (see `rewards.extract.answer_region`). New domains plug in with

    @rewards.register("my_domain", required_fields=("answer",))
    def my_reward(record, answer): ...

Optional per-domain hooks: `validate(record)` raises ValueError naming a bad field (called in the
scoring parent before any work is dispatched, and by the data loaders), `timeout_s(record) ->
float` gives the per-item time limit that `score_batch` enforces when the caller does not set
one, and `requires()` raises when this machine cannot score the domain (code: no sandbox). A
record is only *validated* where data is prepared (`get_domain`); `scoring_domain` also checks
`requires`, so data can be converted on a machine that cannot score it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

RewardFn = Callable[[dict, str], float]

DEFAULT_TIMEOUT_S = 10.0  # per-item limit for domains that do not say otherwise


class RecordError(ValueError):
    """A problem record is malformed: names the record index (when known) and the field."""


@dataclasses.dataclass(frozen=True)
class Domain:
    """One registered domain: its verifier, required record fields, and optional hooks."""

    name: str
    fn: RewardFn
    required_fields: tuple[str, ...]
    validate: Callable[[dict], None] | None = None
    timeout_s: Callable[[dict], float] | None = None
    requires: Callable[[], None] | None = None

    def time_limit_s(self, record: dict, requested_s: float | None = None) -> float:
        """Per-item wall-clock limit (seconds) for scoring `record`.

        requested_s (the caller's limit) replaces DEFAULT_TIMEOUT_S, but never cuts below a
        domain's own budget (code: its sandbox's per-response budget), which would turn slow
        but legitimate scoring into reward 0.
        """
        own = float(self.timeout_s(record)) if self.timeout_s else None
        if requested_s is None:
            return own if own is not None else DEFAULT_TIMEOUT_S
        return max(float(requested_s), own) if own is not None else float(requested_s)


_DOMAINS: dict[str, Domain] = {}


def register(
    domain: str,
    *,
    required_fields: tuple[str, ...],
    validate: Callable[[dict], None] | None = None,
    timeout_s: Callable[[dict], float] | None = None,
    requires: Callable[[], None] | None = None,
) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering `fn(record, answer) -> float` as the verifier of `domain`.

    Re-registering a name replaces the earlier entry only when it is the same function
    (module re-import); two different functions for one domain is an error.
    """
    if not isinstance(domain, str) or not domain:
        raise ValueError(f"register: domain must be a non-empty string, got {domain!r}")
    fields = tuple(required_fields)

    def decorator(fn: RewardFn) -> RewardFn:
        old = _DOMAINS.get(domain)
        if old is not None and old.fn.__qualname__ != fn.__qualname__:
            raise ValueError(
                f"register: domain {domain!r} already registered by {old.fn.__module__}."
                f"{old.fn.__qualname__}"
            )
        _DOMAINS[domain] = Domain(domain, fn, fields, validate, timeout_s, requires)
        return fn

    return decorator


def registered_domains() -> tuple[str, ...]:
    """Names of all registered domains, sorted."""
    return tuple(sorted(_DOMAINS))


def get_domain(record: dict, index: int | None = None) -> Domain:
    """Look up and validate `record`'s domain; RecordError naming the field if malformed."""
    where = "record" if index is None else f"record {index}"
    if not isinstance(record, dict):
        raise RecordError(f"{where}: expected a dict, got {type(record).__name__}")
    if "domain" not in record:
        raise RecordError(f"{where}: missing field 'domain' (one of {registered_domains()})")
    name = record["domain"]
    domain = _DOMAINS.get(name) if isinstance(name, str) else None
    if domain is None:
        raise RecordError(
            f"{where}: unknown domain {name!r} in field 'domain'; registered: "
            f"{registered_domains()}"
        )
    for field in domain.required_fields:
        if field not in record or record[field] is None:
            raise RecordError(f"{where} (domain {name!r}): missing field {field!r}")
    if domain.validate is not None:
        try:
            domain.validate(record)
        except RecordError:
            raise
        except ValueError as err:
            raise RecordError(f"{where} (domain {name!r}): {err}") from None
    return domain


def check_available(domains) -> None:
    """Raises (e.g. SandboxUnavailableError) unless every named domain can be scored here;
    unknown names are RecordErrors. Call once at start-up with the training data's domains."""
    for name in sorted(set(domains)):
        domain = _DOMAINS.get(name)
        if domain is None:
            raise RecordError(f"unknown domain {name!r}; registered: {registered_domains()}")
        if domain.requires is not None:
            domain.requires()


def scoring_domain(record: dict, index: int | None = None) -> Domain:
    """`get_domain` for scoring: also refuses a domain this machine cannot score (`requires`)."""
    domain = get_domain(record, index)
    if domain.requires is not None:
        domain.requires()
    return domain
