"""Loading the server's DERP map at start-up from its options (the I/O half of derpmap.py)."""

from __future__ import annotations

from typing import Any

import treq

from coderstack.derpmap import (
    DERPMap,
    DERPMapError,
    build_server_map,
    check_config_sources,
    load_map_file,
)


async def fetch_map(url: str, *, http: Any = treq, timeout: float = 30.0) -> DERPMap:
    """GET a Tailscale-format DERP map (``--derp-config-url``)."""
    try:
        resp = await http.get(url, timeout=timeout, headers={b"Accept": [b"application/json"]})
        body = await resp.content()
    except Exception as e:
        raise DERPMapError(f"--derp-config-url {url}: cannot fetch: {e}") from None
    if resp.code != 200:
        raise DERPMapError(f"--derp-config-url {url}: HTTP {resp.code}")
    try:
        return DERPMap.loads(body)
    except DERPMapError as e:
        raise DERPMapError(f"--derp-config-url {url}: {e}") from None


async def load_server_map(
    access_url: str,
    *,
    derp_server_enable: bool = True,
    region_id: int = 999,
    region_code: str = "coder",
    region_name: str = "Coder Embedded Relay",
    embedded_stun_port: int | None = None,
    embedded_stun_alt_ports: tuple[int, ...] = (),
    stun_addresses: list[str] | tuple[str, ...] = (),
    config_url: str = "",
    config_path: str = "",
    block_direct: bool = False,
    http: Any = treq,
) -> DERPMap:
    """Everything the server options say about DERP, as one validated map.

    Raises :class:`DERPMapError` with a message fit for the operator.
    """
    check_config_sources(config_url, config_path)
    config_map = None
    source = ""
    if config_url:
        config_map = await fetch_map(config_url, http=http)
        source = f"--derp-config-url {config_url}"
    elif config_path:
        config_map = load_map_file(config_path)
        source = f"--derp-config-path {config_path}"
    return build_server_map(
        access_url, derp_server_enable=derp_server_enable, region_id=region_id,
        region_code=region_code, region_name=region_name, embedded_stun_port=embedded_stun_port,
        embedded_stun_alt_ports=embedded_stun_alt_ports,
        stun_addresses=stun_addresses, config_map=config_map, config_source=source,
        block_direct=block_direct,
    )
