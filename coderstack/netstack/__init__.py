"""A userspace IPv6 TCP/IP stack for the tunnel (the role gVisor's netstack plays in Tailscale).

Sans-IO core (no reactor, no sockets; whole IPv6 packets and the current time in, packets out):

- ``stack.Stack(addresses, emit)``: ``receive(packet, now)`` / ``receive_batch(packets, now)``,
  ``next_deadline()`` + ``tick(now)``, ``listen``, ``connect``, ``udp_bind``, ``udp_send``,
  ``udp_catch_all`` (datagrams to unbound ports), ``ping``; ``stats``.
- ``tcp.Connection``: the RFC 9293 state machine (``write``/``flush``/``close``/
  ``shutdown_write``/``abort``/``pause_reading``/``resume_reading``), in the states of
  ``tcpstate.State``, seeing its stack as a ``tcp.ConnectionHost``; ``tcpconfig.TCPConfig``
  tunables; ``listener.Listener`` a passive open.
- Codecs and parts: ``ipv6``, ``icmpv6``, ``udp``, ``tcpsegment``, ``checksum``, ``isn``,
  ``sendbuffer`` (unacknowledged data), ``sack`` (sender scoreboard), ``rto`` (RTT estimation,
  retransmission timeout), ``reassembly`` (receiver queue), ``congestion`` (CUBIC, NewReno).

Twisted adapters: ``endpoints.Netstack(address, send_packet, reactor)`` with
``packet_received``/``packets_received`` and ``NetstackServerEndpoint`` /
``NetstackClientEndpoint`` / ``listen_udp`` / ``listen_udp_any`` / ``ping``; ``tun`` wires a Linux TUN device to it.
"""
