"""Logs are JSON lines with phone numbers and email addresses masked."""

from __future__ import annotations

import logging

import orjson

from libs.common.logs import JsonFormatter, mask


def test_phone_numbers_and_emails_are_masked() -> None:
    text = mask("call +8613800138000 or 13800138000, write fang.wang@example.com")
    assert "13800138000" not in text
    assert "fang.wang@" not in text
    assert "@example.com" in text, "the domain stays for debugging"


def test_a_record_becomes_one_masked_json_object() -> None:
    record = logging.makeLogRecord(
        {
            "name": "lifecycle",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "customer %s merged",
            "args": ("+8613800138000",),
            "email": "fang@example.com",
            "shop_id": "acme-tea",
        }
    )
    line = JsonFormatter().format(record)
    body = orjson.loads(line)
    assert body["level"] == "info"
    assert body["logger"] == "lifecycle"
    assert body["shop_id"] == "acme-tea"
    assert "13800138000" not in line and "fang@" not in line
