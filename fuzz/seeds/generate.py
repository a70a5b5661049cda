#!/usr/bin/env python3
"""Regenerates the fixture-derived seed inputs of the fuzz targets from tests/fixtures/.

Run from anywhere: python3 fuzz/seeds/generate.py. The input layouts are described in
fuzz/seeds/README.md and at the top of each target. The seeds of `input_sequence` are not
generated here: its input is decoded by `arbitrary`, so they are inputs kept from fuzzing runs
(see the README).
"""

import hashlib
import json
import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures"
SEEDS = ROOT / "fuzz" / "seeds"


def fixture(name):
    return json.loads((FIXTURES / name).read_text())


def raw(name):
    return (FIXTURES / name).read_bytes()


def dump(value):
    return json.dumps(value, separators=(",", ":")).encode()


def write(target, name, data):
    d = SEEDS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data)


# ---- sync_response: flags, status selector (LE), header count, headers, body ----------------

def status_selector(code):
    return 0 if code == 200 else ((code - 100) << 1) | 1


def sync_input(incremental, code, body, headers=()):
    out = bytes([1 if incremental else 0]) + struct.pack("<H", status_selector(code))
    out += bytes([len(headers)])
    names = {"retry-after": 0, "content-type": 1, "content-length": 2}
    for name, value in headers:
        out += bytes([names[name], len(value)]) + value.encode()
    return out + body


gap = fixture("synapse-gap-sync.json")
gap_response = dump(gap["response"])
incremental = raw("synapse-incremental.json")


def trimmed(value, keep=2):
    """The fixture with every list cut to `keep` items and every map to `keep` entries (the
    initial sync is large, and libFuzzer's -max_len defaults to the largest seed)."""
    if isinstance(value, list):
        return [trimmed(v, keep) for v in value[:keep]]
    if isinstance(value, dict):
        items = list(value.items())
        if all(k.startswith(("!", "@", "$")) for k, _ in items):
            items = items[:keep]
        return {k: trimmed(v, keep) for k, v in items}
    return value


sync_seeds = {
    "initial": sync_input(False, 200, dump(trimmed(fixture("synapse-initial.json")))),
    "incremental": sync_input(True, 200, incremental),
    "leave": sync_input(True, 200, raw("synapse-leave.json")),
    "gap_sync_incremental": sync_input(True, 200, gap_response),
    "gap_sync_initial": sync_input(False, 200, gap_response),
    "idle": sync_input(True, 200, b'{"next_batch":"s_first"}'),
    "empty_object": sync_input(False, 200, b"{}"),
    "empty_body": sync_input(True, 200, b""),
    "truncated": sync_input(True, 200, incremental[: len(incremental) // 2]),
    "no_content_204": sync_input(True, 204, b'{"next_batch":"s2"}'),
    "redirect_302": sync_input(False, 302, b""),
    "e400_invalid_since": sync_input(True, 400, raw("synapse-400-invalid-since.json")),
    "e401_unknown_token": sync_input(False, 401, raw("synapse-401-unknown-token.json")),
    "e403": sync_input(True, 403, b'{"errcode":"M_FORBIDDEN","error":"no"}'),
    "e429_body": sync_input(False, 429, raw("synapse-429-limit-exceeded.json")),
    "e429_retry_after": sync_input(
        True, 429, raw("synapse-429-limit-exceeded.json"), [("retry-after", "7")]
    ),
    "e502_html": sync_input(
        True, 502, b"<html>bad gateway</html>", [("content-type", "text/html")]
    ),
    "e503_empty": sync_input(False, 503, b""),
}
for name, data in sync_seeds.items():
    write("sync_response", name, data)

# ---- normalize_event: section byte, then the event's JSON ------------------------------------

TIMELINE, STATE, EPHEMERAL, ROOM_DATA, GLOBAL_DATA, PRESENCE, TO_DEVICE, INVITE, KNOCK = range(9)
events = []


per_kind = {}


def add(section, evs):
    # At most two events per section and type: the fixtures repeat a few shapes many times.
    for e in evs or []:
        key = (section, e.get("type"), "state_key" in e)
        if per_kind.setdefault(key, 0) < 2:
            per_kind[key] += 1
            events.append(bytes([section]) + dump(e))


for name in ["synapse-initial.json", "synapse-incremental.json", "synapse-leave.json"]:
    r = fixture(name)
    add(TO_DEVICE, r.get("to_device", {}).get("events"))
    add(GLOBAL_DATA, r.get("account_data", {}).get("events"))
    add(PRESENCE, r.get("presence", {}).get("events"))
    rooms = r.get("rooms", {})
    for kind in ("join", "leave"):
        for room in rooms.get(kind, {}).values():
            add(STATE, room.get("state", {}).get("events"))
            add(TIMELINE, room.get("timeline", {}).get("events"))
            add(EPHEMERAL, room.get("ephemeral", {}).get("events"))
            add(ROOM_DATA, room.get("account_data", {}).get("events"))
    for room in rooms.get("invite", {}).values():
        add(INVITE, room.get("invite_state", {}).get("events"))
    for room in rooms.get("knock", {}).values():
        add(KNOCK, room.get("knock_state", {}).get("events"))
for room in gap["response"]["rooms"]["join"].values():
    add(TIMELINE, room["timeline"]["events"])
for page in fixture("synapse-gap-messages.json")["pages"]:
    add(TIMELINE, page["response"]["chunk"])

handmade = [
    (TIMELINE, '{"type":"m.room.encrypted","event_id":"$x:example.org","sender":"@u:example.org",'
               '"content":{"algorithm":"m.megolm.v1.aes-sha2","ciphertext":"abc","body":"leak"}}'),
    (TIMELINE, '{"type":"m.room.redaction","redacts":"$t:example.org","content":{}}'),
    (TIMELINE, '{"type":"m.room.redaction","content":{"redacts":"$t:example.org"}}'),
    (TIMELINE, '{"type":"m.reaction","content":{"m.relates_to":{"rel_type":"m.annotation",'
               '"event_id":"$t:example.org","key":"\\ud83d\\udc4d"}}}'),
    (TIMELINE, '{"type":"m.room.message","content":{"body":"say \\"hi\\"","m.relates_to":'
               '{"m.in_reply_to":{"event_id":"$b:x"}}},"origin_server_ts":9007199254740991}'),
    (TIMELINE, '{"type":"m.room.message","event_id":7,"sender":["@u:x"],"origin_server_ts":-1,'
               '"content":{"body":{"nested":true},"m.relates_to":"nope"}}'),
    (STATE, '{"type":"m.room.topic","state_key":"","content":5}'),
    (TIMELINE, '[1,2,3]'),
    (EPHEMERAL, '{"type":"m.typing","content":{"user_ids":["@u:x"]}}'),
    (TIMELINE, '{"type":"m.room.message","type":"m.room.encrypted","content":{"body":"a"},"content":{"body":"b"}}'),
]
for section, text in handmade:
    events.append(bytes([section]) + text.encode())

for data in dict.fromkeys(events):
    write("normalize_event", hashlib.sha1(data).hexdigest()[:16], data)

# ---- gap_messages: rounds separated by ff ff, each a control byte and a body -----------------

SEP = b"\xff\xff"
pages = [p["response"] for p in fixture("synapse-gap-messages.json")["pages"]]
timeline = list(gap["response"]["rooms"]["join"].values())[0]["timeline"]["events"]


def rounds(*rs):
    return SEP.join(bytes([c]) + body for c, body in rs)


overlap = dict(pages[0])
overlap["chunk"] = list(reversed(timeline)) + pages[0]["chunk"]
gap_seeds = {
    "all_pages": rounds(*[(0, dump(p)) for p in pages]),
    "first_page": rounds((0, dump(pages[0]))),
    "errors_then_pages": rounds(
        (9, b""),
        (8 | (2 << 4), raw("synapse-429-limit-exceeded.json")),
        (14, b""),
        (15, b""),
        (10, b"<html>bad gateway</html>"),
        *[(0, dump(p)) for p in pages],
    ),
    "forbidden": rounds((0, dump(pages[0])), (12, b'{"errcode":"M_FORBIDDEN","error":"no"}')),
    "overlapping_timeline": rounds((0, dump(overlap)), *[(0, dump(p)) for p in pages[1:]]),
    "garbage_then_pages": rounds((0, b"not json"), (0, b"{}"), *[(0, dump(p)) for p in pages]),
    "page_without_end": rounds((0, dump({"chunk": pages[0]["chunk"][:1], "start": "x"}))),
}
for name, data in gap_seeds.items():
    write("gap_messages", name, data)

print("seeds written:", {t: len(list((SEEDS / t).iterdir())) for t in
                         ("sync_response", "normalize_event", "gap_messages")})
