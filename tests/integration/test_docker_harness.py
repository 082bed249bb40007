"""The real-Docker harness (tests.harness.docker), proven with Docker's own bridge driver and
with a fake remote network/IPAM plugin (the plexus plugin is not involved).

A private dockerd (Debian's docker.io 20.10, supervised containerd, runc) runs in a network
namespace of its own, ``dkhost``, joined by a veth to the sandbox's root namespace (the
"outside"). Containers come from a locally imported busybox image. Oracles are the kernel
(``ip -j``, ``iptables-save``), real traffic and the process/mount tables, not Docker's view alone.

The fake plugin records every call dockerd makes. Set ``PLEXUS_DOCKER_RECORD=/some/file.json``
to keep the recorded request/response bodies (and the run timings) for reference.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

from tests.harness.docker import (
    BUSYBOX,
    CGROUP_PREFIX,
    CGROUP_ROOT,
    INDEX_HTML,
    Dockerd,
    DockerError,
    install_packages,
    installed,
)


@pytest.fixture(scope="module", autouse=True)
def docker_io() -> None:
    """docker.io and busybox-static, installed if missing (needs the network, so in practice
    `make deps` does it: the sandbox has none); skip if that fails."""
    if installed() and BUSYBOX.exists():
        return
    try:
        install_packages()
    except (DockerError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"docker.io/busybox-static missing and not installable here: {e}")
    if not (installed() and BUSYBOX.exists()):
        pytest.skip("docker.io/busybox-static missing (make deps)")


NS = "dkhost"
OUTSIDE_IP = "198.18.7.1"
HOST_IP = "198.18.7.2"
SUBNET = "10.91.7.0/24"
GATEWAY = "10.91.7.1"
# Default paths of dockerd, containerd and the shims: the harness writes none of them.
HOST_PATHS = (
    "/var/lib/docker",
    "/var/lib/containerd",
    "/run/containerd",
    "/run/docker.sock",
    "/run/docker.pid",
    "/run/docker/containerd",
    "/run/docker/netns",
    "/opt/containerd",
    "/etc/docker/key.json",
    "/root/.docker",
)
ENGINE_PROCS = ("dockerd", "containerd", "containerd-shim", "docker-proxy", "runc")
RECORD: dict[str, Any] = {}


def sh(*argv: str, timeout: float = 20, check: bool = True) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=check).stdout


def ns_links(ns: str = NS) -> dict[str, dict[str, Any]]:
    return {l["ifname"]: l for l in json.loads(sh("ip", "-n", ns, "-j", "-d", "addr"))}


def http_get(ip: str, port: int, timeout: float = 3) -> str:
    """GET / from the caller's (the sandbox's root) netns; the body, "" on failure."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
    except OSError:
        return ""
    return data.split(b"\r\n\r\n", 1)[-1].decode(errors="replace")


def root_rules() -> str:
    """The caller's iptables rules, without iptables-save's timestamp comments."""
    return "\n".join(l for l in sh("iptables-save").splitlines() if not l.startswith("#"))


def engine_processes() -> list[str]:
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                comm = Path(f"/proc/{entry.name}/comm").read_text().strip()
                state = Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if comm.startswith(ENGINE_PROCS) and state != "Z":
                found.append(f"{entry.name}:{comm}")
    return found


def docker_cgroups() -> list[str]:
    return [str(p) for p in CGROUP_ROOT.glob(f"*/{CGROUP_PREFIX}*")] + [
        str(p) for p in CGROUP_ROOT.glob(f"{CGROUP_PREFIX}*")
    ]


def host_paths() -> dict[str, bool]:
    return {p: os.path.lexists(p) for p in HOST_PATHS}


def record(key: str, value: Any) -> None:
    RECORD[key] = value
    out = os.environ.get("PLEXUS_DOCKER_RECORD")
    if out:
        Path(out).write_text(json.dumps(RECORD, indent=2, sort_keys=False) + "\n")


@pytest.fixture
def netns() -> Iterator[str]:
    """``dkhost``: the simulated host dockerd lives in, 198.18.7.2 on a veth to the caller."""
    sh("ip", "netns", "add", NS)
    try:
        sh("ip", "-n", NS, "link", "set", "lo", "up")
        sh("ip", "link", "add", "to-dkhost", "type", "veth", "peer", "name", "up0",
           "netns", NS)  # fmt: skip
        sh("ip", "addr", "add", f"{OUTSIDE_IP}/24", "dev", "to-dkhost")
        sh("ip", "link", "set", "to-dkhost", "up")
        sh("ip", "-n", NS, "addr", "add", f"{HOST_IP}/24", "dev", "up0")
        sh("ip", "-n", NS, "link", "set", "up0", "up")
        sh("ip", "-n", NS, "route", "add", "default", "via", OUTSIDE_IP)
        yield NS
    finally:
        sh("ip", "link", "del", "to-dkhost", check=False)
        sh("ip", "netns", "del", NS, check=False)


@pytest.fixture
def dockerd(tmp_path: Path, netns: str) -> Iterator[Dockerd]:
    d = Dockerd(tmp_path / "docker", netns=netns)
    d.start()
    try:
        d.import_busybox()
        yield d
    finally:
        d.stop()


# --------------------------------------------------------------------------------------------
# Docker's own bridge driver


def test_bridge_network_traffic_and_publish(dockerd: Dockerd) -> None:
    d = dockerd
    rules_before = root_rules()
    d.network_create("refnet", subnet=SUBNET, gateway=GATEWAY)
    bridge = "br-" + d.network_inspect("refnet")["Id"][:12]
    d.run("ca", "refnet")
    d.run_http("cb", "refnet", publish=["8080:80"])
    ip_a, ip_b = d.ip("ca", "refnet"), d.ip("cb", "refnet")
    assert ipaddress.ip_address(ip_b) in ipaddress.ip_network(SUBNET)

    # The kernel: the bridge and both host-side veths are in dkhost, with the gateway address.
    links = ns_links()
    assert bridge in links
    addrs = [f"{a['local']}/{a['prefixlen']}" for a in links[bridge]["addr_info"]]
    assert f"{GATEWAY}/24" in addrs
    ports = [n for n, l in links.items() if l.get("master") == bridge]
    assert len(ports) == 2, ports
    assert bridge not in sh("ip", "-br", "link")  # nothing in the caller's namespace

    # Real traffic between the containers: ICMP, TCP (nc), HTTP, and the embedded DNS.
    assert "1 packets received" in d.exec("ca", "ping", "-c1", "-W2", ip_b).stdout
    assert "1 packets received" in d.exec("cb", "ping", "-c1", "-W2", ip_a).stdout
    assert "1 packets received" in d.exec("ca", "ping", "-c1", "-W2", "cb").stdout
    d.docker("exec", "-d", "cb", "nc", "-ll", "-p", "7000", "-e", "hostname")
    hostname_b = d.inspect("cb")["Config"]["Hostname"]
    reply = ""
    for _ in range(20):  # the listener needs a moment
        reply = d.exec("ca", "nc", "-w", "3", ip_b, "7000", check=False).stdout.strip()
        if reply:
            break
        d.exec("ca", "sleep", "0.2")
    assert reply == hostname_b
    assert d.fetch("ca", f"http://{ip_b}/") == INDEX_HTML

    # -p 8080:80: DNAT from outside to dkhost's address, and docker-proxy on dkhost's loopback.
    assert http_get(HOST_IP, 8080) == INDEX_HTML
    local = subprocess.run(
        ["nsenter", f"--net=/run/netns/{NS}", "busybox", "wget", "-q", "-O", "-",
         "http://127.0.0.1:8080/"],
        capture_output=True, text=True, timeout=20,
    ).stdout  # fmt: skip
    assert local == INDEX_HTML
    rules = d.iptables_save()
    assert ":DOCKER " in rules and "--dport 8080" in rules and f"{ip_b}:80" in rules
    assert root_rules() == rules_before  # the caller's namespace is untouched

    # SandboxKey: the netns dockerd mounted in its exec root is usable from here.
    key = d.sandbox_key("cb")
    assert key.startswith(str(d.netns_dir) + "/")
    inside = json.loads(sh("nsenter", f"--net={key}", "ip", "-j", "addr", "show", "eth0"))
    assert ip_b in [a["local"] for a in inside[0]["addr_info"]]

    # Removal: containers and the network go, and so do their links in dkhost.
    d.rm("ca", "cb")
    d.network_rm("refnet")
    assert d.containers() == []
    assert "refnet" not in d.networks_list()
    links = ns_links()
    assert bridge not in links
    assert not [n for n, l in links.items() if l.get("linkinfo", {}).get("info_kind") == "veth"
                and n != "up0"]  # fmt: skip


def test_stop_leaves_nothing(tmp_path: Path, netns: str) -> None:
    before_paths = host_paths()
    before_rules = root_rules()
    assert not engine_processes()
    d = Dockerd(tmp_path / "docker", netns=netns)
    with d:
        d.import_busybox()
        d.network_create("leftnet", subnet="10.91.8.0/24")
        d.run("running1", "leftnet")  # still running when stop() is called
        d.run_http("running2", None, publish=["8081:80"])
        assert engine_processes()
        assert d.namespace_pids()
        assert docker_cgroups()
        assert [p for p in os.listdir(d.netns_dir)]  # sandbox keys are visible here
    assert d.leftovers() == {}
    assert engine_processes() == []
    assert docker_cgroups() == []
    assert not d.rundir.exists()
    assert not d.data_root.exists()
    mounts = Path("/proc/self/mountinfo").read_text()
    assert str(d.workdir) not in mounts and str(d.rundir) not in mounts
    assert host_paths() == before_paths
    assert not os.listdir("/run/docker/plugins")
    assert root_rules() == before_rules
    assert "dockerd" in d.log_text()  # the log stays for debugging


# --------------------------------------------------------------------------------------------
# plugin discovery, with a fake remote NetworkDriver + IpamDriver


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class FakePlugin:
    """A libnetwork remote network driver and IPAM driver on a unix socket.

    Networks are bridges in dockerd's netns (``ip -n``) with the gateway address; Join makes a
    veth pair whose host end is on the bridge and hands the other end to dockerd. IPAM hands out
    addresses in order. Every call is kept in ``calls`` as {"call", "request", "response"}.
    """

    def __init__(self, path: Path, netns: str) -> None:
        self.path = path
        self.netns = netns
        self.calls: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.networks: dict[str, dict[str, Any]] = {}
        self.endpoints: dict[str, dict[str, Any]] = {}
        self.pools: dict[str, dict[str, Any]] = {}
        self.auto_pools = 0
        plugin = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                body = json.loads(raw) if raw.strip() else None
                status, answer = plugin.handle(self.path.lstrip("/"), body, raw.decode())
                data = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.docker.plugins.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        self.server = _Server(str(path), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
        self.path.unlink(missing_ok=True)

    def called(self, name: str) -> list[dict[str, Any]]:
        return [c["request"] for c in self.calls if c["call"] == name]

    def ip(self, *args: str) -> None:
        sh("ip", "-n", self.netns, *args)

    def handle(self, call: str, body: Any, raw: str = "") -> tuple[int, Any]:
        method = getattr(self, call.replace(".", "_"), None)
        if method is None:
            status, answer = 404, {"Err": f"{call} not implemented"}
        else:
            try:
                with self.lock:
                    status, answer = 200, method(body or {})
            except Exception as e:
                key = "Error" if call.startswith("IpamDriver.") else "Err"
                status, answer = 200, {key: str(e)}
        self.calls.append({"call": call, "raw": raw, "request": body, "response": answer})
        return status, answer

    # ---- Plugin / NetworkDriver

    def Plugin_Activate(self, body: Any) -> Any:
        return {"Implements": ["NetworkDriver", "IpamDriver"]}

    def NetworkDriver_GetCapabilities(self, body: Any) -> Any:
        return {"Scope": "local", "ConnectivityScope": "local"}

    def NetworkDriver_CreateNetwork(self, body: Any) -> Any:
        failure = (body.get("Options") or {}).get("com.docker.network.generic", {})
        if "fake.fail" in failure:
            raise RuntimeError(failure["fake.fail"])
        nid = body["NetworkID"]
        bridge = f"fkb{nid[:10]}"
        self.ip("link", "add", bridge, "type", "bridge")
        gateways = []
        for data in (body.get("IPv4Data") or []) + (body.get("IPv6Data") or []):
            if data.get("Gateway"):
                self.ip("addr", "add", data["Gateway"], "dev", bridge)
                gateways.append(data["Gateway"].split("/")[0])
        self.ip("link", "set", bridge, "up")
        # dockerd (--iptables) sets FORWARD's policy to DROP and bridge-nf-call-iptables=1 in
        # its netns: without these, even traffic bridged between two ports of ours is dropped.
        for rule in self._accept_rules(bridge):
            self.iptables("-I", "DOCKER-USER", *rule)
        self.networks[nid] = {"bridge": bridge, "gateways": gateways}
        return {}

    @staticmethod
    def _accept_rules(bridge: str) -> list[list[str]]:
        return [["-i", bridge, "-j", "ACCEPT"], ["-o", bridge, "-j", "ACCEPT"]]

    def iptables(self, *args: str, check: bool = True) -> None:
        sh("nsenter", f"--net=/run/netns/{self.netns}", "iptables", "-w", *args, check=check)

    def NetworkDriver_DeleteNetwork(self, body: Any) -> Any:
        net = self.networks.pop(body["NetworkID"], None)
        if net:
            self.ip("link", "del", net["bridge"])
            for rule in self._accept_rules(net["bridge"]):
                self.iptables("-D", "DOCKER-USER", *rule, check=False)
        return {}

    def NetworkDriver_CreateEndpoint(self, body: Any) -> Any:
        eid = body["EndpointID"]
        iface = body.get("Interface") or {}
        self.endpoints[eid] = {"network": body["NetworkID"]}
        if not iface.get("MacAddress"):
            # A driver may choose the MAC (only fields dockerd did not set may be returned).
            mac = "02:fa:" + ":".join(eid[i : i + 2] for i in range(0, 8, 2))
            return {"Interface": {"MacAddress": mac}}
        return {}

    def NetworkDriver_EndpointOperInfo(self, body: Any) -> Any:
        return {"Value": {"fake.endpoint": body["EndpointID"][:12]}}

    def NetworkDriver_DeleteEndpoint(self, body: Any) -> Any:
        self.endpoints.pop(body["EndpointID"], None)
        return {}

    def NetworkDriver_Join(self, body: Any) -> Any:
        eid, net = body["EndpointID"], self.networks[body["NetworkID"]]
        host, peer = f"fkh{eid[:10]}", f"fkc{eid[:10]}"
        self.ip("link", "add", host, "type", "veth", "peer", "name", peer)
        self.ip("link", "set", host, "master", net["bridge"], "up")
        answer: dict[str, Any] = {"InterfaceName": {"SrcName": peer, "DstPrefix": "eth"}}
        for gw in net["gateways"]:
            answer["GatewayIPv6" if ":" in gw else "Gateway"] = gw
        return answer

    def NetworkDriver_Leave(self, body: Any) -> Any:
        sh("ip", "-n", self.netns, "link", "del", f"fkh{body['EndpointID'][:10]}", check=False)
        return {}

    def NetworkDriver_ProgramExternalConnectivity(self, body: Any) -> Any:
        return {}

    def NetworkDriver_RevokeExternalConnectivity(self, body: Any) -> Any:
        return {}

    def NetworkDriver_DiscoverNew(self, body: Any) -> Any:
        return {}

    def NetworkDriver_DiscoverDelete(self, body: Any) -> Any:
        return {}

    # ---- IpamDriver

    def IpamDriver_GetCapabilities(self, body: Any) -> Any:
        return {"RequiresMACAddress": True, "RequiresRequestReplay": False}

    def IpamDriver_GetDefaultAddressSpaces(self, body: Any) -> Any:
        return {
            "LocalDefaultAddressSpace": "fake-local",
            "GlobalDefaultAddressSpace": "fake-global",
        }

    def IpamDriver_RequestPool(self, body: Any) -> Any:
        if "fake.fail" in (body.get("Options") or {}):
            raise RuntimeError(body["Options"]["fake.fail"])
        pool = body.get("Pool")
        if not pool:
            # Never the same pool twice: dockerd releases a pool that overlaps one of its
            # bridges and asks again, forever if the answer does not change.
            n, self.auto_pools = self.auto_pools, self.auto_pools + 1
            pool = f"fd93:{n:x}::/64" if body.get("V6") else f"10.93.{n}.0/24"
        pool_id = f"fake/{body.get('AddressSpace')}/{pool}"
        sub = ipaddress.ip_network(body.get("SubPool") or pool)
        self.pools[pool_id] = {"net": ipaddress.ip_network(pool), "sub": sub, "used": set()}
        return {"PoolID": pool_id, "Pool": pool, "Data": {"fake.pool": "data"}}

    def IpamDriver_ReleasePool(self, body: Any) -> Any:
        self.pools.pop(body["PoolID"], None)
        return {}

    def IpamDriver_RequestAddress(self, body: Any) -> Any:
        pool = self.pools[body["PoolID"]]
        net, used = pool["net"], pool["used"]
        opts = body.get("Options") or {}
        if body.get("Address"):
            addr = ipaddress.ip_address(body["Address"])
        elif opts.get("RequestAddressType") == "com.docker.network.gateway":
            addr = net.network_address + 1
        else:
            addr = next(
                a for a in pool["sub"].hosts() if a not in used and a != net.network_address + 1
            )
        if addr in used:
            raise ValueError(f"{addr} is in use")
        used.add(addr)
        return {"Address": f"{addr}/{net.prefixlen}", "Data": {"fake.address": "data"}}

    def IpamDriver_ReleaseAddress(self, body: Any) -> Any:
        pool = self.pools.get(body["PoolID"])
        if pool:
            pool["used"].discard(ipaddress.ip_address(body["Address"]))
        return {}


@pytest.fixture
def fake_plugin(netns: str) -> Iterator[FakePlugin]:
    """``fakenet``, found the default way: a socket in /run/docker/plugins (sandbox tmpfs)."""
    p = FakePlugin(Dockerd.plugin_socket_path("fakenet"), netns)
    try:
        yield p
    finally:
        p.close()


def _calls_log(plugin: FakePlugin) -> list[dict[str, Any]]:
    return [dict(c) for c in plugin.calls]


def test_plugin_discovery_and_calls(tmp_path: Path, netns: str, fake_plugin: FakePlugin) -> None:
    fp = fake_plugin
    spec_plugin = FakePlugin(tmp_path / "spec-plugin" / "fakespec.sock", netns)
    d = Dockerd(tmp_path / "docker", netns=netns, plugins={"fakespec": spec_plugin.path})
    try:
        with d:
            d.import_busybox()
            _exercise_plugin(d, fp, spec_plugin)
    finally:
        record("plugin_calls", _calls_log(fp))
        record("spec_plugin_calls", _calls_log(spec_plugin))
        spec_plugin.close()
    # After stop: every endpoint and network was taken down through the plugin.
    assert not fp.endpoints and not fp.networks
    assert not [n for n in ns_links() if n.startswith("fk")]


def _exercise_plugin(d: Dockerd, fp: FakePlugin, spec: FakePlugin) -> None:
    # A spec file in /etc/docker/plugins (as dockerd sees it) pointing at any socket.
    d.network_create("specnet", driver="fakespec", subnet="10.96.0.0/24")
    # Activate registers both drivers: their GetCapabilities (and the address spaces) come next.
    calls = [c["call"] for c in spec.calls]
    assert calls[0] == "Plugin.Activate"
    assert {"NetworkDriver.GetCapabilities", "IpamDriver.GetCapabilities"} <= set(calls)
    (create,) = spec.called("NetworkDriver.CreateNetwork")
    assert create["IPv4Data"][0]["Pool"] == "10.96.0.0/24"

    # Driver with Docker's default IPAM, every option the CLI has.
    nid = d.network_create(
        "fknet", driver="fakenet", subnet="10.92.0.0/24", gateway="10.92.0.1",
        ip_range="10.92.0.128/25", options={"fake.opt": "value", "mtu-ish": "1400"},
        labels={"lab": "el"}, ipam_options={"ipamopt": "x"},
    )  # fmt: skip
    calls = [c["call"] for c in fp.calls]
    assert calls[0] == "Plugin.Activate" and "NetworkDriver.GetCapabilities" in calls
    (create,) = fp.called("NetworkDriver.CreateNetwork")
    assert create["NetworkID"] == nid
    assert create["IPv4Data"][0]["Pool"] == "10.92.0.0/24"
    assert create["Options"]["com.docker.network.generic"]["fake.opt"] == "value"

    d.run_http(
        "fk-a", "fknet", publish=["8081:80", "9999:99/udp"],
        extra=["--network-alias", "alias-a", "--ip", "10.92.0.10", "--mac-address",
               "02:42:0a:5c:00:0a", "--hostname", "fk-a-host", "--expose", "5555",
               "--label", "clabel=1"],
    )  # fmt: skip
    d.run("fk-b", "fknet")
    ip_a, ip_b = d.ip("fk-a", "fknet"), d.ip("fk-b", "fknet")
    assert ip_a == "10.92.0.10"
    assert d.container_networks("fk-a")["fknet"]["MacAddress"] == "02:42:0a:5c:00:0a"
    assert d.container_networks("fk-b")["fknet"]["MacAddress"].startswith("02:fa:")
    # Real traffic over the fake driver's bridge and veths.
    assert "1 packets received" in d.exec("fk-b", "ping", "-c1", "-W2", ip_a).stdout
    assert "1 packets received" in d.exec("fk-b", "ping", "-c1", "-W2", "alias-a").stdout
    assert d.fetch("fk-b", f"http://{ip_a}/") == INDEX_HTML
    pec = fp.called("NetworkDriver.ProgramExternalConnectivity")
    assert any("com.docker.network.portmap" in (c.get("Options") or {}) for c in pec)

    # connect/disconnect a container that lives on Docker's bridge.
    d.run("fk-c", None)
    d.connect("fknet", "fk-c", "--alias", "extra-alias", "--ip", "10.92.0.20")
    assert d.ip("fk-c", "fknet") == "10.92.0.20"
    assert "1 packets received" in d.exec("fk-c", "ping", "-c1", "-W2", ip_b).stdout
    d.disconnect("fknet", "fk-c")

    # The plugin as IPAM driver too, for its own network and for Docker's bridge.
    d.network_create(
        "fkipam", driver="fakenet", ipam_driver="fakenet", subnet="10.95.0.0/24",
        gateway="10.95.0.254", ip_range="10.95.0.128/25", ipam_options={"ipamopt": "y"},
        extra=["--aux-address", "reserved=10.95.0.200"],
    )  # fmt: skip
    d.run("fk-d", "fkipam", extra=["--ip", "10.95.0.50"])
    d.run("fk-e", "fkipam")
    assert d.ip("fk-d", "fkipam") == "10.95.0.50"
    assert ipaddress.ip_address(d.ip("fk-e", "fkipam")) in ipaddress.ip_network("10.95.0.128/25")
    assert "1 packets received" in d.exec(
        "fk-e", "ping", "-c1", "-W2", "10.95.0.50").stdout  # fmt: skip
    # IPv6 through the plugin's IPAM: a v4 pool it picks itself, the v6 one given.
    d.network_create("fkipam6", driver="fakenet", ipam_driver="fakenet", ipv6=True,
                     subnet="fd95::/64")  # fmt: skip
    d.run("fk-h", "fkipam6", extra=["--ip6", "fd95::66"])
    d.network_create("brfkipam", driver="bridge", ipam_driver="fakenet")
    d.run("fk-f", "brfkipam")
    (ipam_cfg,) = d.network_inspect("brfkipam")["IPAM"]["Config"]
    assert ipam_cfg["Subnet"].startswith("10.93.") and ipam_cfg["Gateway"].startswith("10.93.")
    assert "1 packets received" in d.exec(
        "fk-f", "ping", "-c1", "-W2", ipam_cfg["Gateway"]).stdout  # fmt: skip
    assert fp.called("IpamDriver.RequestPool") and fp.called("IpamDriver.RequestAddress")

    # internal + IPv6, dual stack.
    d.network_create(
        "fk6", driver="fakenet", internal=True, ipv6=True,
        subnet=["10.94.0.0/24", "fd00:77::/64"],
    )  # fmt: skip
    d.run("fk-g", "fk6")
    record("inspect", {
        "network fknet": d.network_inspect("fknet"),
        "network fk6": d.network_inspect("fk6"),
        "container fk-a networks": d.container_networks("fk-a"),
        "container fk-g networks": d.container_networks("fk-g"),
    })  # fmt: skip

    # Teardown through the plugin: Leave, DeleteEndpoint, ReleaseAddress, DeleteNetwork, ...
    d.rm("fk-a", "fk-b", "fk-c", "fk-d", "fk-e", "fk-f", "fk-g", "fk-h")
    d.network_rm("fknet", "fkipam", "fkipam6", "brfkipam", "fk6", "specnet")
    assert len(fp.called("NetworkDriver.Leave")) == len(fp.called("NetworkDriver.Join"))
    assert len(fp.called("NetworkDriver.DeleteNetwork")) == 4
    assert len(fp.called("IpamDriver.ReleasePool")) == len(fp.called("IpamDriver.RequestPool"))

    # Errors: {"Err": ...} from the driver, {"Error": ...} from IPAM reach the CLI verbatim.
    r = d.docker("network", "create", "-d", "fakenet", "-o", "fake.fail=driver says no",
                 "failnet", check=False)  # fmt: skip
    assert r.returncode != 0 and "driver says no" in r.stderr
    r2 = d.docker("network", "create", "-d", "fakenet", "--ipam-driver", "fakenet",
                  "--ipam-opt", "fake.fail=ipam says no", "failnet2", check=False)  # fmt: skip
    assert r2.returncode != 0 and "ipam says no" in r2.stderr
    record("cli_errors", {"driver": r.stderr.strip(), "ipam": r2.stderr.strip()})
    assert "failnet" not in d.networks_list() and "failnet2" not in d.networks_list()


# --------------------------------------------------------------------------------------------
# timing (the benchmark's baseline)


def test_run_rm_timing(dockerd: Dockerd) -> None:
    d = dockerd
    d.network_create("timenet", subnet="10.91.9.0/24")
    results = {
        "none": d.time_run_rm("none", n=10),
        "bridge (default docker0)": d.time_run_rm("bridge", n=10),
        "user-defined bridge": d.time_run_rm("timenet", n=10),
    }
    record("run_rm_timing", results)
    for name, r in results.items():
        print(
            f"docker run --rm true, {name}: median {r['median_s'] * 1000:.0f} ms "
            f"(min {r['min_s'] * 1000:.0f}, max {r['max_s'] * 1000:.0f}, n={r['n']})"
        )
        assert r["median_s"] < 10
    d.network_rm("timenet")


def test_iperf3_image(dockerd: Dockerd) -> None:
    """The throughput benchmark's image: iperf3 between two containers on Docker's bridge."""
    d = dockerd
    d.import_iperf3()
    d.network_create("perfnet", subnet="10.91.10.0/24")
    d.run("perf-server", "perfnet", "iperf3", "-s", image="plexus-iperf3:latest")
    d.run("perf-client", "perfnet", image="plexus-iperf3:latest")
    server = d.ip("perf-server", "perfnet")
    out = ""
    for _ in range(20):  # until the server listens
        r = d.exec("perf-client", "iperf3", "-c", server, "-t", "1", "-J", check=False,
                   timeout=30)  # fmt: skip
        out = r.stdout
        if r.returncode == 0:
            break
        d.exec("perf-client", "sleep", "0.2")
    result = json.loads(out)
    bps = result["end"]["sum_received"]["bits_per_second"]
    record("iperf3_bridge_1s_gbps", bps / 1e9)
    assert bps > 1e6
    d.rm("perf-server", "perf-client")
