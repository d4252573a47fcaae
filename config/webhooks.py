"""Signed webhooks to the practices' record systems (``[webhooks]``, see
docs/integrations.md)."""

from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from config.section import Section

__all__ = ["WebhookSettings"]


class WebhookSettings(Section):
    # How often this node looks for deliveries that are due.
    poll_interval_s: float = Field(gt=0, le=3600)
    # How long one delivery may take, connecting included.
    timeout_s: float = Field(gt=0, le=60)
    # How long a claimed delivery's claim outlasts the send's timeout (the
    # result's write, a slow loop): only then may another node (or this one,
    # restarted) send it again. Shorter resends sooner after a node died;
    # too short, and a slow node's delivery is sent twice (same webhook-id).
    claim_margin_s: float = Field(ge=1, le=600)
    # The wait after the first failed attempt; it doubles with each failure
    # (at most an hour) until retry_for_s after the event, then it is failed.
    retry_base_s: float = Field(gt=0, le=3600)
    retry_for_s: int = Field(ge=60, le=7 * 86400)
    # How long delivered and failed deliveries stay in the admin's view.
    history_days: int = Field(ge=1, le=365)
    # Endpoints must be https; this also allows http to 127.0.0.1 (tests, or a
    # relay on this machine). Never in production without a reason.
    allow_http_loopback: bool
    # Endpoints in private networks (10/8, 192.168/16, fc00::/7, ...): for a
    # server in the practice's own network. Off, only public addresses are
    # reached (an admin cannot make the server probe its neighbours).
    allow_private_networks: bool
    # Ports an endpoint may name besides https's 443 (a port is a service: a
    # mail server's 25, a database's 5432); none by default.
    allowed_ports: tuple[int, ...]

    @field_validator("allowed_ports", mode="before")
    @classmethod
    def _ports(cls, value: Any) -> tuple[int, ...]:
        # A TOML list of whole numbers, or (an environment variable) a text
        # of them separated by commas.
        if isinstance(value, str):
            items: list[Any] = [] if not value.strip() else [p.strip() for p in value.split(",")]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise ValueError("must be a list of whole numbers, e.g. [8443]")
        ports: list[int] = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, int | str):
                raise ValueError(f"{item!r} is not a port")
            if isinstance(item, str) and not (item.isascii() and item.isdigit()):
                raise ValueError(f"{item!r} is not a port (a whole number 1 to 65535)")
            port = int(item)
            if not 1 <= port <= 65535:
                raise ValueError(f"{port} is not a port (a whole number 1 to 65535)")
            if port in ports:
                raise ValueError(f"{port} is listed twice")
            ports.append(port)
        return tuple(ports)

    @model_validator(mode="after")
    def _retries_outlast_the_timeout(self) -> WebhookSettings:
        if self.retry_for_s <= self.timeout_s:
            raise ValueError("webhooks.retry_for_s must be longer than webhooks.timeout_s")
        return self
