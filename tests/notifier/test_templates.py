"""Message templates: the model, the sandbox, validation on save, rendering, SMS facts."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jinja2 import TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError
from pydantic import ValidationError

from libs.common.problems import Problem as HttpProblem
from services.notifier.providers.base import ProviderTemplate
from services.notifier.templates import (
    GSM_BASIC,
    GSM_EXTENSION,
    RENDERED_LIMIT,
    SAMPLE,
    Problem,
    Template,
    TemplateNotAllowed,
    _compiled,
    format_money,
    has_opt_out,
    preview,
    problem_of,
    render,
    sms_facts,
    validate,
    with_opt_out,
)

DESIGN_EXAMPLE: dict[str, Any] = {
    "name": "order_shipped",
    "channel": "sms",
    "locales": {
        "zh-CN": {"text": "{{ shop.name }}：您的订单{{ order.id }}已由{{ parcel.carrier }}发出"},
        "en": {"text": "{{ shop.name }}: order {{ order.id }} has shipped"},
    },
    "provider_templates": {
        "aliyun": {"code": "SMS_123456", "params": {"order": "{{ order.id }}"}},
        "tencent": {"id": "1110", "params": ["{{ order.id }}", "{{ parcel.carrier }}"]},
    },
}


def sms(text: str, **extra: Any) -> Template:
    return Template.model_validate(
        {"name": "t", "channel": "sms", "locales": {"zh-CN": {"text": text}}, **extra}
    )


def email(text: str, html: str | None = None, subject: str = "Hi") -> Template:
    content: dict[str, str] = {"text": text, "subject": subject}
    if html is not None:
        content["html"] = html
    return Template.model_validate({"name": "t", "channel": "email", "locales": {"en": content}})


def render_text(source: str, variables: dict[str, Any] | None = None) -> str:
    """Renders `source` as an email text part (sources up to 100 kB), transactional."""
    given_vars = {**SAMPLE, **(variables or {})}
    return render(email(source), "en", given_vars, category="transactional").text


def where(problems: list[Problem]) -> list[tuple[tuple[str | int, ...], int | None]]:
    return [(tuple(p["loc"]), p["line"]) for p in problems]


def described(exc: BaseException) -> str:
    return "\n".join([str(exc), *getattr(exc, "__notes__", [])])


# --- The model ------------------------------------------------------------------------------


def test_design_example_is_a_valid_template() -> None:
    template = Template.model_validate(DESIGN_EXAMPLE)
    assert template.dump() == DESIGN_EXAMPLE
    assert validate(template) == []
    assert validate(DESIGN_EXAMPLE) == []


def _with(path: tuple[str, ...], value: Any, base: dict[str, Any] | None = None) -> dict[str, Any]:
    import copy

    doc = copy.deepcopy(base if base is not None else DESIGN_EXAMPLE)
    target = doc
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return doc


EMAIL: dict[str, Any] = {
    "name": "welcome",
    "channel": "email",
    "locales": {
        "en": {"text": "Hi {{ customer.name }}", "subject": "Welcome", "html": "<p>Hi</p>"}
    },
}


@pytest.mark.parametrize(
    ("doc", "loc"),
    [
        (_with(("name",), "Bad Name"), ("name",)),
        (_with(("name",), "a" * 65), ("name",)),
        (_with(("name",), "-leading"), ("name",)),
        (_with(("channel",), "fax"), ("channel",)),
        (_with(("locales",), {}), ("locales",)),
        (_with(("locales",), {"fr": {"text": "bonjour"}}), ("locales", "fr", "[key]")),
        (_with(("locales", "en", "text"), ""), ("locales", "en", "text")),
        (_with(("locales", "en", "text"), "x" * 2001), ("locales", "en", "text")),
        (_with(("locales", "en", "subject"), "Hello"), ("locales", "en", "subject")),
        (_with(("locales", "en", "html"), "<p>x</p>"), ("locales", "en", "html")),
        (_with(("locales", "en", "voice"), "x"), ("locales", "en", "voice")),
        (_with(("extra",), 1), ("extra",)),
        (
            _with(("provider_templates", "aliyun", "code"), "123"),
            ("provider_templates", "aliyun", "code"),
        ),
        (
            _with(("provider_templates", "tencent", "id"), "T1110"),
            ("provider_templates", "tencent", "id"),
        ),
        (_with(("provider_templates", "twilio"), {}), ("provider_templates", "twilio")),
        (
            _with(("provider_templates", "tencent", "params"), {"order": "{{ order.id }}"}),
            ("provider_templates", "tencent", "params"),
        ),
        (
            _with(("provider_templates", "aliyun", "params"), ["{{ order.id }}"]),
            ("provider_templates", "aliyun", "params"),
        ),
        (
            _with(("provider_templates", "aliyun", "params"), {"bad name": "x"}),
            ("provider_templates", "aliyun", "params", "bad name", "[key]"),
        ),
        (_with(("locales", "en", "subject"), None, EMAIL), ("locales", "en", "subject")),
        (_with(("locales", "en", "subject"), "a\nBcc: x@y.z", EMAIL), ("locales", "en", "subject")),
        (_with(("locales", "en", "html"), "<p>" + "x" * 102400, EMAIL), ("locales", "en", "html")),
        (_with(("provider_templates",), {}, EMAIL), ("provider_templates",)),
    ],
)
def test_model_refuses_with_the_field(doc: dict[str, Any], loc: tuple[str, ...]) -> None:
    with pytest.raises(ValidationError) as caught:
        Template.model_validate(doc)
    assert loc in [tuple(e["loc"]) for e in caught.value.errors()]
    assert any(tuple(p["loc"]) == loc for p in validate(doc))


def test_params_shape_errors_say_what_is_expected() -> None:
    problems = validate(_with(("provider_templates", "tencent", "params"), {"a": "x"}))
    assert [p["loc"] for p in problems] == [["provider_templates", "tencent", "params"]]
    assert "ordered list" in problems[0]["msg"]
    problems = validate(_with(("provider_templates", "aliyun", "params"), ["x"]))
    assert "mapping" in problems[0]["msg"]


# --- The sandbox ----------------------------------------------------------------------------

LEAKS = ("<class", " at 0x", "<TemplateReference", "<function", "<module", "<built-in", "<bound")

ESCAPES: list[tuple[str, dict[str, Any]]] = [
    ("{{ ''.__class__.__mro__ }}", {}),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", {}),
    ("{{ self }}", {}),
    ("{{ self._TemplateReference__context }}", {}),
    ("{{ cycler.__init__.__globals__ }}", {}),
    ("{{ cycler }}", {}),
    ("{{ joiner }}", {}),
    ("{{ namespace }}", {}),
    ("{{ dict }}", {}),
    ("{{ config }}", {}),
    ("{{ config.items() }}", {}),
    ("{{ lipsum }}", {}),
    ("{{ lipsum() }}", {}),
    ("{{ range }}", {}),
    ("{{ range(10**9) }}", {}),
    ("{{ range(10) }}", {}),
    ("{{ loop }}", {}),
    ("{{ caller }}", {}),
    ("{{ _ }}", {}),
    ("{{ order.id[k] }}", {"k": "__class__"}),
    ("{{ order.id[k] }}", {"k": "__doc__"}),
    ("{{ order.id[a][b] }}", {"a": "__class__", "b": "__name__"}),
    ("{{ order.id['__class__'] }}", {}),
    ("{{ order.id|attr('__class__') }}", {}),
    ("{{ order|pprint }}", {}),
    ("{{ '%s'|format(order) }}", {}),
    ("{{ order.id|safe }}", {}),
    ("{{ order }}", {}),
    ("{{ order.id.upper }}", {}),
    ("{{ order.id.upper() }}", {}),
    ("{{ '{0.__class__}'.format(order.id) }}", {}),
    ("{% for c in order.id %}{{ c }}{% endfor %}", {}),
    ("{% set x = order.id %}{{ x }}", {}),
    ("{% macro m() %}{{ m() }}{% endmacro %}{{ m() }}", {}),
    ("{% include 'secrets.txt' %}", {}),
    ("{% extends 'base.html' %}", {}),
    ("{% import 'x' as y %}", {}),
    ("{% with a = order %}{{ a }}{% endwith %}", {}),
    ("{% filter upper %}{{ order.id }}{% endfilter %}", {}),
    ("{{ 'ab' * 2 }}", {}),
    ("{{ 'x' * 1000000000 }}", {}),
    ("{{ '%999999999d' % 1 }}", {}),
    ("{{ 10 ** 10 ** 10 }}", {}),
    ("{{ 5|round(-1000000000) }}", {}),
    ("{{ [order.id, order.id] }}", {}),
    ("{{ {'a': order} }}", {}),
]


@pytest.mark.parametrize(("source", "extra"), ESCAPES)
def test_sandbox_escapes_raise_and_reveal_nothing(source: str, extra: dict[str, Any]) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError) as caught:
        render_text(source, extra)
    assert time.monotonic() - started < 2
    message = described(caught.value)
    for leak in LEAKS:
        assert leak not in message
    # and refused at save time, at its line
    problems = validate(sms("第一行\n" + source))
    assert problems and all(p["line"] == 2 for p in problems), problems


def test_sandbox_errors_are_security_or_undefined_errors() -> None:
    with pytest.raises(SecurityError):
        render_text("{{ order.id[k] }}", {"k": "__class__"})
    with pytest.raises(TemplateNotAllowed):
        render_text("{{ range(10**9) }}")
    with pytest.raises(UndefinedError):
        render_text("{{ lipsum }}")
    with pytest.raises(TemplateSyntaxError):
        render_text("{{ order.id }")


def test_a_dunder_value_as_data_is_just_text() -> None:
    assert render_text("{{ order.id }}", {"order": {"id": "{{ ''.__class__ }}"}}) == (
        "{{ ''.__class__ }}"
    )


@pytest.mark.parametrize(
    ("source", "variables"),
    [
        ("{{ order.id" + "|replace('E', 'EE')" * 40 + " }}", {}),
        ("{{ big ~ big }}", {"big": "x" * 40_000}),
        ("{{ big + big }}", {"big": "x" * 40_000}),
        ("{{ big }}{{ big }}{{ big }}", {"big": "x" * 30_000}),
        ("{{ " + "(" * 5000 + "1" + ")" * 5000 + " }}", {}),
        ("{{ " + "9" * 5000 + " }}", {}),
        ("{{ order.id }}" * 3000, {}),
    ],
    ids=["replace-chain", "concat", "plus", "output", "nesting", "big-literal", "nodes"],
)
def test_bombs_are_refused_quickly(source: str, variables: dict[str, Any]) -> None:
    started = time.monotonic()
    with pytest.raises(TemplateError):
        render_text(source, variables)
    assert time.monotonic() - started < 2


def test_rendered_size_up_to_the_limit_is_fine() -> None:
    big = "x" * (RENDERED_LIMIT // 2)
    assert len(render_text("{{ big ~ big }}", {"big": big})) == RENDERED_LIMIT


def test_allowed_language() -> None:
    source = (
        "{% if customer.name is defined %}{{ customer.name|upper }}{% else %}亲{% endif %}"
        "|{{ order.id|truncate(9, true, '…', 0) }}|{{ (total / 100)|round(1) }}"
        "|{{ 'a' ~ order.city }}|{{ n|int + 1 }}|{{ nope|default('-') }}"
        "|{{ 12800|format_money }}|{{ order.id[:3]|lower }}|{{ 'x' if n == '41' else 'y' }}"
    )
    out = render_text(source, {"customer": {"name": "tom"}, "total": 1234, "n": "41"})
    assert out == "TOM|E2024111…|12.3|a杭州|42|-|¥128.00|e20|x"


# --- Validation on save ---------------------------------------------------------------------


def test_undefined_variable_is_refused_with_its_line() -> None:
    problems = validate(sms("您好{{ customer.name }}，\n订单{{ order.idd }}已发货"))
    assert problems == [
        {
            "loc": ["locales", "zh-CN", "text"],
            "line": 2,
            "msg": "unknown variable 'order.idd'; order has city, id, total",
        }
    ]


def test_unknown_variables_in_every_branch() -> None:
    template = sms("{% if false %}\n{{ order.nope }}\n{% else %}\n\n{{ coupon }}{% endif %}")
    problems = validate(template)
    assert where(problems) == [
        (("locales", "zh-CN", "text"), 2),
        (("locales", "zh-CN", "text"), 5),
    ]
    assert "unknown variable 'coupon'" in problems[1]["msg"]


def test_syntax_error_has_its_line() -> None:
    problems = validate(sms("第一行\n{{ order.id }\n第三行"))
    assert where(problems) == [(("locales", "zh-CN", "text"), 2)]


def test_rendering_error_has_its_line() -> None:
    problems = validate(sms("a\nb\n{{ order.id + 1 }}"))
    assert where(problems) == [(("locales", "zh-CN", "text"), 3)]


def test_unsubscribe_url_is_for_marketing() -> None:
    template = sms("上新啦\n退订 {{ unsubscribe_url }}")
    assert validate(template, category="marketing") == []
    assert validate(template) == []  # not known yet: allowed
    problems = validate(template, category="transactional")
    assert where(problems) == [(("locales", "zh-CN", "text"), 2)]
    assert "unsubscribe_url" in problems[0]["msg"]
    guarded = sms("{% if unsubscribe_url is defined %}退订 {{ unsubscribe_url }}{% endif %}")
    assert validate(guarded, category="transactional") == []


def test_every_part_is_validated() -> None:
    template = Template.model_validate(
        {
            "name": "welcome",
            "channel": "email",
            "locales": {
                "en": {"text": "ok", "subject": "Hi {{ customer.nam }}", "html": "<p>\n{{ x }}"},
                "zh-CN": {"text": "{{ shop.name", "subject": "您好"},
            },
        }
    )
    assert where(validate(template)) == [
        (("locales", "en", "subject"), 1),
        (("locales", "en", "html"), 2),
        (("locales", "zh-CN", "text"), 1),
    ]


def test_provider_params_are_validated() -> None:
    doc = _with(("provider_templates", "aliyun", "params"), {"order": "{{ order.idd }}"})
    doc = _with(("provider_templates", "tencent", "params"), ["{{ order.id }}", "{{ nope }}"], doc)
    assert where(validate(doc)) == [
        (("provider_templates", "aliyun", "params", "order"), 1),
        (("provider_templates", "tencent", "params", 1), 1),
    ]


def test_problems_are_json() -> None:
    problems = validate(sms("{{ nope }}"))
    assert json.loads(json.dumps(problems)) == problems
    assert [dict(p) for p in problems] == problems


# --- Rendering ------------------------------------------------------------------------------


def _bilingual(*order: str) -> Template:
    texts = {"zh-CN": "中文 {{ order.id }}", "en": "English {{ order.id }}"}
    return Template.model_validate(
        {"name": "t", "channel": "sms", "locales": {loc: {"text": texts[loc]} for loc in order}}
    )


@pytest.mark.parametrize(
    ("locales", "requested", "chosen"),
    [
        (("zh-CN", "en"), "en", "en"),
        (("zh-CN", "en"), "en-US", "en"),
        (("zh-CN", "en"), "zh-CN", "zh-CN"),
        (("en", "zh-CN"), "zh", "zh-CN"),
        (("en", "zh-CN"), "fr", "zh-CN"),
        (("en", "zh-CN"), None, "zh-CN"),
        (("en",), "zh-CN", "en"),
    ],
)
def test_locale_fallback(locales: tuple[str, ...], requested: str | None, chosen: str) -> None:
    rendered = render(_bilingual(*locales), requested, SAMPLE, category="transactional")
    assert rendered.locale == chosen
    assert rendered.text == ("中文 " if chosen == "zh-CN" else "English ") + "E20241111000123"


def test_html_is_autoescaped_and_text_is_not() -> None:
    template = email(
        "Hi {{ customer.name }}",
        html=(
            "<p>Hi {{ customer.name }}</p>{{ '<i>' ~ customer.name }}"
            "{{ customer.name|replace('&', '+') }}"
        ),
        subject="For {{ customer.name }}",
    )
    name = "<b>Tom & Jerry</b>"
    rendered = render(template, "en", {"customer": {"name": name}}, category="transactional")
    assert rendered.text == "Hi <b>Tom & Jerry</b>"
    assert rendered.subject == "For <b>Tom & Jerry</b>"
    assert rendered.html == (
        "<p>Hi &lt;b&gt;Tom &amp; Jerry&lt;/b&gt;</p>"
        "&lt;i&gt;&lt;b&gt;Tom &amp; Jerry&lt;/b&gt;"
        "&lt;b&gt;Tom + Jerry&lt;/b&gt;"
    )


def test_provider_params_are_rendered() -> None:
    rendered = render(
        Template.model_validate(DESIGN_EXAMPLE), "zh-CN", SAMPLE, category="transactional"
    )
    assert rendered.text == "回头小店：您的订单E20241111000123已由顺丰速运发出"
    assert rendered.provider == {
        "aliyun": ProviderTemplate("SMS_123456", {"order": "E20241111000123"}),
        "tencent": ProviderTemplate("1110", ["E20241111000123", "顺丰速运"]),
    }
    assert render(sms("x"), None, SAMPLE, category="transactional").provider == {}


def test_none_is_absent() -> None:
    template = sms("{{ customer.name|default('亲') }}，您好")
    variables = {"customer": {"name": None}}
    assert render(template, None, variables, category="transactional").text == "亲，您好"
    with pytest.raises(UndefinedError) as caught:
        render(sms("ok\n{{ customer.name }}"), None, variables, category="transactional")
    assert "in locales.zh-CN.text, line 2" in described(caught.value)


def test_transactional_gets_no_unsubscribe_url() -> None:
    template = sms("{{ unsubscribe_url }}")
    with pytest.raises(UndefinedError):
        render(template, None, SAMPLE, category="transactional")
    rendered = render(template, None, SAMPLE, category="marketing")
    assert rendered.text == "https://huitou.example/u/3f9a2c 拒收请回复R"


def test_marketing_sms_gets_the_opt_out_once() -> None:
    template = _bilingual("zh-CN", "en")
    zh = render(template, "zh-CN", SAMPLE, category="marketing").text
    en = render(template, "en", SAMPLE, category="marketing").text
    assert zh == "中文 E20241111000123 拒收请回复R"
    assert en == "English E20241111000123. Reply STOP to opt out"
    assert render(template, "en", SAMPLE, category="transactional").text == (
        "English E20241111000123"
    )
    assert render(sms("上新啦，回T退订"), None, SAMPLE, category="marketing").text == (
        "上新啦，回T退订"
    )


def test_subject_is_one_line_and_trailing_newline_dropped() -> None:
    template = email("Hi\n", subject="Order {{ order.id }}")
    rendered = render(
        template, "en", {"order": {"id": "1\r\nBcc: x@example.com"}}, category="transactional"
    )
    assert rendered.subject == "Order 1 Bcc: x@example.com"
    assert rendered.text == "Hi"


def test_compiled_templates_are_cached_by_source() -> None:
    source = "cached {{ order.id }} 17"
    before = _compiled.cache_info()
    render_text(source)
    render_text(source)
    after = _compiled.cache_info()
    assert after.hits >= before.hits + 1
    assert _compiled("text", source) is _compiled("text", source)
    assert _compiled("html", source) is not _compiled("text", source)


def test_format_money() -> None:
    assert format_money(12800) == "¥128.00"
    assert format_money(123456789, "CNY") == "¥1,234,567.89"
    assert format_money({"amount_minor": 1999, "currency": "USD"}) == "$19.99"
    assert format_money({"amount_minor": 150000, "currency": "JPY"}) == "JPY 150,000"
    assert format_money(-5, "KWD") == "-KWD 0.005"
    with pytest.raises(TemplateError):
        format_money("12.80")


def test_render_error_names_part_and_line() -> None:
    with pytest.raises(TemplateError) as caught:
        render(email("ok", html="<p>\n{{ order.nope }}"), "en", SAMPLE, category="marketing")
    assert problem_of(caught.value) == {
        "loc": ["locales", "en", "html"],
        "line": 2,
        "msg": "'dict object' has no attribute 'nope'",
    }


def test_preview_sms() -> None:
    template = Template.model_validate(DESIGN_EXAMPLE)
    out = preview(template, {"variables": {"order": {"id": "A1"}}, "signature": "回头"})
    assert out == {
        "locale": "zh-CN",
        "text": "回头小店：您的订单A1已由顺丰速运发出，拒收请回复R",
        "encoding": "UCS-2",
        "characters": 4 + 26,
        "segments": 1,
        "provider_templates": {
            "aliyun": {"id": "SMS_123456", "params": {"order": "A1"}},
            "tencent": {"id": "1110", "params": ["A1", "顺丰速运"]},
        },
    }
    out = preview(template, {"locale": "en", "category": "transactional"})
    assert (out["text"], out["encoding"], out["characters"]) == (
        "回头小店: order E20241111000123 has shipped",
        "UCS-2",
        39,
    )


def test_preview_email() -> None:
    template = email("Hi {{ customer.name }}", html="<b>{{ customer.name }}</b>", subject="S")
    out = preview(template, {"variables": {"customer": {"name": "<Tom>"}}})
    assert out == {
        "locale": "en",
        "text": "Hi <Tom>",
        "subject": "S",
        "html": "<b>&lt;Tom&gt;</b>",
    }


def test_preview_refuses_with_422() -> None:
    with pytest.raises(HttpProblem) as caught:
        preview(sms("x"), {"variables": [], "colour": "red"})
    assert caught.value.status == 422
    with pytest.raises(HttpProblem) as caught:
        preview(sms("a\n{{ customer.name }}"), {"variables": {"customer": {"name": None}}})
    assert caught.value.status == 422
    assert caught.value.extra["errors"] == [
        {
            "loc": ["locales", "zh-CN", "text"],
            "line": 2,
            "msg": "'dict object' has no attribute 'name'",
        }
    ]


# --- SMS facts ------------------------------------------------------------------------------


def test_gsm_alphabet() -> None:
    assert len(GSM_BASIC) == 127  # 128 positions less the escape
    assert set("\f^{}\\[~]|€") == GSM_EXTENSION
    assert not GSM_BASIC & GSM_EXTENSION


@pytest.mark.parametrize(
    ("text", "encoding", "characters", "segments"),
    [
        ("", "GSM-7", 0, 1),
        ("a" * 160, "GSM-7", 160, 1),
        ("a" * 161, "GSM-7", 161, 2),
        ("a" * 306, "GSM-7", 306, 2),
        ("a" * 307, "GSM-7", 307, 3),
        ("€", "GSM-7", 2, 1),
        ("€" * 80, "GSM-7", 160, 1),
        ("€" * 81, "GSM-7", 162, 2),
        ("{}[]~|^\\", "GSM-7", 16, 1),
        ("Ça coûte 5€, à bientôt", "UCS-2", 22, 1),  # û is not GSM
        ("Ça va? 5€ à Zürich", "GSM-7", 19, 1),
        ("a" * 152 + "€" + "a" * 152, "GSM-7", 306, 3),  # an escape pair is not split
        ("中" * 70, "UCS-2", 70, 1),
        ("中" * 71, "UCS-2", 71, 2),
        ("中" * 134, "UCS-2", 134, 2),
        ("中" * 135, "UCS-2", 135, 3),
        ("hello 😀", "UCS-2", 8, 1),
        ("a" * 69 + "😀", "UCS-2", 71, 2),
        ("中" * 66 + "😀" + "中" * 66, "UCS-2", 134, 3),  # a surrogate pair is not split
    ],
)
def test_sms_facts(text: str, encoding: str, characters: int, segments: int) -> None:
    facts = sms_facts(text)
    assert (facts.encoding, facts.characters, facts.segments) == (encoding, characters, segments)


def test_sms_signature_is_billed() -> None:
    facts = sms_facts("您的验证码是1234", "回头")
    assert (facts.encoding, facts.characters, facts.segments) == ("UCS-2", 14, 1)
    assert sms_facts("中" * 66, "回头").segments == 1  # 70 with the signature
    assert sms_facts("中" * 67, "回头").segments == 2  # 71 billed
    assert sms_facts("Your code is 1234", "【Huitou】").encoding == "UCS-2"
    assert sms_facts("x" * 62, "Huitou", placement="end").characters == 70
    assert sms_facts("x" * 62, "Huitou", placement="end").segments == 1


@settings(max_examples=200, deadline=None)
@given(
    st.text(alphabet=st.sampled_from(list("aZ09 .\n€{[中é😀ü")), max_size=400),
    st.text(alphabet=st.sampled_from(list("aZ09 .\n€{[中é😀ü")), min_size=1, max_size=200),
)
def test_segments_are_monotonic_in_length(text: str, more: str) -> None:
    shorter, longer = sms_facts(text), sms_facts(text + more)
    assert shorter.segments <= longer.segments
    assert shorter.characters < longer.characters or shorter.encoding != longer.encoding
    single, part = (160, 153) if longer.encoding == "GSM-7" else (70, 67)
    if longer.characters <= single:
        assert longer.segments == 1
    else:
        assert longer.segments >= -(-longer.characters // part)


# --- Opt-out wording ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "locale", "expected"),
    [
        ("双11全场5折", "zh-CN", "双11全场5折，拒收请回复R"),
        ("全场5折！", "zh-CN", "全场5折！拒收请回复R"),
        ("详情见 https://x.cn/a ", "zh-CN", "详情见 https://x.cn/a 拒收请回复R"),
        ("Sale ends tonight", "en", "Sale ends tonight. Reply STOP to opt out"),
        ("50% off!", "en", "50% off! Reply STOP to opt out"),
        ("See https://x.co/a", "en-US", "See https://x.co/a Reply STOP to opt out"),
        ("Don't stop shopping", "en", "Don't stop shopping. Reply STOP to opt out"),
        ("回复Tom的消息", "zh-CN", "回复Tom的消息，拒收请回复R"),
    ],
)
def test_opt_out_is_appended_once(text: str, locale: str, expected: str) -> None:
    once = with_opt_out(text, locale, "marketing")
    assert once == expected
    assert with_opt_out(once, locale, "marketing") == once
    assert with_opt_out(text, locale, "transactional") == text


@pytest.mark.parametrize(
    "text",
    [
        "上新啦，回T退订",
        "上新啦 退订回T",
        "上新啦，回复TD退订",
        "上新啦，拒收请回复R",
        "上新啦，回复“R”拒收",
        "上新啦，退订请回复t",
        "New arrivals! Reply STOP to unsubscribe",
        "New arrivals! reply stop to opt-out",
        "New arrivals. Txt STOP to end",
        "New arrivals. STOP to cancel",
        "New arrivals. Text 'stop' to 12345",
    ],
)
def test_existing_opt_out_is_recognised(text: str) -> None:
    assert has_opt_out(text)
    assert with_opt_out(text, "zh-CN", "marketing") == text
    assert with_opt_out(text, "en", "marketing") == text
