"""Signed webhooks to the practices' record systems (``[webhooks]``, see
docs/integrations.md)."""

from __future__ import annotations

from pydantic import Field, model_validator

from config.section import Section

__all__ = ["WebhookSettings"]


class WebhookSettings(Section):
    # How often this node looks for deliveries that are due.
    poll_interval_s: float = Field(gt=0, le=3600)
    # How long one delivery may take, connecting included.
    timeout_s: float = Field(gt=0, le=60)
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

    @model_validator(mode="after")
    def _retries_outlast_the_timeout(self) -> WebhookSettings:
        if self.retry_for_s <= self.timeout_s:
            raise ValueError("webhooks.retry_for_s must be longer than webhooks.timeout_s")
        return self
