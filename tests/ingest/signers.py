"""Each sender's signing rule, written out from its documentation, for HTTP tests."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

from tests.ingest.platforms.senders import hmac_sha256_base64

SAMPLES = Path(__file__).parent / "platforms" / "samples"


def sample(path: str) -> bytes:
    return (SAMPLES / path).read_bytes()


def shopify(body: bytes, secret: str, topic: str, webhook_id: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Hmac-Sha256": hmac_sha256_base64(body, secret),
        "X-Shopify-Webhook-Id": webhook_id,
        "X-Shopify-Shop-Domain": "acme.myshopify.com",
    }


def woocommerce(body: bytes, secret: str, topic: str, delivery: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "X-WC-Webhook-Topic": topic,
        "X-WC-Webhook-Signature": hmac_sha256_base64(body, secret),
        "X-WC-Webhook-Delivery-ID": delivery,
    }


def taobao(body: bytes, secret: str) -> dict[str, str]:
    """TOP SPI: upper hex MD5(secret + sorted name+value + body + secret), GMT+8 time."""
    stamp = (datetime.now(UTC) + timedelta(hours=8)).strftime("%Y-%m-%d %H:%M:%S")
    params = {"app_key": "12499723", "timestamp": stamp}
    text = secret + "".join(k + params[k] for k in sorted(params)) + body.decode() + secret
    return {
        "Content-Type": "application/json;charset=UTF-8",
        "top-sign-list": "app_key,timestamp",
        **params,
        "sign": hashlib.md5(text.encode()).hexdigest().upper(),
    }


def kuaidi100(param: str, salt: str) -> tuple[bytes, dict[str, str]]:
    """Form body `param=…&sign=UPPER(MD5(param + salt))`."""
    sign = hashlib.md5((param + salt).encode()).hexdigest().upper()
    return (
        urlencode({"param": param, "sign": sign}).encode(),
        {"Content-Type": "application/x-www-form-urlencoded"},
    )


def aftership(body: bytes, secret: str) -> dict[str, str]:
    return {
        "Content-Type": "application/json",
        "aftership-hmac-sha256": hmac_sha256_base64(body, secret),
    }
