"""XML: the JSON data model (plus the JSON type markers' extra types) as a small element schema.

Content type ``application/xml``, content encoding ``utf-8``. kombu has no XML serializer, so this
format is celeriac's own; it is written with :mod:`xml.etree.ElementTree` and read with the stdlib
expat parser behind a strict, streaming builder.

Document: an XML declaration followed by exactly one *value element*. ``add(2, 3)``'s body::

    <?xml version='1.0' encoding='utf-8'?>
    <list><list><int>2</int><int>3</int></list><dict /><dict><item key="callbacks"><none /></item>
    <item key="errbacks"><none /></item><item key="chain"><none /></item>
    <item key="chord"><none /></item></dict></list>

(written without the line breaks). Value elements:

====================================  ==========================================================
Element                               Python value
====================================  ==========================================================
``<none />``                          ``None``
``<bool>true</bool>`` / ``false``     ``bool``
``<int>-12</int>``                    ``int`` (optional ``-``, decimal digits)
``<float>1.5</float>``                ``float`` as ``repr()``; also ``inf``, ``-inf``, ``nan``
``<str>text</str>``                   ``str``, text kept verbatim (whitespace included)
``<str encoding="base64">…</str>``    a ``str`` XML 1.0 cannot carry verbatim (control
                                      characters, CR, lone surrogates, U+FFFE/U+FFFF): its
                                      UTF-8 (``surrogatepass``) bytes in base64
``<bytes>aGk=</bytes>``               ``bytes``, base64
``<list>VALUE…</list>``               ``list``; tuples are written as lists
``<dict>ITEM…</dict>``                ``dict`` with ``str`` keys, one ``<item>`` per entry
``<item key="k">VALUE</item>``        one entry (only inside ``<dict>``); a key XML cannot carry
                                      verbatim is written as ``key-base64="…"`` instead
``<datetime>…</datetime>``            ``datetime``, ``isoformat()`` (offset kept)
``<date>2024-01-02</date>``           ``date``, ``isoformat()``
``<time>03:04:05</time>``             ``time``, ``isoformat()``
``<decimal>1.5</decimal>``            ``Decimal``, ``str()``
``<uuid>…</uuid>``                    ``UUID``, ``str()`` (hyphenated)
====================================  ==========================================================

Reading is safe by construction: a document containing a ``DOCTYPE`` or ``ENTITY`` declaration is
refused before it reaches the parser (so no entity expansion and no external entities); the text
must be strict UTF-8; elements nest at most :data:`MAX_DEPTH` deep (checked as the parser goes);
and every element, attribute and text node must match the schema above — anything else is a
:class:`~celeriac.exceptions.DecodeError`.
"""

from __future__ import annotations

import base64
import binascii
import re
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

from celeriac.exceptions import DecodeError, EncodeError

CONTENT_TYPE = "application/xml"
CONTENT_ENCODING = "utf-8"

#: Deepest element nesting written or read (a dict entry costs two levels: ``<item>`` and value).
#: Encoding and ElementTree's serializer recurse once per level, so this stays well inside
#: Python's default recursion limit of 1000.
MAX_DEPTH = 256

#: Characters XML 1.0 cannot carry verbatim in text or attributes. CR is included because XML
#: parsers normalise line ends, which would turn "\r" into "\n".
_NOT_XML_SAFE = re.compile("[^\t\n\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_FORBIDDEN_MARKUP = re.compile(r"<!(?:DOCTYPE|ENTITY)", re.IGNORECASE)
_INT = re.compile(r"-?[0-9]+")
_FLOAT = re.compile(r"-?(?:[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?|inf)|nan")

# -- encoding --------------------------------------------------------------------------------------


def _text_element(tag: str, text: str) -> ET.Element:
    element = ET.Element(tag)
    element.text = text
    return element


def _encode_str(text: str) -> ET.Element:
    if _NOT_XML_SAFE.search(text) is None:
        return _text_element("str", text)
    element = _text_element("str", _b64_text(text))
    element.set("encoding", "base64")
    return element


def _b64_text(text: str) -> str:
    return base64.b64encode(text.encode("utf-8", "surrogatepass")).decode("ascii")


def _encode(value: Any, depth: int) -> ET.Element:
    if depth > MAX_DEPTH:
        raise EncodeError(f"xml cannot encode values nested more than {MAX_DEPTH} elements deep")
    if value is None:
        return ET.Element("none")
    # bool before int, datetime before date: both are subclasses.
    if isinstance(value, bool):
        return _text_element("bool", "true" if value else "false")
    if isinstance(value, int):
        return _text_element("int", int.__repr__(value))
    if isinstance(value, float):
        return _text_element("float", float.__repr__(value))
    if isinstance(value, str):
        return _encode_str(str.__str__(value))
    if isinstance(value, list | tuple):
        element = ET.Element("list")
        for item in value:  # a loop, not a comprehension: one stack frame per level
            element.append(_encode(item, depth + 1))
        return element
    if isinstance(value, dict):
        return _encode_dict(value, depth)
    if isinstance(value, bytes):
        return _text_element("bytes", base64.b64encode(value).decode("ascii"))
    if isinstance(value, datetime):
        return _text_element("datetime", value.isoformat())
    if isinstance(value, date):
        return _text_element("date", value.isoformat())
    if isinstance(value, time):
        return _text_element("time", value.isoformat())
    if isinstance(value, Decimal):
        return _text_element("decimal", str(value))
    if isinstance(value, uuid.UUID):
        return _text_element("uuid", str(value))
    raise EncodeError(f"xml cannot encode object of type {type(value).__qualname__}")


def _encode_dict(value: dict[Any, Any], depth: int) -> ET.Element:
    element = ET.Element("dict")
    for key, item in value.items():
        if not isinstance(key, str):
            raise EncodeError(f"xml cannot encode dict key of type {type(key).__qualname__}")
        entry = ET.SubElement(element, "item")
        if _NOT_XML_SAFE.search(key) is None:
            entry.set("key", key)
        else:
            entry.set("key-base64", _b64_text(key))
        entry.append(_encode(item, depth + 2))
    return element


def encode(value: Any) -> bytes:
    """``value`` as an XML document (UTF-8, with declaration)."""
    document: bytes = ET.tostring(_encode(value, 1), encoding="utf-8", xml_declaration=True)
    return document


# -- decoding --------------------------------------------------------------------------------------


def _b64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise DecodeError(f"xml: invalid base64 {text[:40]!r}") from exc


def _b64_str(text: str) -> str:
    return _b64(text).decode("utf-8", "surrogatepass")


def _none(text: str) -> None:
    if text:
        raise DecodeError("xml: <none> must be empty")


def _bool(text: str) -> bool:
    if text == "true":
        return True
    if text == "false":
        return False
    raise DecodeError(f"xml: <bool> must be true or false, not {text[:40]!r}")


def _int(text: str) -> int:
    if _INT.fullmatch(text) is None:
        raise DecodeError(f"xml: invalid <int> {text[:40]!r}")
    return int(text)


def _float(text: str) -> float:
    if _FLOAT.fullmatch(text) is None:
        raise DecodeError(f"xml: invalid <float> {text[:40]!r}")
    return float(text)


#: Scalar element → parser of its text. ``str`` is handled apart (it has an attribute).
_SCALARS: dict[str, Callable[[str], Any]] = {
    "none": _none,
    "bool": _bool,
    "int": _int,
    "float": _float,
    "bytes": _b64,
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "time": time.fromisoformat,
    "decimal": Decimal,
    "uuid": uuid.UUID,
}
_CONTAINERS = frozenset({"list", "dict", "item"})
_VALUE_TAGS = frozenset({*_SCALARS, "str", "list", "dict"})


class _Frame:
    """An element being read: its tag, attributes, text pieces and, for containers, children."""

    __slots__ = ("attrib", "children", "tag", "text")

    def __init__(self, tag: str, attrib: dict[str, str]) -> None:
        self.tag = tag
        self.attrib = attrib
        self.text: list[str] = []
        self.children: list[Any] = []


class _Builder:
    """An ElementTree parser target that builds Python values directly, checking the schema.

    The parser calls :meth:`start`/:meth:`data`/:meth:`end` as it reads, so the depth limit stops
    a deeply nested document before it is built, and no intermediate element tree is kept.
    """

    def __init__(self) -> None:
        self._stack: list[_Frame] = []
        self._result: list[Any] = []

    def start(self, tag: str, attrib: dict[str, str]) -> None:
        if len(self._stack) >= MAX_DEPTH:
            raise DecodeError(f"xml: elements nested more than {MAX_DEPTH} deep")
        parent = self._stack[-1].tag if self._stack else None
        if parent == "dict":
            if tag != "item":
                raise DecodeError(f"xml: <dict> may only contain <item>, not <{tag}>")
        elif parent is None or parent in _CONTAINERS:
            if tag not in _VALUE_TAGS:
                raise DecodeError(f"xml: unknown element <{tag}>")
        else:
            raise DecodeError(f"xml: <{parent}> cannot contain elements")
        self._check_attributes(tag, attrib)
        self._stack.append(_Frame(tag, attrib))

    @staticmethod
    def _check_attributes(tag: str, attrib: dict[str, str]) -> None:
        if tag == "item":
            if len(attrib) != 1 or not ("key" in attrib or "key-base64" in attrib):
                raise DecodeError("xml: <item> needs exactly one of key= or key-base64=")
        elif tag == "str":
            if attrib and attrib != {"encoding": "base64"}:
                raise DecodeError(f"xml: unexpected attributes on <str>: {attrib}")
        elif attrib:
            raise DecodeError(f"xml: unexpected attributes on <{tag}>: {attrib}")

    def data(self, text: str) -> None:
        self._stack[-1].text.append(text)

    def end(self, tag: str) -> None:
        frame = self._stack.pop()
        value = self._value(frame)
        if self._stack:
            self._stack[-1].children.append(value)
        else:
            self._result.append(value)

    def _value(self, frame: _Frame) -> Any:
        text = "".join(frame.text)
        tag = frame.tag
        if tag in _CONTAINERS:
            if text.strip():
                raise DecodeError(f"xml: unexpected text in <{tag}>: {text.strip()[:40]!r}")
            if tag == "list":
                return frame.children
            if tag == "dict":
                return self._dict(frame.children)
            if len(frame.children) != 1:
                raise DecodeError("xml: <item> must hold exactly one value")
            key = frame.attrib.get("key")
            if key is None:
                key = _b64_str(frame.attrib["key-base64"])
            return (key, frame.children[0])
        if tag == "str":
            return _b64_str(text) if frame.attrib else text
        return _SCALARS[tag](text)

    @staticmethod
    def _dict(items: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(items)
        if len(result) != len(items):
            raise DecodeError("xml: duplicate key in <dict>")
        return result

    def close(self) -> Any:
        if len(self._result) != 1:
            raise DecodeError("xml: document must hold exactly one value element")
        return self._result[0]


def decode(data: bytes) -> Any:
    """A value from an XML document written by :func:`encode` (see the schema above)."""
    text = str(data, "utf-8")
    if _FORBIDDEN_MARKUP.search(text) is not None:
        raise DecodeError("xml: DOCTYPE and ENTITY declarations are not allowed")
    parser = ET.XMLParser(target=_Builder())
    parser.feed(text)
    return parser.close()
