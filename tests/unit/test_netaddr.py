"""Who a client is: its quota key, and X-Forwarded-For believed only from trusted proxies.

The worker and the coordinator both call these (``sandrun.netaddr``).
"""

from __future__ import annotations

import pytest

from sandrun.netaddr import client_key, parse_trusted_proxies, trusted_client_address

# -- client keys ------------------------------------------------------------------------------


def test_ipv4_addresses_are_their_own_key() -> None:
    assert client_key("203.0.113.5") == "203.0.113.5"
    assert client_key("203.0.113.5") != client_key("203.0.113.6")


def test_ipv6_addresses_in_one_slash_64_share_a_key() -> None:
    a = client_key("2001:db8:1:2::1")
    b = client_key("2001:db8:1:2:ffff:ffff:ffff:ffff")

    assert a == b == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != a
    assert client_key("fe80::1%eth0") == "fe80::/64"


def test_an_ipv4_mapped_ipv6_address_is_the_ipv4_address() -> None:
    assert client_key("::ffff:127.0.0.2") == client_key("127.0.0.2") == "127.0.0.2"


def test_something_that_is_not_an_address_is_its_own_key() -> None:
    assert client_key("unix:/run/sandrun.sock") == "unix:/run/sandrun.sock"


# -- trusted proxies --------------------------------------------------------------------------


PROXIES = ("10.0.0.1", "10.9.0.0/16", "2001:db8:ffff::/48")


def test_a_trusted_proxy_s_forwarded_for_names_the_client() -> None:
    assert trusted_client_address("10.0.0.1", "203.0.113.7", PROXIES) == "203.0.113.7"


def test_a_forged_forwarded_for_from_an_untrusted_peer_is_ignored() -> None:
    assert trusted_client_address("198.51.100.2", "203.0.113.7", PROXIES) == "198.51.100.2"
    assert trusted_client_address("10.0.0.2", "203.0.113.7", PROXIES) == "10.0.0.2"


def test_no_trusted_proxies_means_the_header_is_never_read() -> None:
    assert trusted_client_address("10.0.0.1", "203.0.113.7", ()) == "10.0.0.1"


def test_the_right_most_untrusted_hop_is_charged_not_what_the_client_wrote() -> None:
    header = "192.0.2.66, 203.0.113.7, 10.9.4.4"

    assert trusted_client_address("10.0.0.1", header, PROXIES) == "203.0.113.7"


def test_trusted_proxies_may_be_cidr_networks_of_either_family() -> None:
    assert trusted_client_address("10.9.200.3", "203.0.113.7", PROXIES) == "203.0.113.7"
    assert trusted_client_address("10.10.0.1", "203.0.113.7", PROXIES) == "10.10.0.1"
    assert trusted_client_address("2001:db8:ffff:1::9", "2001:db8:5::1", PROXIES) == (
        "2001:db8:5::1"
    )
    assert trusted_client_address("::ffff:10.0.0.1", "203.0.113.7", PROXIES) == "203.0.113.7"


def test_a_garbled_or_missing_header_from_a_trusted_proxy_charges_the_proxy() -> None:
    assert trusted_client_address("10.0.0.1", None, PROXIES) == "10.0.0.1"
    assert trusted_client_address("10.0.0.1", "", PROXIES) == "10.0.0.1"
    assert trusted_client_address("10.0.0.1", " , ", PROXIES) == "10.0.0.1"
    assert trusted_client_address("10.0.0.1", "not-an-ip", PROXIES) == "10.0.0.1"
    assert trusted_client_address("10.0.0.1", "203.0.113.7, unknown", PROXIES) == "10.0.0.1"
    assert trusted_client_address("10.0.0.1", "[2001:db8::1", PROXIES) == "10.0.0.1"


def test_forwarded_hops_with_ports_are_understood() -> None:
    assert trusted_client_address("10.0.0.1", "203.0.113.7:4711", PROXIES) == "203.0.113.7"
    assert trusted_client_address("10.0.0.1", "[2001:db8::7]:443", PROXIES) == "2001:db8::7"
    assert trusted_client_address("10.0.0.1", "203.0.113.7:http", PROXIES) == "10.0.0.1"


def test_when_every_hop_is_a_trusted_proxy_the_left_most_is_charged() -> None:
    assert trusted_client_address("10.0.0.1", "10.9.0.5, 10.9.0.6", PROXIES) == "10.9.0.5"


def test_a_bad_trusted_proxy_entry_is_a_configuration_error() -> None:
    with pytest.raises(ValueError):
        parse_trusted_proxies(("10.0.0.1", "proxy.example"))
