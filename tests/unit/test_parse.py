"""Input parsing: every bad value gives one InvalidArgument naming the field and the value."""

from __future__ import annotations

import ipaddress

import pytest

from plexus.errors import InvalidArgument
from plexus.model import parse
from plexus.model.types import PortMapping


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("8080:80", PortMapping(8080, 80)),
        ("8080:80/udp", PortMapping(8080, 80, "udp")),
        ("127.0.0.1:8080:80", PortMapping(8080, 80, host_ip=ipaddress.ip_address("127.0.0.1"))),
        ("0.0.0.0:8080:80", PortMapping(8080, 80)),
        ("[::1]:8080:80", PortMapping(8080, 80, host_ip=ipaddress.ip_address("::1"))),
        ("8000-8002:80", PortMapping(8000, 80, host_port_end=8002)),
        ("8000-8002:90-92", PortMapping(8000, 90, host_port_end=8002, container_port_end=92)),
    ],
)
def test_port_specs_that_parse(spec: str, expected: PortMapping) -> None:
    assert parse.port_mapping(spec) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "80",
        "x:80",
        "8080:80/sctp",
        "70000:80",
        "0:80",
        "9-8:80",
        "8000-8002:90-91",
        "1.2.3:80:80",
        "1-2000:80",
    ],
)
def test_malformed_port_specs_name_the_field_and_value(spec: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse.port_mapping(spec)
    assert err.value.field == "publish"
    assert spec in str(err.value)


def test_range_pairs_map_element_wise_or_onto_one_port() -> None:
    assert parse.port_mapping("8000-8002:90-92").pairs() == [(8000, 90), (8001, 91), (8002, 92)]
    assert parse.port_mapping("8000-8001:80").pairs() == [(8000, 80), (8001, 80)]


def test_port_overlap_considers_host_ip_protocol_and_range() -> None:
    a = parse.port_mapping("8000-8010:80")
    assert parse.port_overlap(a, parse.port_mapping("8005:80"))
    assert not parse.port_overlap(a, parse.port_mapping("8005:80/udp"))
    assert parse.port_overlap(a, parse.port_mapping("127.0.0.1:8010:80"))
    b = parse.port_mapping("127.0.0.1:9000:80")
    assert not parse.port_overlap(b, parse.port_mapping("203.0.113.1:9000:80"))


@pytest.mark.parametrize("value", ["", "-x", "a b", "a/b", "x" * 65])
def test_bad_names(value: str) -> None:
    with pytest.raises(InvalidArgument, match="name"):
        parse.name("name", value)


def test_cidr_with_host_bits_is_rejected() -> None:
    with pytest.raises(InvalidArgument, match="subnet '10.0.0.1/24'"):
        parse.cidr("subnet", "10.0.0.1/24")


def test_labels() -> None:
    assert parse.labels(["a=b", "c="]) == {"a": "b", "c": ""}
    with pytest.raises(InvalidArgument, match="label 'oops'"):
        parse.labels(["oops"])
