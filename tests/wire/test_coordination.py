"""The JSON coordination codec: field forms, round trips, and garbage."""

from __future__ import annotations

import ipaddress
import json
from datetime import UTC, datetime
from uuid import UUID

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from coderstack.wire.coordination import (
    CODER_SERVICE_PREFIX,
    MAX_ENDPOINTS,
    MAX_REQUEST_BYTES,
    CoordinateRequest,
    CoordinateResponse,
    CoordinationError,
    Node,
    PeerUpdate,
    PeerUpdateKind,
    address_from_uuid,
    disco_key_bytes,
    format_time,
    node_key_bytes,
    node_key_text,
    parse_request,
    parse_response,
    parse_time,
)

KEY_HEX = "0123456789abcdef" * 4
AGENT = UUID("aaaaaaaa-aaaa-aaaa-aaaa-123456789abc")


def node_json(**changes) -> dict:
    obj = {
        "id": 42,
        "as_of": "2026-11-22T17:09:17.5Z",
        "key": "nodekey:" + KEY_HEX,
        "disco": "discokey:" + KEY_HEX[::-1],
        "preferred_derp": 999,
        "derp_latency": {"999-v4": 0.0123, "999-v6": 0.02},
        "derp_forced_websockets": {"999": "DERP upgrade failed"},
        "addresses": ["fd7a:115c:a1e0:aaaa:aaaa:1234:5678:9abc/128"],
        "allowed_ips": ["fd7a:115c:a1e0:aaaa:aaaa:1234:5678:9abc/128"],
        "endpoints": ["192.0.2.1:41641", "[2001:db8::1]:41641"],
    }
    obj.update(changes)
    return obj


def request_text(**node_changes) -> str:
    return json.dumps({"update_self": {"node": node_json(**node_changes)}})


class FieldTests(SynchronousTestCase):
    def test_address_from_uuid_matches_coder_example(self) -> None:
        self.assertEqual(
            address_from_uuid(AGENT),
            ipaddress.IPv6Address("fd7a:115c:a1e0:aaaa:aaaa:1234:5678:9abc"),
        )
        self.assertEqual(
            address_from_uuid(AGENT, CODER_SERVICE_PREFIX),
            ipaddress.IPv6Address("fd60:627a:a42b:aaaa:aaaa:1234:5678:9abc"),
        )

    def test_key_text_forms(self) -> None:
        raw = bytes.fromhex(KEY_HEX)
        self.assertEqual(node_key_text(raw), "nodekey:" + KEY_HEX)
        self.assertEqual(node_key_text(raw, "discokey"), "discokey:" + KEY_HEX)
        self.assertEqual(node_key_bytes("nodekey:" + KEY_HEX), raw)
        self.assertEqual(node_key_bytes("discokey:" + KEY_HEX.upper()), raw)
        self.assertEqual(disco_key_bytes("discokey:" + KEY_HEX), raw)
        for bad in ("nodekey:" + KEY_HEX[:-2], "key:" + KEY_HEX, KEY_HEX, "nodekey:" + "zz" * 32):
            self.assertRaises(CoordinationError, node_key_bytes, bad)
        self.assertRaises(CoordinationError, node_key_bytes, "nodekey:" + KEY_HEX, "discokey")
        self.assertRaises(CoordinationError, node_key_text, b"short")

    def test_times(self) -> None:
        self.assertEqual(
            parse_time("2026-11-22T17:09:17.123456789+01:00"),
            datetime(2026, 11, 22, 16, 9, 17, 123456, tzinfo=UTC),
        )
        self.assertEqual(parse_time("0001-01-01T00:00:00Z"), datetime(1, 1, 1, tzinfo=UTC))
        self.assertEqual(format_time(datetime(1, 1, 1, tzinfo=UTC)), "0001-01-01T00:00:00Z")
        self.assertEqual(
            format_time(datetime(2026, 1, 2, 3, 4, 5, 500000, tzinfo=UTC)), "2026-01-02T03:04:05.5Z"
        )
        for bad in ("2026-11-22", "2026-11-22T17:09:17", "2026-13-01T00:00:00Z", "yesterday"):
            self.assertRaises(CoordinationError, parse_time, bad)

    def test_node_from_json(self) -> None:
        node = Node.from_json(node_json())
        self.assertEqual(node.id, 42)
        self.assertEqual(node.as_of, datetime(2026, 11, 22, 17, 9, 17, 500000, tzinfo=UTC))
        self.assertEqual(node.key, bytes.fromhex(KEY_HEX))
        self.assertEqual(node.derp_forced_websockets, {999: "DERP upgrade failed"})
        self.assertEqual(
            node.addresses, (ipaddress.IPv6Network(f"{address_from_uuid(AGENT)}/128"),)
        )
        self.assertEqual(node.to_json(), node_json())

    def test_node_optional_fields_default(self) -> None:
        obj = {k: node_json()[k] for k in ("id", "as_of", "key", "disco")}
        obj["endpoints"] = None
        node = Node.from_json(obj)
        self.assertEqual((node.preferred_derp, node.endpoints, node.addresses), (0, (), ()))

    def test_node_constructor_normalizes(self) -> None:
        node = Node(
            id=1,
            as_of="2026-11-22T18:00:00+01:00",
            key="nodekey:" + KEY_HEX,
            disco=bytes(32),
            addresses=[address_from_uuid(AGENT)],
            endpoints=["[2001:0db8::0001]:1"],
        )
        self.assertEqual(node.as_of, datetime(2026, 11, 22, 17, tzinfo=UTC))
        self.assertEqual(node.endpoints, ("[2001:db8::1]:1",))
        self.assertEqual(node.addresses[0].prefixlen, 128)
        self.assertRaises(CoordinationError, Node, 1, datetime(2026, 1, 1), bytes(32), bytes(32))


class RejectTests(SynchronousTestCase):
    def assertRejected(self, data, fragment: str) -> None:
        with self.assertRaises(CoordinationError) as caught:
            parse_request(data)
        self.assertIn(fragment, str(caught.exception))

    def test_bad_json(self) -> None:
        self.assertRejected("{", "not valid JSON")
        self.assertRejected(b"\xff\xfe", "not UTF-8")
        self.assertRejected('{"update_self": NaN}', "NaN")
        self.assertRejected("[]", "must be a JSON object")
        self.assertRejected("[" * 30000 + "]" * 30000, "nested too deeply")
        self.assertRejected("9" * 5000, "not valid JSON")

    def test_wrong_types(self) -> None:
        self.assertRejected('{"disconnect": true}', "disconnect must be a JSON object")
        self.assertRejected('{"ready_for_handshake": {}}', "must be a JSON array")
        self.assertRejected(request_text(id="42"), "node id must be an integer")
        self.assertRejected(request_text(id=True), "node id must be an integer")
        self.assertRejected(request_text(id=2**63), "out of range")
        self.assertRejected(request_text(preferred_derp=1.5), "preferred_derp must be an integer")
        self.assertRejected(request_text(derp_latency={"999-v4": "fast"}), "must be a number")
        self.assertRejected(request_text(derp_latency={"999-v4": -1}), ">= 0")
        self.assertRejected(request_text(derp_forced_websockets={"x": "y"}), "region number")
        self.assertRejected(request_text(endpoints="1.2.3.4:5"), "must be a JSON array")
        self.assertRejected('{"update_self": {}}', "has no node")
        self.assertRejected(request_text(endpoints=0), "must be a JSON array")
        self.assertRejected(request_text(derp_latency=[]), "must be a JSON object")
        self.assertRejected(request_text(preferred_derp=False), "must be an integer")
        node = node_json()
        del node["key"]
        self.assertRejected(json.dumps({"update_self": {"node": node}}), "node has no key")

    def test_bad_uuid(self) -> None:
        self.assertRejected('{"add_tunnel": {"id": "aaaa"}}', "is not a UUID")
        self.assertRejected('{"add_tunnel": {"id": 5}}', "is not a UUID")
        self.assertRejected('{"add_tunnel": {}}', "is not a UUID")
        self.assertRejected(
            '{"remove_tunnel": {"id": "{aaaaaaaa-aaaa-aaaa-aaaa-123456789abc}"}}', "is not a UUID"
        )
        self.assertRejected('{"ready_for_handshake": [{"id": "x"}]}', "is not a UUID")

    def test_bad_keys(self) -> None:
        self.assertRejected(request_text(key="discokey:" + KEY_HEX), "nodekey:")
        self.assertRejected(request_text(disco="nodekey:" + KEY_HEX), "discokey:")
        self.assertRejected(request_text(key="nodekey:abc"), "64 hex digits")

    def test_bad_addresses(self) -> None:
        self.assertRejected(request_text(addresses=["fd7a:115c:a1e0::/48"]), "is not a /128")
        self.assertRejected(request_text(addresses=["fd7a:115c:a1e0::1"]), "no prefix length")
        self.assertRejected(request_text(allowed_ips=["192.0.2.1/32"]), "not an IPv6 prefix")
        self.assertRejected(request_text(addresses=[1]), "not an IPv6 /128")

    def test_bad_endpoints(self) -> None:
        self.assertRejected(request_text(endpoints=["192.0.2.1"]), "is not ip:port")
        self.assertRejected(request_text(endpoints=["192.0.2.1:0"]), "port out of range")
        self.assertRejected(request_text(endpoints=["2001:db8::1:5"]), "bad IP address")
        self.assertRejected(request_text(endpoints=["host.example:5"]), "bad IP address")
        many = [f"192.0.2.1:{1000 + i}" for i in range(MAX_ENDPOINTS + 1)]
        self.assertRejected(request_text(endpoints=many), "at most 64")
        parse_request(request_text(endpoints=many[:MAX_ENDPOINTS]))

    def test_oversized(self) -> None:
        text = json.dumps({"padding": "x" * MAX_REQUEST_BYTES})
        self.assertRejected(text, "larger than")
        self.assertRejected(text.encode(), "at most")
        # Multi-byte characters count as bytes, not characters.
        text = json.dumps({"padding": "\u00e9" * (MAX_REQUEST_BYTES // 2)}, ensure_ascii=False)
        self.assertLess(len(text), MAX_REQUEST_BYTES)
        self.assertRejected(text, "larger than")

    def test_responses(self) -> None:
        for bad in (
            '{"peer_updates": [{"id": "' + str(AGENT) + '", "kind": "BOGUS"}]}',
            '{"peer_updates": [{"id": "' + str(AGENT) + '", "kind": "NODE"}]}',
            '{"peer_updates": [{"id": "' + str(AGENT) + '", "kind": "LOST", "reason": 0}]}',
            '{"peer_updates": [{"id": "' + str(AGENT) + '", "kind": "LOST", "node": 0}]}',
            '{"peer_updates": {}}',
            '{"error": 5}',
            '{"error": 0}',
            '{"peer_updates": 0}',
        ):
            self.assertRaises(CoordinationError, parse_response, bad)


class RequestResponseTests(SynchronousTestCase):
    def test_request_json(self) -> None:
        text = json.dumps(
            {
                "update_self": {"node": node_json()},
                "add_tunnel": {"id": str(AGENT)},
                "remove_tunnel": None,
                "ready_for_handshake": [{"id": str(AGENT)}],
                "disconnect": {},
                "future_field": [1, 2, 3],
            }
        )
        request = parse_request(text)
        self.assertEqual(request.update_self, Node.from_json(node_json()))
        self.assertEqual(request.add_tunnel, AGENT)
        self.assertIsNone(request.remove_tunnel)
        self.assertEqual(request.ready_for_handshake, (AGENT,))
        self.assertTrue(request.disconnect)
        self.assertEqual(parse_request(request.to_text()), request)
        self.assertEqual(parse_request("{}"), CoordinateRequest())
        self.assertEqual(CoordinateRequest().to_json(), {})

    def test_response_json(self) -> None:
        node = Node.from_json(node_json())
        response = CoordinateResponse(
            (
                PeerUpdate(AGENT, PeerUpdateKind.NODE, "add tunnel", node),
                PeerUpdate(AGENT, "LOST", "lost", node),
                PeerUpdate(AGENT, "DISCONNECTED", "graceful disconnect"),
                PeerUpdate(AGENT, "READY_FOR_HANDSHAKE", "ready for handshake"),
            )
        )
        obj = json.loads(response.to_text())
        self.assertEqual(
            [u["kind"] for u in obj["peer_updates"]],
            ["NODE", "LOST", "DISCONNECTED", "READY_FOR_HANDSHAKE"],
        )
        self.assertEqual(obj["peer_updates"][0]["node"], node_json())
        self.assertNotIn("node", obj["peer_updates"][2])
        self.assertNotIn("error", obj)
        self.assertEqual(parse_response(response.to_text()), response)
        self.assertEqual(
            json.loads(CoordinateResponse(error="nope").to_text()),
            {"peer_updates": [], "error": "nope"},
        )
        self.assertIs(response.to_text(), response.to_text())  # cached for fan-out
        self.assertRaises(CoordinationError, PeerUpdate, AGENT, "NODE", "x")
        self.assertRaises(CoordinationError, PeerUpdate, AGENT, "WHAT")

    def test_lone_surrogate_stays_sendable(self) -> None:
        request = parse_request(request_text(derp_latency={"\ud800": 1}))
        response = CoordinateResponse((PeerUpdate(AGENT, "NODE", "", request.update_self),))
        response.to_text().encode("utf-8")  # would raise if the surrogate were emitted raw
        self.assertEqual(parse_response(response.to_text()), response)


# --- hypothesis ---------------------------------------------------------------------------------

uuids = st.uuids()
keys = st.binary(min_size=32, max_size=32)
small_text = st.text(max_size=20)
prefixes = st.builds(
    lambda b: ipaddress.IPv6Network((ipaddress.IPv6Address(b), 128)),
    st.binary(min_size=16, max_size=16),
)
endpoints = st.one_of(
    st.builds(
        lambda a, p: f"{ipaddress.IPv4Address(a)}:{p}",
        st.integers(0, 2**32 - 1),
        st.integers(1, 65535),
    ),
    st.builds(
        lambda a, p: f"[{ipaddress.IPv6Address(a)}]:{p}",
        st.integers(0, 2**128 - 1),
        st.integers(1, 65535),
    ),
)
times = st.datetimes(
    min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC)
)
nodes = st.builds(
    Node,
    id=st.integers(-(2**63), 2**63 - 1),
    as_of=times,
    key=keys,
    disco=keys,
    preferred_derp=st.integers(-(2**31), 2**31 - 1),
    derp_latency=st.dictionaries(small_text, st.floats(0, 1e6, allow_nan=False), max_size=4),
    derp_forced_websockets=st.dictionaries(
        st.integers(-(2**31), 2**31 - 1), small_text, max_size=3
    ),
    addresses=st.lists(prefixes, max_size=3),
    allowed_ips=st.lists(prefixes, max_size=3),
    endpoints=st.lists(endpoints, max_size=5),
)
requests = st.builds(
    CoordinateRequest,
    update_self=st.none() | nodes,
    add_tunnel=st.none() | uuids,
    remove_tunnel=st.none() | uuids,
    ready_for_handshake=st.lists(uuids, max_size=4),
    disconnect=st.booleans(),
)
peer_updates = st.one_of(
    st.builds(PeerUpdate, uuids, st.just(PeerUpdateKind.NODE), small_text, nodes),
    st.builds(
        PeerUpdate,
        uuids,
        st.sampled_from(["LOST", "DISCONNECTED", "READY_FOR_HANDSHAKE"]),
        small_text,
        st.none() | nodes,
    ),
)
responses = st.builds(CoordinateResponse, st.lists(peer_updates, max_size=4), small_text)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=20,
)
# Garbage that is shaped like a request, so the parser gets past the first checks.
request_keys = st.sampled_from(
    [
        "update_self",
        "add_tunnel",
        "remove_tunnel",
        "disconnect",
        "ready_for_handshake",
        "node",
        "id",
    ]
)
node_keys = st.sampled_from(list(node_json()))
shaped = st.recursive(
    json_values,
    lambda inner: (
        st.dictionaries(request_keys | node_keys, inner, max_size=6) | st.lists(inner, max_size=3)
    ),
    max_leaves=30,
)


def _mutated_node(data) -> dict:
    obj = node_json()
    key = data.draw(node_keys)
    obj[key] = data.draw(json_values)
    return {"update_self": {"node": obj}}


class HypothesisTests(SynchronousTestCase):
    @settings(deadline=None)
    @given(requests)
    def test_request_round_trip(self, request: CoordinateRequest) -> None:
        self.assertEqual(parse_request(request.to_text()), request)
        self.assertEqual(parse_request(request.to_text().encode()), request)

    @settings(deadline=None)
    @given(responses)
    def test_response_round_trip(self, response: CoordinateResponse) -> None:
        self.assertEqual(parse_response(response.to_text()), response)

    @settings(deadline=None)
    @given(nodes)
    def test_node_round_trip(self, node: Node) -> None:
        self.assertEqual(Node.from_json(json.loads(json.dumps(node.to_json()))), node)

    @settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.one_of(st.binary(max_size=200), st.text(max_size=200)))
    def test_garbage_bytes(self, data) -> None:
        self._only_coordination_errors(data)

    @settings(deadline=None)
    @given(shaped)
    def test_garbage_json(self, value) -> None:
        self._only_coordination_errors(json.dumps(value))

    @settings(deadline=None)
    @given(st.data())
    def test_mutated_node(self, data) -> None:
        self._only_coordination_errors(json.dumps(_mutated_node(data)))

    @settings(deadline=None)
    @given(
        st.sampled_from(["add_tunnel", "remove_tunnel", "disconnect", "update_self"]), json_values
    )
    def test_mutated_parts(self, key: str, value) -> None:
        self._only_coordination_errors(json.dumps({key: value}))
        self._only_coordination_errors(json.dumps({key: {"id": value, "node": value}}))

    def _only_coordination_errors(self, data) -> None:
        for parse in (parse_request, parse_response):
            try:
                parse(data)
            except CoordinationError:
                pass


class ConstructorTests(SynchronousTestCase):
    def test_uuid_text_accepted(self) -> None:
        request = CoordinateRequest(add_tunnel=str(AGENT), ready_for_handshake=[str(AGENT)])
        self.assertEqual(request, CoordinateRequest(add_tunnel=AGENT, ready_for_handshake=(AGENT,)))
        self.assertEqual(PeerUpdate(str(AGENT), "LOST").id, AGENT)
        self.assertRaises(CoordinationError, CoordinateRequest, add_tunnel="nope")
        self.assertRaises(CoordinationError, CoordinateRequest, update_self={"id": 1})
