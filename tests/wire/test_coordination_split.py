"""``split_response``: any response cut into messages under a bound, losing and reordering nothing."""

from __future__ import annotations

from uuid import UUID

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from coderstack.wire.coordination import (
    MAX_RESPONSE_MESSAGE_BYTES,
    CoordinateResponse,
    PeerUpdate,
    parse_response,
    split_response,
)
from tests.wire.test_coordination import peer_updates, small_text


def size(response: CoordinateResponse) -> int:
    return len(response.to_text().encode())


def one_update_size(update: PeerUpdate) -> int:
    return size(CoordinateResponse((update,)))


class SplitResponseTests(SynchronousTestCase):
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(peer_updates, max_size=40), small_text, st.integers(40, 6000))
    def test_parts_fit_keep_order_and_add_up(self, updates, error, bound) -> None:
        response = CoordinateResponse(tuple(updates), error)
        parts = split_response(response, bound)
        self.assertTrue(parts)
        # The union, in order, is the input: so the order per peer is kept too.
        self.assertEqual([u for p in parts for u in p.peer_updates], list(updates))
        self.assertEqual([p.error for p in parts if p.error], [error] if error else [])
        for part in parts:
            # Only what cannot be cut (one update, the error) may make a part exceed the bound.
            if size(part) > bound:
                self.assertLessEqual(len(part.peer_updates), 1)
            # Every part is a message a peer can read.
            self.assertEqual(parse_response(part.to_text()), part)
        if size(response) <= bound:
            self.assertEqual(parts, [response])

    @given(st.lists(peer_updates, min_size=2, max_size=20))
    def test_parts_are_not_needlessly_small(self, updates) -> None:
        # Greedy: each part but the last could not take the next update.
        bound = 2000
        parts = split_response(CoordinateResponse(tuple(updates)), bound)
        for part, following in zip(parts, parts[1:], strict=False):
            joined = CoordinateResponse(part.peer_updates + following.peer_updates[:1], part.error)
            self.assertGreater(size(joined), bound)

    def test_the_bound_is_well_under_the_websocket_limit(self) -> None:
        self.assertLessEqual(MAX_RESPONSE_MESSAGE_BYTES, 256 * 1024 // 2)

    def test_empty_response_is_one_message(self) -> None:
        empty = CoordinateResponse((), "")
        self.assertEqual(split_response(empty, 10), [empty])

    def test_error_only(self) -> None:
        r = CoordinateResponse((), "refused")
        self.assertEqual(split_response(r, 10), [r])

    def test_order_of_node_then_lost_for_one_peer(self) -> None:
        from tests.coordinator.test_core import make_node

        peer = UUID("aaaaaaaa-aaaa-aaaa-aaaa-123456789abc")
        node = make_node(peer)
        updates = (PeerUpdate(peer, "NODE", "resume", node), PeerUpdate(peer, "LOST", "lost", node))
        parts = split_response(CoordinateResponse(updates), one_update_size(updates[0]) + 5)
        self.assertEqual([str(u.kind) for p in parts for u in p.peer_updates], ["NODE", "LOST"])
        self.assertEqual(len(parts), 2)
