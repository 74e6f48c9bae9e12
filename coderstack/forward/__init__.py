"""Port forwarding between this machine and a workspace, as ``coderstack port-forward`` does it.

:mod:`~coderstack.forward.spec` is the spec grammar, :mod:`~coderstack.forward.forwarder` the
local listeners, :mod:`~coderstack.forward.stream` and :mod:`~coderstack.forward.datagram` what
each accepted connection or datagram source becomes, and :mod:`~coderstack.forward.flows` the
table of per-source UDP flows that the agent's side of UDP forwarding keeps too.
"""
