"""Message templates: the model, the sandbox they render in, validation on save, SMS facts.

    {"name": "order_shipped", "channel": "sms",
     "locales": {"zh-CN": {"text": "{{ shop.name }}：您的订单{{ order.id }}已发货"},
                 "en": {"text": "{{ shop.name }}: order {{ order.id }} has shipped"}},
     "provider_templates": {"aliyun": {"code": "SMS_123456", "params": {"order": "{{ order.id }}"}},
                            "tencent": {"id": "1110", "params": ["{{ order.id }}"]}}}

Every part (text, subject, html, each provider parameter) is Jinja2 source rendered in an
`ImmutableSandboxedEnvironment` with `StrictUndefined`, autoescaping in the html part only.
The language is cut down to what a message needs: `{{ expressions }}` over the variables
given, filters of a small allow-list (`FILTERS`), tests (`TESTS`), `{% if %}`, arithmetic
on numbers and `~` joins. No globals at all (no `range`, `lipsum`, `cycler`, `dict`, ...),
no calls, no loops, no `set`, macros, blocks, includes or imports, no `**`, no attribute
or key starting with `_`, no `self`/`loop`/`caller`: a template that uses any of them is
refused when it is compiled, with its line (`TemplateNotAllowed`). Whatever is printed is
text or a number (a mapping, method or other object is refused rather than shown by its
repr), and every string the template builds is bounded (`~`, `+`, `replace`), as is the
rendered output (`RENDERED_LIMIT`, `RENDERED_HTML_LIMIT`), so rendering is linear in the
source and cannot exhaust memory. Compiled templates are cached by source (bounded LRU).

Validation on save (`validate`) reports each problem with where it is (`loc`, as pydantic
does) and the template line: syntax errors, constructs not allowed, variables outside the
documented set (`VARIABLES`, in every branch), and whatever fails when each part is
rendered against `SAMPLE`, so a missing variable is refused at save time rather than sent
as an empty hole.

`render` picks the locale and renders every part and provider parameter (a marketing SMS
gets the opt-out wording, `with_opt_out`); `preview` answers the preview endpoint with,
for SMS, the billed encoding, characters and segments (`sms_facts`).

Variables a caller passes that are `None` count as absent: `{{ customer.name }}` then
fails, `{{ customer.name|default('亲') }}` prints the fallback.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import TracebackType
from typing import Annotated, Any, Final, Literal, TypedDict

import jinja2
from jinja2 import (
    StrictUndefined,
    TemplateError,
    TemplateRuntimeError,
    Undefined,
    nodes,
    pass_eval_context,
)
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.filters import (
    do_capitalize,
    do_default,
    do_int,
    do_lower,
    do_replace,
    do_title,
    do_trim,
    do_truncate,
    do_upper,
)
from jinja2.nodes import EvalContext
from jinja2.runtime import Context, markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment
from markupsafe import escape, soft_str
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from libs.common.problems import Problem as HttpProblem
from libs.common.problems import field_errors
from services.notifier.providers.base import ProviderTemplate

Channel = Literal["sms", "email"]
Category = Literal["transactional", "marketing"]
Locale = Literal["zh-CN", "en"]
LOCALES: Final[tuple[Locale, ...]] = ("zh-CN", "en")
DEFAULT_LOCALE: Final[Locale] = "zh-CN"

NAME_PATTERN: Final = r"^[a-z0-9_][a-z0-9_.-]{0,63}$"
MAX_SMS_TEXT: Final = 2000
"""Characters of an SMS text's source."""
MAX_BODY_BYTES: Final = 100 * 1024
"""UTF-8 bytes of an email's text or html source."""
MAX_SUBJECT: Final = 500
MAX_PARAM: Final = 500
"""Characters of one provider parameter's source."""
MAX_PARAMS: Final = 20
MAX_NODES: Final = 5000
"""Syntax nodes of one part (a 100 kB email with hundreds of variables has ~2,000)."""
RENDERED_LIMIT: Final = 64 * 1024
"""Characters a text, subject or parameter may render to (and any string built on the way)."""
RENDERED_HTML_LIMIT: Final = 256 * 1024
"""Characters an html part may render to."""
MAX_INT: Final = 10**30
"""The largest integer arithmetic in a template takes or gives."""
CACHE_SIZE: Final = 512


# --- The model ------------------------------------------------------------------------------


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("NUL (U+0000) is not allowed")
    return value


def _one_line(value: str) -> str:
    if any(c in value for c in "\x00\r\n"):
        raise ValueError("a subject is one line (no line breaks or NUL)")
    return value


def _within_bytes(value: str) -> str:
    if len(value.encode("utf-8")) > MAX_BODY_BYTES:
        raise ValueError(f"at most {MAX_BODY_BYTES} bytes (UTF-8)")
    return value


def _mapping(value: Any) -> Any:
    if not isinstance(value, Mapping):
        raise ValueError(
            "Aliyun parameters are a mapping of name to value (TemplateParam), "
            'e.g. {"order": "{{ order.id }}"}'
        )
    return value


def _list(value: Any) -> Any:
    if not isinstance(value, list | tuple):
        raise ValueError(
            'Tencent parameters are an ordered list (TemplateParamSet), e.g. ["{{ order.id }}"]'
        )
    return value


Body = Annotated[str, Field(min_length=1, max_length=MAX_BODY_BYTES), AfterValidator(_no_nul)]
ParamSource = Annotated[str, Field(max_length=MAX_PARAM), AfterValidator(_no_nul)]
AliyunParamName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_]{1,64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LocaleContent(_Strict):
    text: Body
    subject: (
        Annotated[str, Field(min_length=1, max_length=MAX_SUBJECT), AfterValidator(_one_line)]
        | None
    ) = None
    html: Annotated[Body, AfterValidator(_within_bytes)] | None = None


class AliyunTemplate(_Strict):
    code: Annotated[str, Field(pattern=r"^SMS_\d{1,20}$")]
    params: Annotated[
        dict[AliyunParamName, ParamSource],
        BeforeValidator(_mapping),
        Field(max_length=MAX_PARAMS),
    ] = {}


class TencentTemplate(_Strict):
    id: Annotated[str, Field(pattern=r"^\d{1,20}$")]
    params: Annotated[list[ParamSource], BeforeValidator(_list), Field(max_length=MAX_PARAMS)] = []


class ProviderTemplates(_Strict):
    """Pre-approved templates of the Chinese SMS providers, which send nothing else."""

    aliyun: AliyunTemplate | None = None
    tencent: TencentTemplate | None = None


class Template(_Strict):
    name: Annotated[str, Field(pattern=NAME_PATTERN)]
    channel: Channel
    locales: Annotated[dict[Locale, LocaleContent], Field(min_length=1)]
    provider_templates: ProviderTemplates | None = None

    @model_validator(mode="after")
    def _channel_rules(self) -> Template:
        errors: list[tuple[tuple[str | int, ...], str]] = []
        for locale, content in self.locales.items():
            at = ("locales", locale)
            if self.channel == "sms":
                if len(content.text) > MAX_SMS_TEXT:
                    errors.append(
                        ((*at, "text"), f"an SMS text is at most {MAX_SMS_TEXT} characters")
                    )
                if content.subject is not None:
                    errors.append(((*at, "subject"), "an SMS has no subject"))
                if content.html is not None:
                    errors.append(((*at, "html"), "an SMS has no html part"))
            else:
                if content.subject is None:
                    errors.append(((*at, "subject"), "an email needs a subject in every locale"))
                if len(content.text.encode("utf-8")) > MAX_BODY_BYTES:
                    errors.append(((*at, "text"), f"at most {MAX_BODY_BYTES} bytes (UTF-8)"))
        if self.channel != "sms" and self.provider_templates is not None:
            errors.append(
                (("provider_templates",), "provider templates are for SMS only (Aliyun, Tencent)")
            )
        if errors:
            raise ValidationError.from_exception_data(
                "Template",
                [
                    {"type": "value_error", "loc": loc, "input": None, "ctx": {"error": msg}}
                    for loc, msg in errors
                ],
            )
        return self

    def dump(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)


def parse_template(obj: object) -> Template:
    return Template.model_validate(obj)


# --- Variables ------------------------------------------------------------------------------

SAMPLE: Final[Mapping[str, Any]] = {
    "shop": {"name": "回头小店"},
    "customer": {"name": "王小明"},
    "order": {"id": "E20241111000123", "total": "¥128.00", "city": "杭州"},
    "parcel": {"tracking_number": "SF1234567890123", "carrier": "顺丰速运", "city": "上海"},
    "promotion": {"name": "双11大促"},
    "unsubscribe_url": "https://huitou.example/u/3f9a2c",
}
"""Plausible values of every documented variable; validation renders against these.
`order.total` is the display amount (`format_money` builds it from minor units)."""
MARKETING_ONLY: Final = frozenset({"unsubscribe_url"})


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> Iterator[str]:
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key


VARIABLES: Final[tuple[str, ...]] = tuple(_leaves(SAMPLE))
"""The variables every template may use (`unsubscribe_url` on marketing only)."""


def sample(category: Category | None = None) -> dict[str, Any]:
    """The sample variables of a category (`None`: either, so everything)."""
    if category == "transactional":
        return {k: v for k, v in SAMPLE.items() if k not in MARKETING_ONLY}
    return dict(SAMPLE)


# --- Filters --------------------------------------------------------------------------------

_CURRENCY_EXPONENTS: Final = {
    **dict.fromkeys(("BIF", "CLP", "DJF", "GNF", "ISK", "JPY", "KMF", "KRW", "PYG"), 0),
    **dict.fromkeys(("RWF", "UGX", "UYI", "VND", "VUV", "XAF", "XOF", "XPF"), 0),
    **dict.fromkeys(("BHD", "IQD", "JOD", "KWD", "LYD", "OMR", "TND"), 3),
    **dict.fromkeys(("CLF", "UYW"), 4),
}
_CURRENCY_SYMBOLS: Final = {"CNY": "¥", "USD": "$", "EUR": "€", "GBP": "£", "HKD": "HK$"}


def format_money(value: Any, currency: str = "CNY") -> str:
    """An amount in integer minor units as shown to a customer: `12800` → `¥128.00`,
    `{"amount_minor": 1999, "currency": "USD"}` → `$19.99`; a currency without a symbol
    here is written by its code (`JPY 1,500`)."""
    if isinstance(value, Mapping):
        currency = value.get("currency", currency)
        value = value.get("amount_minor")
    if isinstance(value, Undefined):
        return soft_str(value)  # StrictUndefined: raises
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_INT:
        raise TemplateRuntimeError("format_money takes an integer amount in minor units")
    if not isinstance(currency, str) or not re.fullmatch(r"[A-Z]{3}", currency):
        raise TemplateRuntimeError("format_money takes an ISO 4217 currency code such as 'CNY'")
    exponent = _CURRENCY_EXPONENTS.get(currency, 2)
    amount = f"{Decimal(abs(value)).scaleb(-exponent):,.{exponent}f}"
    sign = "-" if value < 0 else ""
    symbol = _CURRENCY_SYMBOLS.get(currency)
    return f"{sign}{symbol}{amount}" if symbol else f"{sign}{currency} {amount}"


def _round(value: Any, precision: Any = 0, method: str = "common") -> Any:
    # Jinja's own takes any precision: `5|round(-10**9)` computes 10**(10**9).
    if isinstance(precision, bool) or not isinstance(precision, int) or not 0 <= precision <= 10:
        raise TemplateRuntimeError("round takes a precision from 0 to 10")
    if method not in ("common", "ceil", "floor"):
        raise TemplateRuntimeError("round's method is 'common', 'ceil' or 'floor'")
    if isinstance(value, Undefined):
        return soft_str(value)
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise TemplateRuntimeError("round takes a number")
    return jinja2.filters.do_round(value, precision, method)  # type: ignore[arg-type]


@pass_eval_context
def _replace(eval_ctx: EvalContext, s: Any, old: Any, new: Any, count: Any = None) -> str:
    """Jinja's `replace`, refusing a result longer than the rendered limit (a chain of
    replaces would otherwise double a string at each step)."""
    text, old_s = soft_str(s), soft_str(old)
    new_s = soft_str(escape(new) if eval_ctx.autoescape else new)
    if count is not None and (isinstance(count, bool) or not isinstance(count, int)):
        raise TemplateRuntimeError("replace's count is a whole number")
    hits = text.count(old_s) if old_s else len(text) + 1
    if count is not None and count >= 0:
        hits = min(hits, count)
    limit = _environment_limit(eval_ctx.environment)
    if len(text) + hits * (len(new_s) - len(old_s)) > limit:
        raise TemplateRuntimeError(f"replace would make a text longer than {limit} characters")
    return do_replace(eval_ctx, s, old, new, count)


FILTERS: Final[Mapping[str, Any]] = {
    "default": do_default,
    "d": do_default,
    "upper": do_upper,
    "lower": do_lower,
    "title": do_title,
    "capitalize": do_capitalize,
    "trim": do_trim,
    "truncate": do_truncate,
    "replace": _replace,
    "round": _round,
    "int": do_int,
    "format_money": format_money,
}
"""The filters a template may use: none reaches beyond its input, none grows it unbounded."""
TESTS: Final[Mapping[str, Any]] = {
    name: jinja2.tests.TESTS[name] for name in ("defined", "undefined", "none", "number", "string")
}


# --- The sandbox ----------------------------------------------------------------------------


class TemplateNotAllowed(SecurityError):
    """A construct outside the message-template language, refused at compile time."""

    def __init__(self, message: str, lineno: int | None) -> None:
        super().__init__(message)
        self.lineno = lineno


_ALLOWED_NODES: Final[tuple[type[nodes.Node], ...]] = (
    nodes.Template,
    nodes.Output,
    nodes.TemplateData,
    nodes.If,
    nodes.CondExpr,
    nodes.Const,
    nodes.Name,
    nodes.Getattr,
    nodes.Getitem,
    nodes.Slice,
    nodes.Filter,
    nodes.Test,
    nodes.Keyword,
    nodes.Concat,
    nodes.Compare,
    nodes.Operand,
    nodes.And,
    nodes.Or,
    nodes.Not,
    nodes.Neg,
    nodes.Pos,
    nodes.Add,
    nodes.Sub,
    nodes.Mul,
    nodes.Div,
    nodes.FloorDiv,
    nodes.Mod,
)
_REFUSED_NAMES: Final[Mapping[type[nodes.Node], str]] = {
    nodes.For: "loops ({% for %})",
    nodes.Assign: "{% set %}",
    nodes.AssignBlock: "{% set %}",
    nodes.Macro: "macros",
    nodes.CallBlock: "{% call %}",
    nodes.Call: "calls (use a filter instead: {{ x|upper }})",
    nodes.Include: "{% include %}",
    nodes.Import: "{% import %}",
    nodes.FromImport: "{% import %}",
    nodes.Extends: "{% extends %}",
    nodes.Block: "{% block %}",
    nodes.FilterBlock: "{% filter %}",
    nodes.With: "{% with %}",
    nodes.ScopedEvalContextModifier: "{% autoescape %}",
    nodes.EvalContextModifier: "{% autoescape %}",
    nodes.Pow: "'**'",
    nodes.List: "list literals",
    nodes.Tuple: "tuple literals",
    nodes.Dict: "dict literals",
}
_RESERVED: Final = frozenset({"self", "loop", "caller", "varargs", "kwargs", "super"})


def _check_language(tree: nodes.Template, filters: Mapping[str, Any]) -> None:
    """Refuse what the message-template language leaves out (see the module docstring)."""
    stack: list[nodes.Node] = [tree]
    seen = 0
    while stack:
        node = stack.pop()
        seen += 1
        line = getattr(node, "lineno", None)
        if seen > MAX_NODES:
            raise TemplateNotAllowed(f"too long: more than {MAX_NODES} syntax nodes", line)
        if not isinstance(node, _ALLOWED_NODES):
            what = _REFUSED_NAMES.get(type(node), type(node).__name__)
            raise TemplateNotAllowed(f"{what} not allowed in a message template", line)
        if isinstance(node, nodes.Name) and (node.name in _RESERVED or node.name[:1] == "_"):
            raise TemplateNotAllowed(f"{node.name!r} is not a variable a template may use", line)
        if isinstance(node, nodes.Getattr) and node.attr[:1] == "_":
            raise TemplateNotAllowed(f"attribute {node.attr!r} is not allowed", line)
        if (
            isinstance(node, nodes.Getitem)
            and isinstance(node.arg, nodes.Const)
            and isinstance(node.arg.value, str)
            and node.arg.value[:1] == "_"
        ):
            raise TemplateNotAllowed(f"key {node.arg.value!r} is not allowed", line)
        if isinstance(node, nodes.Filter):
            if node.node is None or node.name not in filters:
                raise TemplateNotAllowed(
                    f"no filter {node.name!r}; filters: {', '.join(sorted(filters))}", line
                )
            if node.dyn_args is not None or node.dyn_kwargs is not None:
                raise TemplateNotAllowed("*args and **kwargs are not allowed", line)
        if isinstance(node, nodes.Test):
            if node.name not in TESTS:
                raise TemplateNotAllowed(
                    f"no test {node.name!r}; tests: {', '.join(sorted(TESTS))}", line
                )
            if node.dyn_args is not None or node.dyn_kwargs is not None:
                raise TemplateNotAllowed("*args and **kwargs are not allowed", line)
        stack.extend(node.iter_child_nodes())


def _references(tree: nodes.Template) -> Iterator[tuple[tuple[str, ...], int]]:
    """Every variable path the template reads (`order.id` as `("order", "id")`), with its
    line, in every branch; a dynamic key (`order[x]`) ends the path at its base."""
    stack: list[nodes.Node] = [tree]
    while stack:
        node = stack.pop()
        if not isinstance(node, nodes.Name | nodes.Getattr | nodes.Getitem):
            stack.extend(node.iter_child_nodes())
            continue
        path: list[str] = []
        current: nodes.Node = node
        while True:
            if isinstance(current, nodes.Getattr):
                path.append(current.attr)
                current = current.node
            elif isinstance(current, nodes.Getitem):
                key = current.arg
                if isinstance(key, nodes.Const) and isinstance(key.value, str):
                    path.append(key.value)
                else:
                    stack.append(key)
                    path.clear()
                current = current.node
            elif isinstance(current, nodes.Name):
                yield (current.name, *reversed(path)), current.lineno
                break
            else:
                stack.append(current)
                break


def _unknown(path: tuple[str, ...], vocabulary: Mapping[str, Any]) -> str | None:
    """Why `path` is not a documented variable, or None when it is (or leads to some)."""
    current: Any = vocabulary
    for i, key in enumerate(path):
        if not isinstance(current, Mapping):
            return f"{'.'.join(path[:i])} is a value: it has no {key!r}"
        if key not in current:
            if i == 0:
                return f"unknown variable {key!r}; templates may use {', '.join(VARIABLES)}"
            return (
                f"unknown variable {'.'.join(path[: i + 1])!r}; "
                f"{'.'.join(path[:i])} has {', '.join(sorted(current))}"
            )
        current = current[key]
    return None


def _finalize(value: Any) -> Any:
    """What `{{ … }}` may print: text and numbers (an object is refused, never shown by its
    repr); Undefined passes through so that StrictUndefined raises."""
    if isinstance(value, Undefined | str | int | float | Decimal):
        return value
    raise SecurityError(f"a template prints text and numbers, not a {type(value).__name__}")


def _number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not (
        isinstance(value, int) and abs(value) > MAX_INT
    )


class _CodeGenerator(CodeGenerator):
    """Jinja's code generator with `~` bounded (it is not a sandbox-interceptable operator)."""

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.bounded_concat(context.eval_ctx.autoescape, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _Sandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _CodeGenerator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self, *, html: bool) -> None:
        super().__init__(
            undefined=StrictUndefined,
            autoescape=html,
            keep_trailing_newline=False,
            trim_blocks=True,
            lstrip_blocks=True,
            finalize=_finalize,
            optimized=False,  # no constant folding at compile time: `'x' * 10**9` folds too
            cache_size=0,
            auto_reload=False,
        )
        self.limit = RENDERED_HTML_LIMIT if html else RENDERED_LIMIT
        self.globals.clear()
        self.filters = dict(FILTERS)
        self.tests = dict(TESTS)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            raise SecurityError("'**' is not allowed in a message template")
        if isinstance(left, Undefined) or isinstance(right, Undefined):
            return super().call_binop(context, operator, left, right)  # raises UndefinedError
        if operator == "+" and isinstance(left, str) and isinstance(right, str):
            if len(left) + len(right) > self.limit:
                raise TemplateRuntimeError(f"a text longer than {self.limit} characters")
            return super().call_binop(context, operator, left, right)
        if not (_number(left) and _number(right)):
            raise SecurityError(
                f"{operator!r} works on numbers (join text with '~'), "
                f"not {type(left).__name__} and {type(right).__name__}"
            )
        return super().call_binop(context, operator, left, right)

    def bounded_concat(self, autoescape: bool, parts: tuple[Any, ...]) -> str:
        texts = [soft_str(part) for part in parts]
        if sum(map(len, texts)) > self.limit:
            raise TemplateRuntimeError(f"a text longer than {self.limit} characters")
        joined: str = markup_join(texts) if autoescape else str_join(texts)
        if len(joined) > self.limit:
            raise TemplateRuntimeError(f"a text longer than {self.limit} characters")
        return joined


def _environment_limit(environment: jinja2.Environment) -> int:
    return environment.limit if isinstance(environment, _Sandbox) else RENDERED_LIMIT


_TEXT = _Sandbox(html=False)
_HTML = _Sandbox(html=True)
Kind = Literal["text", "html"]


@dataclass(frozen=True)
class _Compiled:
    template: jinja2.Template
    references: tuple[tuple[tuple[str, ...], int], ...]


@functools.lru_cache(maxsize=CACHE_SIZE)
def _compiled(kind: Kind, source: str) -> _Compiled:
    """Parse, check and compile one part, once per source (errors are not cached)."""
    environment = _HTML if kind == "html" else _TEXT
    try:
        tree = environment.parse(source)
        _check_language(tree, environment.filters)
        template = environment.from_string(tree)
    except TemplateError:
        raise
    except Exception as exc:  # RecursionError on deep nesting, a 5,000-digit literal, ...
        raise TemplateNotAllowed(
            f"too deeply nested or too large to compile ({type(exc).__name__})", None
        ) from None
    return _Compiled(template, tuple(sorted(_references(tree), key=lambda ref: ref[1])))


def _render_source(kind: Kind, source: str, variables: Mapping[str, Any]) -> str:
    compiled = _compiled(kind, source)
    limit = RENDERED_HTML_LIMIT if kind == "html" else RENDERED_LIMIT
    chunks: list[str] = []
    size = 0
    try:
        for chunk in compiled.template.generate(variables):
            size += len(chunk)
            if size > limit:
                raise TemplateRuntimeError(f"renders longer than {limit} characters")
            chunks.append(chunk)
    except TemplateError:
        raise
    except Exception as exc:  # TypeError, ZeroDivisionError, RecursionError, ...
        error = TemplateRuntimeError(f"{type(exc).__name__}: {str(exc)[:200]}")
        raise error.with_traceback(exc.__traceback__) from None
    return "".join(chunks)


def _line_of(exc: BaseException) -> int | None:
    """The template line an error happened on: a syntax error's own, or the innermost
    template frame of the traceback Jinja rewrote."""
    lineno = getattr(exc, "lineno", None)
    if isinstance(lineno, int):
        return lineno
    line: int | None = None
    tb: TracebackType | None = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


def _message(exc: TemplateError) -> str:
    return exc.message or type(exc).__name__


def _cleaned(value: Any) -> Any:
    """Variables as plain dicts, `None` dropped (absent: StrictUndefined or `default`)."""
    if isinstance(value, Mapping):
        return {str(k): _cleaned(v) for k, v in value.items() if v is not None}
    return value


# --- Validation -----------------------------------------------------------------------------

Loc = tuple[str | int, ...]


class Problem(TypedDict):
    """One thing wrong with a template: where (`loc`, as pydantic gives it; `line` in the
    part's source, from 1, None for the model's own errors) and what. JSON as it is."""

    loc: list[str | int]
    line: int | None
    msg: str


def _problem(loc: Loc, msg: str, line: int | None = None) -> Problem:
    return {"loc": list(loc), "line": line, "msg": msg}


def _parts(
    template: Template, locales: Sequence[str] | None = None
) -> Iterator[tuple[Loc, Kind, str]]:
    for locale, content in template.locales.items():
        if locales is not None and locale not in locales:
            continue
        yield ("locales", locale, "text"), "text", content.text
        if content.subject is not None:
            yield ("locales", locale, "subject"), "text", content.subject
        if content.html is not None:
            yield ("locales", locale, "html"), "html", content.html


def _param_parts(template: Template) -> Iterator[tuple[Loc, str | int, str, str]]:
    """(loc, key, provider, source) of every provider parameter."""
    providers = template.provider_templates
    if providers is None:
        return
    if providers.aliyun is not None:
        for key, source in providers.aliyun.params.items():
            yield ("provider_templates", "aliyun", "params", key), key, "aliyun", source
    if providers.tencent is not None:
        for index, source in enumerate(providers.tencent.params):
            yield ("provider_templates", "tencent", "params", index), index, "tencent", source


def validate(
    template: Template | Mapping[str, Any], *, category: Category | None = None
) -> list[Problem]:
    """Everything wrong with a template, for a save to refuse (empty: fine).

    A mapping is first validated as the model (its errors come back with `line` None).
    Then each part is compiled (syntax, the language's limits), its variables checked
    against the documented ones in every branch, and it is rendered against `SAMPLE`
    (`category` "transactional" leaves out `unsubscribe_url`; None allows it)."""
    if not isinstance(template, Template):
        try:
            template = Template.model_validate(template)
        except ValidationError as exc:
            return [
                _problem(tuple(error["loc"]), error["msg"])
                for error in exc.errors(include_url=False)
            ]
    variables = sample(category)
    problems: list[Problem] = []
    parts: list[tuple[Loc, Kind, str]] = list(_parts(template))
    parts += [(loc, "text", source) for loc, _, _, source in _param_parts(template)]
    for loc, kind, source in parts:
        try:
            compiled = _compiled(kind, source)
        except TemplateError as exc:
            problems.append(_problem(loc, _message(exc), _line_of(exc)))
            continue
        found = False
        for path, line in compiled.references:
            why = _unknown(path, SAMPLE)
            if why is not None:
                problems.append(_problem(loc, why, line))
                found = True
        if found:
            continue
        try:
            _render_source(kind, source, variables)
        except TemplateError as exc:
            problems.append(_problem(loc, _message(exc), _line_of(exc)))
    return problems


# --- Rendering ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendered:
    locale: str
    text: str
    subject: str | None = None
    html: str | None = None
    provider: Mapping[str, ProviderTemplate] = field(default_factory=dict)
    """Provider name (`aliyun`, `tencent`) → its template id and rendered parameters, for
    the providers that send only approved templates (empty for the others)."""


def choose_locale(template: Template, requested: str | None) -> str:
    """The requested locale, else one of its language (`en-US` → `en`, `zh` → `zh-CN`),
    else `zh-CN`, else the template's first."""
    available = list(template.locales)
    if requested:
        if requested in available:
            return requested
        language = requested.split("-")[0].lower()
        for locale in available:
            if locale.split("-")[0].lower() == language:
                return locale
    if DEFAULT_LOCALE in available:
        return DEFAULT_LOCALE
    return available[0]


def render(
    template: Template,
    locale: str | None,
    variables: Mapping[str, Any],
    *,
    category: Category,
) -> Rendered:
    """One message of `template` in the best locale for `locale` (see `choose_locale`).

    `unsubscribe_url` is given to marketing only; a marketing SMS gets the market's opt-out
    wording (`with_opt_out`) unless it already has some; a subject is made one line.
    Raises a `TemplateError` (UndefinedError, SecurityError, ...) with a note naming the
    part and line."""
    chosen = choose_locale(template, locale)
    given = _cleaned(variables)
    if category != "marketing":
        for name in MARKETING_ONLY:
            given.pop(name, None)
    out: dict[str, str] = {}
    for loc, kind, source in _parts(template, [chosen]):
        out[str(loc[-1])] = _render_part(loc, kind, source, given)
    params: dict[str, dict[str | int, str]] = {}
    for loc, key, provider, source in _param_parts(template):
        params.setdefault(provider, {})[key] = _render_part(loc, "text", source, given)
    providers: dict[str, ProviderTemplate] = {}
    if template.provider_templates is not None:
        aliyun, tencent = template.provider_templates.aliyun, template.provider_templates.tencent
        if aliyun is not None:
            rendered = params.get("aliyun", {})
            providers["aliyun"] = ProviderTemplate(
                aliyun.code, {str(k): rendered[k] for k in aliyun.params}
            )
        if tencent is not None:
            rendered = params.get("tencent", {})
            providers["tencent"] = ProviderTemplate(
                tencent.id, [rendered[i] for i in range(len(tencent.params))]
            )
    text = out["text"]
    if template.channel == "sms":
        text = with_opt_out(text, chosen, category)
    subject = out.get("subject")
    if subject is not None:
        subject = " ".join(subject.split())
    return Rendered(
        locale=chosen,
        text=text,
        subject=subject,
        html=out.get("html"),
        provider=providers,
    )


_WHERE: Final = "huitou_problem"
"""Where a render error happened, kept on the exception (its class stays Jinja's)."""


def _render_part(loc: Loc, kind: Kind, source: str, variables: Mapping[str, Any]) -> str:
    try:
        return _render_source(kind, source, variables)
    except TemplateError as exc:
        line = _line_of(exc)
        where = ".".join(str(p) for p in loc)
        exc.add_note(f"in {where}" + (f", line {line}" if line is not None else ""))
        exc.__dict__[_WHERE] = _problem(loc, _message(exc), line)
        raise


def problem_of(exc: TemplateError) -> Problem | None:
    """The part and line a `TemplateError` raised by `render` happened at."""
    found: Problem | None = exc.__dict__.get(_WHERE)
    return found


def _merged(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        below = out.get(key)
        if isinstance(value, Mapping) and isinstance(below, Mapping):
            out[key] = _merged(below, value)
        else:
            out[key] = value
    return out


class PreviewRequest(_Strict):
    """The body of `POST /v1/templates/{name}/preview`."""

    variables: dict[str, Any] = {}
    """Over `SAMPLE`: what is left out keeps its sample value."""
    locale: Annotated[str, Field(max_length=35)] | None = None
    category: Category = "marketing"
    """Marketing by default: `unsubscribe_url` set, the SMS opt-out wording shown."""
    signature: (
        Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_nul)] | None
    ) = None
    """The SMS signature the carrier bills with the text (the shop's `sign_name`)."""
    placement: Literal["start", "end"] = "start"


def preview(template: Template, body: Mapping[str, Any]) -> dict[str, Any]:
    """A template rendered for `POST /v1/templates/{name}/preview` (see `PreviewRequest`):
    the locale chosen, text, subject and html (email), and for SMS the encoding, billed
    characters and segments (signature included) and the provider templates' parameters.
    Answers 422 for a bad body or a template that does not render with these variables."""
    try:
        request = PreviewRequest.model_validate(body)
    except ValidationError as exc:
        raise HttpProblem(422, "the preview request is invalid", errors=field_errors(exc)) from None
    variables = _merged(sample(request.category), request.variables)
    try:
        rendered = render(template, request.locale, variables, category=request.category)
    except TemplateError as exc:
        problem = problem_of(exc) or _problem((), _message(exc), _line_of(exc))
        raise HttpProblem(
            422, "the template does not render with these variables", errors=[problem]
        ) from None
    out: dict[str, Any] = {"locale": rendered.locale, "text": rendered.text}
    if template.channel == "email":
        out["subject"] = rendered.subject
        out["html"] = rendered.html
        return out
    facts = sms_facts(rendered.text, request.signature, placement=request.placement)
    out.update(encoding=facts.encoding, characters=facts.characters, segments=facts.segments)
    out["provider_templates"] = {
        name: {
            "id": spec.id,
            "params": dict(spec.params) if isinstance(spec.params, Mapping) else list(spec.params),
        }
        for name, spec in rendered.provider.items()
    }
    return out


# --- SMS facts ------------------------------------------------------------------------------

GSM_BASIC: Final = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
"""GSM 03.38 default alphabet (without the escape), one septet each."""
GSM_EXTENSION: Final = frozenset("\f^{}\\[~]|€")
"""The extension table's characters: an escape and the character, two septets each."""


@dataclass(frozen=True)
class SmsFacts:
    encoding: Literal["GSM-7", "UCS-2"]
    characters: int
    """As the carrier counts them: septets (GSM-7) or UTF-16 code units (UCS-2)."""
    segments: int


def billed_text(
    text: str, signature: str | None = None, *, placement: Literal["start", "end"] = "start"
) -> str:
    """The text a carrier bills: with the sender's signature in 【】 (China's convention,
    at the start; `placement` "end" for carriers that want it last)."""
    if not signature:
        return text
    mark = signature if signature.startswith("【") else f"【{signature}】"
    return mark + text if placement == "start" else text + mark


def _segments(costs: Sequence[int], single: int, part: int) -> int:
    if sum(costs) <= single:
        return 1
    segments, used = 1, 0
    for cost in costs:  # an escape pair or a surrogate pair is never split across parts
        if used + cost > part:
            segments += 1
            used = 0
        used += cost
    return segments


def sms_facts(
    text: str, signature: str | None = None, *, placement: Literal["start", "end"] = "start"
) -> SmsFacts:
    """Encoding, billed characters and segments of an SMS (with its signature, see
    `billed_text`): GSM-7 when every character is in the default alphabet or its extension
    (which counts two), 160 septets single or 153 per part; otherwise UCS-2, counted in
    UTF-16 code units (an emoji is 2), 70 single or 67 per part — which is also how the
    Chinese carriers bill Chinese text. An empty text is one segment."""
    full = billed_text(text, signature, placement=placement)
    if all(c in GSM_BASIC or c in GSM_EXTENSION for c in full):
        costs = [2 if c in GSM_EXTENSION else 1 for c in full]
        return SmsFacts("GSM-7", sum(costs), _segments(costs, 160, 153))
    costs = [2 if ord(c) > 0xFFFF else 1 for c in full]
    return SmsFacts("UCS-2", sum(costs), _segments(costs, 70, 67))


# --- Opt-out wording ------------------------------------------------------------------------

OPT_OUT_WORDING: Final[Mapping[str, str]] = {"zh-CN": "拒收请回复R", "en": "Reply STOP to opt out"}
_OPT_OUT: Final = re.compile(
    r"(?:回复?|回覆|发送|reply|text|txt|send)\s*[\"'“”‘’「」]?\s*"
    r"(?:TD|T|R|STOP|UNSUBSCRIBE|退订)(?![A-Za-z])"
    r"|退订\s*请?\s*回复?\s*[A-Za-z]"
    r"|拒收请回复"
    r"|\bstop\s+to\s+(?:opt[\s-]?out|end|cancel|quit|unsubscribe|stop)",
    re.IGNORECASE,
)
_ENDS_SENTENCE_ZH: Final = frozenset("。！？!?…~～，,、；;：:")


def has_opt_out(text: str) -> bool:
    """Whether an SMS already tells how to opt out (`拒收请回复R`, `回T退订`, `退订回T`,
    `回复TD退订`, `Reply STOP`, `Txt STOP to end`, ... in any case)."""
    return _OPT_OUT.search(text) is not None


def with_opt_out(text: str, locale: str, category: Category) -> str:
    """A marketing SMS with the opt-out wording its market requires (zh: `拒收请回复R`,
    en: `Reply STOP to opt out`), appended only when it has none; transactional as is."""
    if category != "marketing" or has_opt_out(text):
        return text
    chinese = locale.lower().startswith("zh")
    wording = OPT_OUT_WORDING["zh-CN" if chinese else "en"]
    body = text.rstrip()
    if not body:
        return wording
    last = body[-1]
    if chinese:
        if last in _ENDS_SENTENCE_ZH:
            separator = ""
        elif "\u4e00" <= last <= "\u9fff" or "\u3400" <= last <= "\u4dbf":
            separator = "，"
        else:
            separator = " "
    else:
        ends_with_link = "/" in body.split()[-1]
        separator = ". " if last.isalnum() and not ends_with_link else " "
    return body + separator + wording
