"""Human-written quantities (dpkfac.core.units): link rates as tc writes them, and the payload
rate TCP gets on such a link."""
from __future__ import annotations

import pytest

from dpkfac.core.errors import InputError
from dpkfac.core.units import TCP_PAYLOAD_FRACTION, parse_link_rate, payload_bytes_per_s


@pytest.mark.parametrize("text, bytes_per_s", [("100mbit", 12.5e6), ("25gbit", 3.125e9),
                                               ("800kbit", 1e5), ("1.5Gbit", 1.875e8)])
def test_link_rates_are_bits_per_second_as_tc_writes_them(text, bytes_per_s):
    assert parse_link_rate(text) == pytest.approx(bytes_per_s)


@pytest.mark.parametrize("text", ["fast", "100", "0mbit", "-1gbit", "100mbps"])
def test_a_malformed_link_rate_is_an_input_error_that_names_the_flag(text):
    with pytest.raises(InputError, match="--link-rate"):
        payload_bytes_per_s(text, what="--link-rate")


def test_the_payload_rate_leaves_out_the_headers_of_each_full_frame():
    # 1448 bytes of data in a 1514-byte frame: TCP with timestamps, IPv4, Ethernet, MTU 1500
    assert TCP_PAYLOAD_FRACTION == pytest.approx((1500 - 20 - 32) / (1500 + 14))
    assert payload_bytes_per_s("100mbit") == pytest.approx(11.955e6, rel=1e-3)
