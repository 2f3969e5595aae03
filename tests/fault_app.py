"""Test-only Flower apps: the product's ServerApp and ClientApp with faults injected.

Staged into a test's app bundle by :data:`tests.conftest.FAULT_APP` (never part of the product bundle). The faults
are chosen by environment variables of the test's run:

- ``DIFUSAL_FAULT_AFTER_ROUND=N``: the server process dies right after round N's checkpoint (a kill);
- ``DIFUSAL_FAULT_AFTER_RELEASE=N``: it dies after round N's images are released, before its checkpoint;
- ``DIFUSAL_FAULT_SITE=<name or site-<index>>[,...]``: those sites' handlers raise (the product's guard reports it).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

import client.app as product_client
from client.secure import secure_aggregation_mod
from client.site import resolve_site
from common.core.config import RunConfig
from server.app import serve

AFTER_ROUND, AFTER_RELEASE, SITE = "DIFUSAL_FAULT_AFTER_ROUND", "DIFUSAL_FAULT_AFTER_RELEASE", "DIFUSAL_FAULT_SITE"

server = ServerApp()
client = ClientApp(mods=[secure_aggregation_mod])  # the product's mods (SecAgg+ in secure-aggregation runs)


def _exit_at(variable: str) -> Callable[[int], None]:
    def observe(server_round: int) -> None:
        if os.environ.get(variable) == str(server_round):
            print(f"{variable}={server_round}: exiting (fault injection)", flush=True)
            os._exit(137)

    return observe


@server.main()
def main(grid: Grid, context: Context) -> None:
    serve(grid, context, on_checkpoint=_exit_at(AFTER_ROUND), on_release=_exit_at(AFTER_RELEASE))


def _faulty(handler: Callable[[Message, Context], Message]) -> Callable[[Message, Context], Message]:
    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        if SITE in os.environ:
            spec = resolve_site(context.node_config, RunConfig.from_run_config(context.run_config))
            if {f"site-{spec.index}", str(context.node_config.get("site-name", ""))} & set(os.environ[SITE].split(",")):
                raise RuntimeError(f"fault injected by {SITE}")
        return handler(msg, context)

    return wrapper


# The product's handlers, unwrapped from their guard, made faulty, and guarded again (so a fault is reported as a
# real site failure is).
client.train()(product_client._guarded(_faulty(product_client.train.__wrapped__)))
client.evaluate()(product_client._guarded(_faulty(product_client.evaluate.__wrapped__)))
client.query()(product_client._guarded(_faulty(product_client.query.__wrapped__)))
