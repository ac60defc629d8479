"""Request and response bodies of the ingest API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from zoneinfo import available_timezones

from pydantic import BaseModel, ConfigDict, Field, field_validator

from libs.common.events import ShopId

PLATFORMS = ("shopify", "woocommerce", "taobao", "kuaidi100", "aftership", "huitou")
"""Senders a shop can hold a webhook secret for (`huitou` signs the canonical API)."""

_ZONES = available_timezones()

Platform = Literal["shopify", "woocommerce", "taobao", "kuaidi100", "aftership", "huitou"]


def _known_zone(value: str) -> str:
    if value not in _ZONES:
        raise ValueError(f"unknown IANA timezone {value!r}")
    return value


class ShopCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    shop_id: ShopId
    name: Annotated[str, Field(min_length=1, max_length=200)]
    timezone: str = "Asia/Shanghai"
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] = "CNY"
    webhook_secrets: dict[str, Annotated[str, Field(min_length=8, max_length=500)]] = Field(
        default_factory=dict
    )

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return _known_zone(value)

    @field_validator("webhook_secrets")
    @classmethod
    def _platforms(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(PLATFORMS))
        if unknown:
            raise ValueError(f"unknown platforms {unknown}; known: {list(PLATFORMS)}")
        return value


class ShopOut(BaseModel):
    """A shop as the API shows it: secrets are write-only, only their platforms show."""

    shop_id: str
    name: str
    timezone: str
    currency: str
    webhook_platforms: list[str]
    created_at: datetime


class KeyOut(BaseModel):
    key_id: str
    key: str
    shop_id: str


class Accepted(BaseModel):
    """`accepted` events are durably on the bus; `duplicates` of them had been already
    (within the dedupe horizon) and were not published again."""

    accepted: int
    duplicates: int = 0
    ids: list[str]


class ShopUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(min_length=1, max_length=200)] | None = None
    timezone: str | None = None
    currency: Annotated[str, Field(pattern=r"^[A-Z]{3}$")] | None = None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return None if value is None else _known_zone(value)


class SecretRotation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    secret: Annotated[str, Field(min_length=8, max_length=500)]
    grace_seconds: Annotated[int, Field(ge=0, le=30 * 86400)] = 86400
