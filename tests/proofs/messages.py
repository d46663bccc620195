"""Hypothesis strategies for hostile protobuf requests, derived from the message descriptors.

Why from the descriptors: a strategy written by hand per message goes stale when a field is
added; walking ``DESCRIPTOR.fields`` covers every field of every request the protos declare,
including fields added later. Values are biased towards what breaks servers: NaN, infinities,
signed and unsigned extremes, empty, huge and odd unicode strings, huge repeated fields, enum
numbers the proto never declared, and several members of one oneof.

Two shapes of request: *random* (every field drawn independently; most fail early validation)
and *mutated* (a valid request with a few fields replaced; these reach the deep code paths a
random request never gets past). On top of either, :func:`wire_payloads` sometimes damages the
serialized bytes (truncation, garbage, unknown fields, invalid UTF-8 in a string field), which
a client in another language can send although the Python library never would.

Cost control: integer fields draw from small values, type extremes and a few values just over
common limits, never from the whole legal range, because a legal but expensive request (a
100,000-step edit) proves nothing about robustness and would only make the run slow. Edges
above the bounds (1025, 4097, 10001, 2**31, 2**32-1) are refused by validation, cheaply.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

F = FieldDescriptor

# type -> (lowest, highest) legal value on the wire
_INT_RANGES: dict[int, tuple[int, int]] = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1), F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1), F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}
# just over common limits (max_new_tokens_limit 1024, memory_rows 4096, max_edit_facts 10000, ...)
_INT_EDGES = (0, 1, 2, 3, 4, 7, 100, 1025, 4097, 10_001, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1,
              -1, -(2**31), -(2**63))
_FLOAT_EDGES = (math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-45, -1e-45, 1e-40, 1e-8, 0.01, 0.5, 1.0, 1.0000001,
                2.0, -1.0, 100.0, 100.5, 1e6, 1e9, 3.4028235e38, -3.4028235e38, 1e300)
_STRING_EDGES = (
    "", " ", "\t\n", "{}", "{} {}", "{}{}{}", "{0}", "%s", "\x00", "a\x00b", "\u202e\u200b\ufeff", "\ufffd",
    "😀🇫🇷👩‍👩‍👧", "ß" * 3, "İstanbul", "\u0301\u0301", "<eos>", "<|im_start|>user", "\\", "'; DROP TABLE edits; --",
    "../../etc/passwd", "/etc/passwd", "default", "model", "The capital of {} is", "France", "Paris",
    "The mother tongue of {} is", "Danielle Darrieux", "English", "system", "user", "assistant",
    "edit-" + "0" * 32, "0" * 32,
)
# huge strings are built by repetition (drawing a megabyte of characters one by one would
# make Hypothesis itself the bottleneck); 1.1M four-byte characters pass gRPC's 4 MB limit
_HUGE_UNITS = ("a", "{}", "é", "😀", "The capital of {} is ", " ", "\x00")
_HUGE_COUNTS = (257, 2049, 100_000, 1_100_000)
# repeated fields: a few values, or many copies of one (limits: 256 score items, 16 stop
# strings, 100/10000 facts, 2048 prompt tokens; 300,000 uint32 ids exceed nothing but size)
_REPEAT_COUNTS = (17, 101, 257, 2049, 10_001, 300_000)
_MESSAGE_REPEAT_COUNTS = (17, 101, 257, 10_001, 200_000)
_UNKNOWN_ENUMS = (-1, 6, 99, 2**31 - 1, -(2**31))

KEEP = object()  # "leave this field as the template has it"


def hostile_int(field: FieldDescriptor) -> st.SearchStrategy[int]:
    low, high = _INT_RANGES[field.type]
    edges = [v for v in _INT_EDGES if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(max(low, -64), min(high, 64)))


def hostile_float(field: FieldDescriptor) -> st.SearchStrategy[float]:
    width = 32 if field.type == F.TYPE_FLOAT else 64
    edges = list(_FLOAT_EDGES)
    return st.one_of(st.sampled_from(edges), st.floats(width=width))


def hostile_string() -> st.SearchStrategy[str]:
    # n characters in all, whatever the unit's length
    huge = st.builds(lambda unit, n: unit * max(1, n // len(unit)), st.sampled_from(_HUGE_UNITS),
                     st.sampled_from(_HUGE_COUNTS))
    # st.text never yields lone surrogates, which the Python library cannot serialize anyway;
    # invalid UTF-8 on the wire is wire_payloads' job
    return st.one_of(st.sampled_from(_STRING_EDGES), st.text(max_size=40), huge)


def hostile_enum(field: FieldDescriptor) -> st.SearchStrategy[int]:
    declared = [v.number for v in field.enum_type.values]
    return st.one_of(st.sampled_from(declared), st.sampled_from(_UNKNOWN_ENUMS))


def hostile_scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    if field.type in _INT_RANGES:
        return hostile_int(field)
    if field.type in (F.TYPE_FLOAT, F.TYPE_DOUBLE):
        return hostile_float(field)
    if field.type == F.TYPE_BOOL:
        return st.booleans()
    if field.type == F.TYPE_STRING:
        return hostile_string()
    if field.type == F.TYPE_BYTES:
        return st.binary(max_size=64)
    if field.type == F.TYPE_ENUM:
        return hostile_enum(field)
    raise TypeError(f"no strategy for field {field.full_name} of type {field.type}")


# A request bigger than gRPC's 4 MB receive limit is refused by the transport whatever its
# content, so more is waste; without this cap, copies of copies of a huge string would make
# the fuzzer itself allocate gigabytes.
MAX_REQUEST_BYTES = 6 * 2**20


def _size(value: Any) -> int:
    """Serialized size of one element, roughly (strings count 4 bytes a character at worst)."""
    if isinstance(value, Message):
        return value.ByteSize()
    if isinstance(value, str):
        return len(value) * 4 + 2
    if isinstance(value, bytes):
        return len(value) + 2
    return 10


def _copies(element: st.SearchStrategy[Any], counts: tuple[int, ...]) -> st.SearchStrategy[list[Any]]:
    """``n`` copies of one value, ``n`` capped so the copies stay under :data:`MAX_REQUEST_BYTES`."""
    return st.builds(lambda value, n: [value] * max(1, min(n, MAX_REQUEST_BYTES // max(1, _size(value)))),
                     element, st.sampled_from(counts))


def hostile_value(field: FieldDescriptor, depth: int) -> st.SearchStrategy[Any]:
    """A value for one field (a list for a repeated one, a Message for a message field)."""
    if field.type == F.TYPE_MESSAGE:
        element: st.SearchStrategy[Any] = random_message(field.message_type, depth + 1)
        counts = _MESSAGE_REPEAT_COUNTS
    else:
        element = hostile_scalar(field)
        counts = _REPEAT_COUNTS
    if not field.is_repeated:
        return element
    return st.one_of(st.lists(element, max_size=4), _copies(element, counts))


def _build(descriptor: Descriptor, values: dict[str, Any], template: Message | None = None) -> Message:
    """A message of ``descriptor``'s class: the template (if any) with ``values`` written over it.
    Several members of one oneof may be written: the last wins, as on the wire."""
    from google.protobuf import message_factory

    message = message_factory.GetMessageClass(descriptor)()
    if template is not None:
        message.CopyFrom(template)
    budget = 2 * MAX_REQUEST_BYTES  # fields past it are left unset: bounded memory per example
    for name, value in values.items():
        if value is KEEP:
            continue
        budget -= sum(_size(v) for v in value) if isinstance(value, list) else _size(value)
        if budget < 0:
            break
        field = descriptor.fields_by_name[name]
        if field.is_repeated:
            message.ClearField(name)
            if value is not None:
                getattr(message, name).extend(value)
        elif field.type == F.TYPE_MESSAGE:
            if value is None:
                message.ClearField(name)
            else:
                getattr(message, name).CopyFrom(value)
        elif value is None:
            message.ClearField(name)
        else:
            setattr(message, name, value)
    return message


def random_message(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Every field independently absent or hostile (depth-limited for nested messages)."""
    fields = {}
    for field in descriptor.fields:
        if field.type == F.TYPE_MESSAGE and depth >= 3:
            continue
        fields[field.name] = st.one_of(st.none(), hostile_value(field, depth))
    return st.fixed_dictionaries(fields).map(lambda values: _build(descriptor, values))


def mutated_message(template: Message, depth: int = 0) -> st.SearchStrategy[Message]:
    """``template`` with each field kept (3 times in 4), cleared, replaced by a hostile value,
    or (for a set message field) mutated in turn, so most mutants differ from a valid request
    in one or two places and get past the first checks."""
    descriptor = template.DESCRIPTOR
    fields = {}
    for field in descriptor.fields:
        options = [st.just(KEEP), st.just(KEEP), st.just(KEEP), st.just(KEEP), st.just(KEEP), st.just(KEEP),
                   hostile_value(field, depth), st.none()]
        if field.type == F.TYPE_MESSAGE and depth < 3:
            value = getattr(template, field.name)
            if field.is_repeated and len(value):
                first = value[0]
                options.append(st.lists(mutated_message(first, depth + 1), min_size=1, max_size=3))
                options.append(_copies(st.just(first), _MESSAGE_REPEAT_COUNTS))
            elif not field.is_repeated and template.HasField(field.name):
                options += [mutated_message(value, depth + 1)] * 2
        fields[field.name] = st.one_of(options)
    return st.fixed_dictionaries(fields).map(lambda values: _build(descriptor, values, template))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def invalid_utf8(descriptor: Descriptor) -> bytes | None:
    """A length-delimited record putting invalid UTF-8 into the message's first string field
    (proto3 requires valid UTF-8 there; parsers must refuse it)."""
    for field in descriptor.fields:
        if field.type == F.TYPE_STRING:
            body = b"\xff\xfe\xc3("
            return _varint(field.number << 3 | 2) + _varint(len(body)) + body
    return None


def wire_payloads(message: st.SearchStrategy[Message], descriptor: Descriptor) -> st.SearchStrategy[tuple[str, bytes]]:
    """(how it was made, bytes to send): mostly the message serialized as is; sometimes
    truncated, followed by garbage or an unknown field, replaced by random bytes, or carrying
    invalid UTF-8 in a string field."""
    serialized = message.map(lambda m: m.SerializeToString())
    bad_utf8 = invalid_utf8(descriptor)
    damaged = [
        serialized.flatmap(lambda b: st.integers(0, max(0, len(b) - 1)).map(lambda n, b=b: ("truncated", b[:n]))),
        st.tuples(serialized, st.binary(min_size=1, max_size=16)).map(lambda t: ("garbage_tail", t[0] + t[1])),
        serialized.map(lambda b: ("unknown_field", b + _varint(1000 << 3 | 0) + _varint(1))),
        st.binary(max_size=64).map(lambda b: ("random_bytes", b)),
    ]
    if bad_utf8 is not None:
        damaged.append(serialized.map(lambda b: ("invalid_utf8", b + bad_utf8)))
    plain = serialized.map(lambda b: ("message", b))
    return st.one_of(plain, plain, plain, plain, plain, plain, st.one_of(damaged))
