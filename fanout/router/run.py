"""``fanout router``: run a router until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal

from .service import router_from_config

log = logging.getLogger("fanout.router")


async def serve(config, *, router_id: str = "") -> None:
    router = router_from_config(config, router_id=router_id)
    await router.start()
    print(f"fanout router {router.router_id} on {config.nats} "
          f"(partitions {sorted(router.leases.owned)})", flush=True)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(
            sig, lambda: stop.done() or stop.set_result(None))
    await stop
    # Leases are given back on the way out: another router takes the rooms now.
    await router.close()
    log.info("router %s stopped", router.router_id)


def run(config, *, router_id: str = "") -> int:
    logging.basicConfig(level=config.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if config.loop == "uvloop":
        import uvloop
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    asyncio.run(serve(config, router_id=router_id))
    return 0
