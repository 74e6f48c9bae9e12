"""The DERP relay (server side and client side) and its integration points.

Modules: ``relay`` (sans-IO relay core), ``policy`` (closed-relay interface), ``server``
(twisted.web resources, metrics, key file), ``client`` (dialing a region, reconnecting, with
websocket fallback) over ``session`` (sans-IO client frame logic) and the transports
``upgrade`` and ``wsclient`` (``transport``: what they share), ``mesh`` (replicas),
``mapconfig`` (start-up map loading), ``mapstream`` (``/api/v2/derp-map``), ``twistedtypes``
(typed views of the reactor and transports). The frame codec is ``coderstack.wire.derp``; the map model and builder
are ``coderstack.derpmap``.

Wiring in the server (sketch)::

    key = load_or_create_private_key(os.path.join(data_dir, "derp.key"))
    relay = make_relay(key, policy, reactor, mesh_key=mesh_key)      # policy: IRelayPolicy
    for path, res in make_derp_resources(relay, policy).items():     # /derp (branch), ...
        mount(path, res)
    derp_map = await load_server_map(access_url, ...)                # DERPMapError -> exit
    maps = MapPublisher(derp_map)
    mount("/api/v2/derp-map", derp_map_stream_resource(maps.get, maps.subscribe))
    metrics_text(relay)                                               # into /metrics

Nothing here is imported by this package's ``__init__`` so that the sans-IO core stays cheap
to import.
"""
