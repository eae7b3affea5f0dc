"""``snatgw run``: set the host up, serve packets, put everything back."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

from gateway.adapters import iptables, system
from gateway.adapters.loop import PacketLoop
from gateway.config import GatewayConfig
from gateway.core.pool import ip_str
from gateway.core.table import TranslationTable

#: Where state that must survive a crash is kept (one file per network namespace).
STATE_DIR = Path("/run/snatgw")


def _describe(cfg: GatewayConfig, table: TranslationTable) -> dict[str, Any]:
    frontends = {a.name: a for a in table.addresses.values() if a.name}
    pools = {}
    for pool in cfg.model.pools:
        fe = table.pool_frontend.get(pool.name, "")
        addr = frontends.get(fe)
        pools[pool.name] = {
            "frontend": fe,
            "members": len(pool.members),
            "block_size": addr.block_size if addr is not None else 0,
        }
    return {
        "config": cfg.path,
        "queue": cfg.queue,
        "tcp_queue": cfg.queue + 1 if cfg.queue_client == "netlink" else None,
        "queue_client": cfg.queue_client,
        "inside": cfg.inside,
        "outside": cfg.outside,
        "public_ips": [ip_str(a) for a in cfg.model.public_addresses()],
        "pools": pools,
        "idle_timeout": cfg.model.timeouts.idle,
    }


def run(cfg: GatewayConfig, log: Any) -> int:
    """Run the gateway in this network namespace until SIGINT or SIGTERM."""
    for name in (cfg.inside, cfg.outside):
        system.interface_index(name)
    table = TranslationTable(cfg.model, time.monotonic())
    publics = list(cfg.model.public_addresses())

    def flush_events() -> None:
        for ev in table.events:
            log.warning(ev.name, **ev.fields)
        table.events.clear()

    tcp_queue = cfg.queue + 1 if cfg.queue_client == "netlink" else None
    loop = PacketLoop(
        table, cfg.queue, client=cfg.queue_client, max_len=cfg.queue_maxlen, on_events=flush_events
    )
    signal.signal(signal.SIGTERM, loop.stop)
    signal.signal(signal.SIGINT, loop.stop)
    try:
        system.add_addresses(cfg.outside, publics)
        iptables.install(cfg.inside, cfg.outside, cfg.queue, publics, tcp_queue)
        system.enable_forwarding(STATE_DIR)
        log.info("gateway_ready", **_describe(cfg, table))
        loop.run()
    finally:
        system.restore_forwarding(STATE_DIR)
        iptables.remove()
        system.remove_addresses(cfg.outside, publics)
        loop.close()
        flush_events()
    log.info("gateway_stopped", counters=table.counters_dict(), flows=table.flow_count())
    return 0
