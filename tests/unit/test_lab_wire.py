"""Frames and rules the lab builds: gratuitous ARP bytes and nftables text."""

from __future__ import annotations

import pytest

from netsvc.lab.faults import loss_rule, partition_rules
from netsvc.lab.garp import announcement

# An ARP announcement of 198.18.1.101 at 02:4e:56:01:00:01, as tcpdump -xx shows it.
GOLDEN_GARP = bytes.fromhex(
    "ffffffffffff024e56010001"  # broadcast destination, the VM's MAC
    "0806"  # ARP
    "0001080006040001"  # Ethernet/IPv4, request
    "024e56010001c6120165"  # sender MAC and IP
    "000000000000c6120165"  # target MAC zero, target IP = sender IP
)


def test_garp_matches_golden_bytes() -> None:
    assert announcement("02:4e:56:01:00:01", "198.18.1.101") == GOLDEN_GARP
    assert len(GOLDEN_GARP) == 42


def test_garp_decodes_with_scapy() -> None:
    from scapy.layers.l2 import ARP, Ether

    pkt = Ether(GOLDEN_GARP)
    assert pkt[ARP].op == 1 and pkt[ARP].psrc == pkt[ARP].pdst == "198.18.1.101"
    assert pkt[ARP].hwsrc == "02:4e:56:01:00:01" and pkt.dst == "ff:ff:ff:ff:ff:ff"


@pytest.mark.parametrize("mac", ["02:4e:56", "zz:00:00:00:00:00", "", "ff:ff:ff:ff:ff:ff"])
def test_bad_mac(mac: str) -> None:
    with pytest.raises(ValueError):
        announcement(mac, "198.18.1.101")


def test_loss_rule_text() -> None:
    text = loss_rule("netsvc_nvab", "loss_1_0_ingress", "nvabs1-eth3", "ingress", 0.25)
    assert "hook ingress device nvabs1-eth3" in text
    assert "numgen random mod 1000000 < 250000 drop" in text


@pytest.mark.parametrize("rate", [-0.1, 1.1])
def test_loss_rule_rejects_bad_rate(rate: float) -> None:
    with pytest.raises(ValueError, match="loss rate"):
        loss_rule("t", "c", "d", "ingress", rate)


def test_partition_rules_drop_both_directions() -> None:
    text = partition_rules("t", "p1", ["a1", "a2"], ["b1"])
    assert "iifname { a1, a2 } oifname { b1 } drop" in text
    assert "iifname { b1 } oifname { a1, a2 } drop" in text
    with pytest.raises(ValueError):
        partition_rules("t", "p1", [], ["b1"])
