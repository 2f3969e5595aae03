"""The launcher's terminal echo: each ServerApp log record once."""

from __future__ import annotations

from simulations.launcher import EchoDeduplicator


def test_echo_drops_the_timestamped_copy_of_a_console_line_and_keeps_everything_else() -> None:
    # Prepare: what `flwr run --stream` printed in a demo run (console line, then its timestamped copy)
    lines = [
        "\x1b[92mINFO \x1b[0m:      [ROUND 1/3]\n",
        "12/01/2026 08:14:19:INFO:[ROUND 1/3]\n",
        "\x1b[92mINFO \x1b[0m:      configure_train: Sampled 3 nodes (out of 3)\n",
        "12/01/2026 08:14:19:INFO:configure_train: Sampled 3 nodes (out of 3)\n",
        "12/01/2026 08:14:23:DEBUG:Constructed ActorPool with: 2 actors\n",  # no console twin: kept
        "\x1b[36m(ClientAppActor pid=1)\x1b[0m site-0: round 1\n",
        "12/01/2026 08:14:25:INFO:[ROUND 1/3]\n",  # same text but not right after its console line: kept
        "\x1b[93mWARNING \x1b[0m:   node 7 failed\n",
        "12/01/2026 08:14:26:WARNING:node 7 failed\n",
    ]
    dedup = EchoDeduplicator()
    # Execute
    kept = [line for line in lines if dedup.keep(line)]
    # Assert
    assert kept == [lines[0], lines[2], lines[4], lines[5], lines[6], lines[7]]
