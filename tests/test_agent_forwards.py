"""Reading a QEMU's Service forwards back from ``info usernet`` (what an agent that adopts a
QEMU relies on; the end-to-end restarts are in tests/test_migration_e2e.py)."""

from __future__ import annotations

from vmo.engine.agent.forwards import UserNet, parse_usernet

# QEMU 7.2's answer, as printed on this host, with a connection in flight through a forward
QEMU_7_2 = (
    "Hub -1 (netdev0):\r\n"
    "  Protocol[State]    FD  Source Address  Port   Dest. Address  Port RecvQ SendQ\r\n"
    "  TCP[HOST_FORWARD]   8       127.0.0.1 45001        10.0.2.2  5432     0     0\r\n"
    "  TCP[ESTABLISHED]   15        10.0.2.2  5432       127.0.0.1 51234     0     0\r\n"
    "  UDP[HOST_FORWARD]  13       127.0.0.1 45002        10.0.2.2    53     0     0\r\n"
)


def test_forwards_are_keyed_by_lowercase_proto_and_guest_port() -> None:
    assert parse_usernet(QEMU_7_2) == UserNet("netdev0", {("tcp", 5432): 45001, ("udp", 53): 45002})


def test_connections_in_flight_are_not_forwards() -> None:
    assert ("tcp", 51234) not in parse_usernet(QEMU_7_2).forwards


def test_a_user_network_without_forwards_still_names_its_netdev() -> None:
    text = "Hub -1 (netdev2):\r\n  Protocol[State]    FD  Source Address  Port   Dest. Address\r\n"
    assert parse_usernet(text) == UserNet("netdev2", {})


def test_no_user_network_means_no_netdev_to_open_forwards_on() -> None:
    assert parse_usernet("") == UserNet(None, {})


def test_only_the_first_stack_counts() -> None:
    second = "Hub -1 (other):\r\n  TCP[HOST_FORWARD]  9  127.0.0.1 46000  10.0.3.2  22  0  0\r\n"
    assert parse_usernet(QEMU_7_2 + second).netdev == "netdev0"
    assert ("tcp", 22) not in parse_usernet(QEMU_7_2 + second).forwards
