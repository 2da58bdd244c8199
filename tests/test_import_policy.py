"""The import policy: what a DataVolume import may fetch, after DNS and on every redirect.

The decision is pinned by pure tests; the fetch path by real HTTP servers on this host; the
controller by a real API server of this module's own (so its ConfigMap is this module's alone).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import encode_basic_auth, web
from yarl import URL

from tests.conftest import Api, Kubectl, imports_allowed, make_user
from tests.test_storage import condition, dv, phase_is, pool_files, running_controller, wait_dv
from vmo.client import DATAVOLUME, EVENT, Client
from vmo.engine.storage.importer import (
    MAX_REDIRECTS,
    HttpAccess,
    ImportSpecError,
    TransferError,
    import_plan,
    open_http,
)
from vmo.engine.storage.pool import Pool
from vmo.engine.storage.urlpolicy import (
    POLICY_CONFIGMAP,
    POLICY_NAMESPACE,
    AllowList,
    Destination,
    ImportRefused,
    IPAddress,
    PinnedResolver,
    host_networks,
    local_networks,
    parse_allowed_hosts,
    parse_entry,
    policy_configmap,
    refusal,
)
from vmo.testing.apiserver import ThreadedServer

BODY = b"VMO-IMAGE" * 1000
SECRET = b"loopback-only secret"


def ip(text: str) -> IPAddress:
    return ipaddress.ip_address(text)


def allow(*entries: str) -> AllowList:
    allowed, errors = parse_allowed_hosts("\n".join(entries))
    assert not errors
    return allowed


def decide(
    address: str,
    *,
    host: str = "images.example",
    port: int = 80,
    allowed: AllowList | None = None,
    own: tuple[str, ...] = (),
) -> str | None:
    networks = tuple(ipaddress.ip_network(n) for n in own)
    return refusal(
        Destination(host, port, ip(address)),
        allowed=allowed or AllowList(),
        host_networks=networks,
    )


# --- the decision (pure) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "words"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),
        ("169.254.1.1", "link-local"),
        ("fe80::1", "link-local"),
        ("0.0.0.0", "unspecified"),
        ("0.1.2.3", "unspecified"),
        ("::", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("255.255.255.255", "broadcast"),
    ],
)
def test_addresses_that_reach_the_host_are_refused(address: str, words: str) -> None:
    reason = decide(address)
    assert reason is not None and words in reason


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "10.1.2.3", "192.168.1.1", "2001:db8::1", "fd00::5"]
)
def test_other_hosts_are_allowed(address: str) -> None:
    assert decide(address) is None


def test_the_hosts_own_addresses_are_refused() -> None:
    assert decide("192.0.2.2", own=("192.0.2.2/32",)) == "one of this host's own addresses"
    assert decide("fd00::2", own=("fd00::2/128",)) == "one of this host's own addresses"
    assert decide("192.0.2.3", own=("192.0.2.2/32",)) is None


def test_an_address_entry_allows_its_port_only() -> None:
    allowed = allow("127.0.0.1:8080")
    assert decide("127.0.0.1", port=8080, allowed=allowed) is None
    assert decide("127.0.0.1", port=8081, allowed=allowed) == "a loopback address"
    assert decide("127.0.0.2", port=8080, allowed=allowed) == "a loopback address"


def test_a_name_entry_trusts_the_name_not_the_address() -> None:
    allowed = allow("Mirror.LAN")
    assert decide("127.0.0.1", host="mirror.lan.", port=9, allowed=allowed) is None
    assert decide("127.0.0.1", host="other.lan", allowed=allowed) == "a loopback address"
    assert decide("127.0.0.1", host="127.0.0.1", allowed=allow("localhost")) is not None


def test_a_cidr_entry_allows_its_network_on_any_port() -> None:
    allowed = allow("127.0.0.0/8", "fd00::/8")
    assert decide("127.5.5.5", port=1, allowed=allowed) is None
    assert decide("fd00::2", own=("fd00::2/128",), allowed=allowed) is None
    assert decide("::1", allowed=allowed) == "a loopback address"


def test_allowed_hosts_take_commas_newlines_and_comments() -> None:
    allowed, errors = parse_allowed_hosts(
        "# the local mirror\n127.0.0.1:8080, mirror.lan\n\n[::1]:8443  # v6\n10.0.0.0/8,"
    )
    assert errors == []
    assert allowed.entries == (
        parse_entry("127.0.0.1:8080"),
        parse_entry("mirror.lan"),
        parse_entry("[::1]:8443"),
        parse_entry("10.0.0.0/8"),
    )
    assert parse_entry("[::1]:8443").port == 8443
    assert parse_entry("::1").network == ipaddress.ip_network("::1/128")


@pytest.mark.parametrize(
    "entry",
    [
        "300.1.1.1",
        "host:0",
        "host:70000",
        "host:http",
        "[::1",
        "[::1]x",
        "10.0.0.0/33",
        "a b",
        "a..b",
        "x" * 64 + ".lan",
        # long enough to hang a backtracking host-name pattern
        "a" * 60 + "!",
    ],
)
def test_entries_that_do_not_parse_are_reported_and_left_out(entry: str) -> None:
    allowed, errors = parse_allowed_hosts(f"{entry}\nmirror.lan")
    assert len(errors) == 1 and entry in errors[0]
    assert allowed.entries == (parse_entry("mirror.lan"),)


def test_local_networks_are_the_local_tables_destinations() -> None:
    routes = [
        {"type": "local", "dst": "127.0.0.0/8", "dev": "lo"},
        {"type": "local", "dst": "192.0.2.2", "dev": "eth0"},
        {"type": "broadcast", "dst": "192.0.2.255", "dev": "eth0"},
        {"type": "local", "dst": "fe80::fc:ff:fe00:1", "dev": "eth0"},
        {"type": "unreachable", "dst": "default"},
    ]
    assert local_networks(routes) == tuple(
        ipaddress.ip_network(n)
        for n in ("127.0.0.0/8", "192.0.2.2/32", "192.0.2.255/32", "fe80::fc:ff:fe00:1/128")
    )


# --- the I/O edges ----------------------------------------------------------------------------


def interface_addresses() -> list[IPAddress]:
    """Every address of every interface, as ``ip address`` (not the routing table) lists them."""
    out = subprocess.run(["ip", "-j", "address"], capture_output=True, check=True, text=True)
    return [ip(a["local"]) for link in json.loads(out.stdout) for a in link.get("addr_info", [])]


def own_unicast_address() -> IPAddress:
    """One of this host's addresses that is neither loopback nor link-local."""
    for address in interface_addresses():
        if address.version == 4 and not (address.is_loopback or address.is_link_local):
            return address
    pytest.skip("this host has no IPv4 address besides loopback and link-local ones")


async def test_host_networks_cover_every_interface_address() -> None:
    networks = await host_networks()
    addresses = interface_addresses()
    assert ip("127.0.0.1") in addresses
    for address in addresses:
        assert any(address in n for n in networks), address


async def test_the_pinned_resolver_answers_only_with_what_was_checked() -> None:
    resolver = PinnedResolver()
    resolver.pin("mirror.lan", 80, [ip("192.0.2.10")])
    [answer] = await resolver.resolve("mirror.lan", 80)
    assert answer["host"] == "192.0.2.10" and answer["port"] == 80
    with pytest.raises(OSError, match="not checked"):
        await resolver.resolve("mirror.lan", 81)
    with pytest.raises(OSError, match="not checked"):
        await resolver.resolve("other.lan", 80)


def test_file_urls_cannot_leave_the_image_dir_through_a_symlink(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (tmp_path / "secret").write_text("no")
    (images / "disk.qcow2").symlink_to(tmp_path / "secret")
    url = f"file://{images}/disk.qcow2"
    with pytest.raises(ImportSpecError, match="must come from under"):
        import_plan(dv("a", {"http": {"url": url}}), import_dir=images)


# --- the fetch path, over real HTTP -----------------------------------------------------------


@dataclass
class Site:
    """A local HTTP server that records what it was asked."""

    base: str
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    @property
    def authority(self) -> str:
        return URL(self.base).raw_authority


@dataclass(frozen=True)
class Redirect:
    to: str


@contextlib.asynccontextmanager
async def serving(
    routes: dict[str, bytes | Redirect], host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[Site]:
    """Serves ``routes``: a path -> its body, or a redirect (302) elsewhere."""
    site: Site | None = None

    async def handle(request: web.Request) -> web.StreamResponse:
        assert site is not None
        site.seen.append((request.path, dict(request.headers)))
        answer = routes.get(request.path)
        if answer is None:
            raise web.HTTPNotFound()
        if isinstance(answer, Redirect):
            return web.Response(status=302, headers={"Location": answer.to})
        return web.Response(body=answer)

    app = web.Application()
    app.router.add_get("/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    bound = runner.addresses[0][1]
    name = f"[{host}]" if ":" in host else host
    site = Site(f"http://{name}:{bound}")
    try:
        yield site
    finally:
        await runner.cleanup()


async def fetch(url: str, access: HttpAccess) -> bytes:
    async with open_http(url, access) as (chunks, _):
        return b"".join([chunk async for chunk in chunks])


async def test_loopback_is_refused_by_default_and_never_contacted() -> None:
    async with serving({"/disk.img": SECRET}) as site:
        url = f"{site.base}/disk.img"
        with pytest.raises(ImportRefused) as refused:
            await fetch(url, HttpAccess())
        assert site.seen == []
    message = str(refused.value)
    assert url in message and "127.0.0.1, a loopback address" in message
    assert f"{POLICY_NAMESPACE}/{POLICY_CONFIGMAP}" in message


async def test_a_name_that_resolves_to_loopback_is_refused() -> None:
    async with serving({"/disk.img": SECRET}) as site:
        port = URL(site.base).port
        with pytest.raises(ImportRefused, match="a loopback address"):
            await fetch(f"http://localhost:{port}/disk.img", HttpAccess())
        # the legacy numeric form of 127.0.0.1 is a name the resolver turns into loopback
        with pytest.raises(ImportRefused, match=r"connects to 127\.0\.0\.1, a loopback"):
            await fetch(f"http://2130706433:{port}/disk.img", HttpAccess())
        assert site.seen == []


async def test_link_local_and_metadata_addresses_are_refused_without_connecting() -> None:
    for url in ("http://169.254.169.254/latest/meta-data/", "http://[fe80::1]:8080/x"):
        with pytest.raises(ImportRefused, match="a link-local address") as refused:
            await asyncio.wait_for(fetch(url, HttpAccess()), 5)
        assert url in str(refused.value)


async def test_the_hosts_own_address_is_refused() -> None:
    address = own_unicast_address()
    async with serving({"/disk.img": SECRET}, host=str(address)) as site:
        with pytest.raises(ImportRefused, match="one of this host's own addresses"):
            await fetch(f"{site.base}/disk.img", HttpAccess())
        assert site.seen == []


async def test_an_allowed_host_is_fetched_through_its_own_redirects() -> None:
    async with serving({"/old.img": Redirect("/disk.img"), "/disk.img": BODY}) as site:
        access = HttpAccess(allowed=allow(site.authority))
        assert await fetch(f"{site.base}/old.img", access) == BODY
        assert [path for path, _ in site.seen] == ["/old.img", "/disk.img"]


async def test_a_redirect_from_an_allowed_host_to_loopback_is_refused() -> None:
    async with (
        serving({"/secret": SECRET}) as inner,
        serving({"/disk.img": Redirect(f"{inner.base}/secret")}) as mirror,
    ):
        access = HttpAccess(allowed=allow(mirror.authority))
        with pytest.raises(ImportRefused) as refused:
            await fetch(f"{mirror.base}/disk.img", access)
        assert inner.seen == []
    message = str(refused.value)
    assert f"{mirror.base}/disk.img redirected to {inner.base}/secret" in message
    assert "a loopback address" in message


async def test_a_redirect_to_a_file_url_is_refused() -> None:
    async with serving({"/disk.img": Redirect("file:///etc/passwd")}) as mirror:
        access = HttpAccess(allowed=allow(mirror.authority))
        with pytest.raises(ImportRefused, match="only http and https URLs"):
            await fetch(f"{mirror.base}/disk.img", access)


async def test_redirects_stop_after_the_cap() -> None:
    hops = {f"/{i}": Redirect(f"/{i + 1}") for i in range(MAX_REDIRECTS + 1)}
    async with serving({**hops, f"/{MAX_REDIRECTS + 1}": BODY}) as site:
        access = HttpAccess(allowed=allow(site.authority))
        with pytest.raises(TransferError, match=f"stopped after {MAX_REDIRECTS} redirects"):
            await fetch(f"{site.base}/0", access)
        assert len(site.seen) == MAX_REDIRECTS + 1
        # one hop fewer arrives
        assert await fetch(f"{site.base}/1", access) == BODY


async def test_credentials_do_not_follow_a_redirect_to_another_origin() -> None:
    async with (
        serving({"/disk.img": BODY}) as other,
        serving({"/disk.img": Redirect(f"{other.base}/disk.img")}) as mirror,
    ):
        access = HttpAccess(
            authorization=encode_basic_auth("user", "pw"),
            allowed=allow(mirror.authority, other.authority),
        )
        assert await fetch(f"{mirror.base}/disk.img", access) == BODY
        assert "Authorization" in mirror.seen[0][1]
        assert "Authorization" not in other.seen[0][1]


async def test_the_connection_goes_to_the_checked_address_only() -> None:
    """A name that answers an allowed address for the check and loopback afterwards (DNS
    rebinding) is still fetched from the checked address: the connector never asks again."""
    async with serving({"/disk.img": BODY}, host="127.0.0.2") as mirror:
        port = URL(mirror.base).port
        assert port is not None
        async with serving({"/disk.img": SECRET}, port=port) as inner:
            answers = [[ip("127.0.0.2")], [ip("127.0.0.1")]]

            async def rebinding(host: str, port: int) -> list[IPAddress]:
                return answers.pop(0) if len(answers) > 1 else answers[0]

            access = HttpAccess(allowed=allow("127.0.0.2"), resolve=rebinding)
            assert await fetch(f"http://rebind.test:{port}/disk.img", access) == BODY
            assert inner.seen == [] and len(answers) == 1


# --- the controller and the administrator's ConfigMap, on a real API server ------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    with ThreadedServer(tmp_path_factory.mktemp("vmo-policy")) as running:
        yield running


@pytest.fixture
def pool(tmp_path: Path) -> Pool:
    return Pool(tmp_path / "pool")


async def warning_events(client: Client, name: str) -> list[dict[str, Any]]:
    events, _ = await client.list(EVENT, "default")
    return [e for e in events if e["involvedObject"]["name"] == name and e["type"] == "Warning"]


async def test_a_refused_import_fails_at_once_with_the_url_named(
    server: ThreadedServer, pool: Pool, tmp_path: Path, unique: str
) -> None:
    async with (
        serving({"/disk.img": SECRET}) as site,
        running_controller(server, pool, tmp_path) as (client, _),
    ):
        url = f"{site.base}/disk.img"
        await client.create(DATAVOLUME, dv(unique, {"http": {"url": url}}))
        failed = await wait_dv(client, "default", unique, phase_is("Failed", "Succeeded"))
        assert site.seen == []
        assert pool_files(pool) == []
        events = await warning_events(client, unique)
    assert failed["status"]["phase"] == "Failed"
    assert failed["status"]["restartCount"] == 0
    running = condition(failed, "Running")
    assert running["status"] == "False" and running["reason"] == "ImportRefused"
    assert url in running["message"] and "a loopback address" in running["message"]
    assert [e["reason"] for e in events] == ["ImportFailed"]
    assert url in events[0]["message"]


async def test_the_allow_list_is_read_at_each_import(
    server: ThreadedServer, pool: Pool, tmp_path: Path, unique: str
) -> None:
    async with (
        serving({"/disk.img": BODY}) as site,
        running_controller(server, pool, tmp_path) as (client, _),
    ):
        source = {"http": {"url": f"{site.base}/disk.img"}}
        await client.create(DATAVOLUME, dv(f"{unique}-before", source))
        before = await wait_dv(client, "default", f"{unique}-before", phase_is("Failed"))
        assert condition(before, "Running")["reason"] == "ImportRefused"
        with imports_allowed(server, site.authority):
            await client.create(DATAVOLUME, dv(f"{unique}-after", source))
            after = await wait_dv(
                client, "default", f"{unique}-after", phase_is("Succeeded", "Failed")
            )
        assert after["status"]["phase"] == "Succeeded", after["status"]
        assert [path for path, _ in site.seen] == ["/disk.img"]


def test_only_cluster_administrators_can_write_the_policy(server: ThreadedServer) -> None:
    """A user with ``edit`` in a namespace can neither write the policy nor make its namespace."""
    kubectl = Kubectl(server.kubeconfig)
    token, _ = make_user(server, "policy-editor")
    kubectl(
        "create", "rolebinding", "policy-editor-edit", "-n", "virtual-machines",
        "--clusterrole=edit", "--user=policy-editor",
    )  # fmt: skip
    user = Api(server.url, server.ca, token)
    namespaces = "/api/v1/namespaces"
    body = {"metadata": {"name": POLICY_NAMESPACE}}
    assert user.post(namespaces, body).status_code == 403
    with imports_allowed(server, "127.0.0.1:1"):
        configmaps = f"/api/v1/namespaces/{POLICY_NAMESPACE}/configmaps"
        assert user.post(configmaps, policy_configmap("127.0.0.1")).status_code == 403
        patch = {"data": {"allowedHosts": "127.0.0.1"}}
        answer = user.patch(
            f"{configmaps}/{POLICY_CONFIGMAP}", patch, "application/merge-patch+json"
        )
        assert answer.status_code == 403
        # the same user may write ConfigMaps where edit was granted: the refusal is the policy's
        own = policy_configmap("x")
        own["metadata"]["namespace"] = "virtual-machines"
        assert user.post("/api/v1/namespaces/virtual-machines/configmaps", own).status_code == 201
