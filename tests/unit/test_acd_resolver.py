"""Who yields a conflicting address (the safety rules and the policy), and the address pool."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from netsvc.acd.resolver import (
    DEFAULT_POLICY,
    AddressPool,
    Claimant,
    Decision,
    YieldPolicy,
    choose_loser,
)

IP = "198.18.1.20"
SERVING = Claimant("02:4e:56:01:00:01", 100.0, vm="web-1")
CLONE = Claimant("02:4e:56:01:00:02", 5000.0, vm="web-1-clone")
PHYS = Claimant("00:1b:21:aa:bb:cc", 4000.0)
DB = Claimant("02:4e:56:01:00:03", 7000.0, vm="db-1", protected=True)


def test_freshly_cloned_vm_yields() -> None:
    d = choose_loser(IP, [SERVING, CLONE])
    assert d.ok and d.loser == CLONE and d.winner == SERVING and d.refused is None
    assert d.rule == "newest"
    assert "web-1-clone" in d.reason and "yields" in d.reason and IP in d.reason
    assert "4900.0 s after" in d.reason and "keeps it" in d.reason
    assert choose_loser(IP, [CLONE, SERVING]) == d  # order of the input does not matter


def test_managed_vm_yields_to_a_physical_device() -> None:
    older_vm = Claimant("02:4e:56:01:00:09", 1.0, vm="old")
    d = choose_loser(IP, [PHYS, older_vm])
    assert d.loser == older_vm and d.winner == PHYS and d.rule == "managed"
    assert "not managed" in d.reason


def test_protected_never_yields() -> None:
    d = choose_loser(IP, [DB, SERVING])  # DB is newer but protected
    assert d.loser == SERVING and d.winner == DB and d.rule == "protected"
    assert "protected" in d.reason


@pytest.mark.parametrize(
    ("claimants", "refusal"),
    [
        ([DB, Claimant("02:4e:56:01:00:04", 1.0, vm="x", protected=True)],
         "both claimants are protected"),
        ([PHYS, Claimant("00:1b:21:aa:bb:cd", 1.0)],
         "no managed VM among the claimants: an unmanaged device cannot be moved"),
        ([PHYS, DB], "every managed VM among the claimants is protected"),
        ([PHYS, DB, Claimant("00:1b:21:aa:bb:cd", 1.0, protected=True)],
         "every managed VM among the claimants is protected"),
        ([SERVING], "fewer than two claimants"),
        ([], "fewer than two claimants"),
    ],
)
def test_refusals(claimants: list[Claimant], refusal: str) -> None:
    d = choose_loser(IP, claimants)
    assert not d.ok and d.loser is None and d.winner is None
    assert d.refused is not None and d.refused.startswith(refusal)
    assert d.refused in d.reason and d.reason.startswith(IP)


def test_oldest_yields_policy() -> None:
    d = choose_loser(IP, [SERVING, CLONE], YieldPolicy.oldest_yields())
    assert d.loser == SERVING and d.rule == "oldest" and "oldest yields" in d.reason
    # The safety rules still hold: the protected one stays, the device cannot move.
    d = choose_loser(IP, [SERVING, DB, PHYS], YieldPolicy.oldest_yields())
    assert d.loser == SERVING


def test_rule_order_is_configurable() -> None:
    # "newest" before "managed": among a VM and a device, the newer yields if it can...
    policy = YieldPolicy(rules=("protected", "newest", "managed"))
    vm_new = Claimant("02:4e:56:01:00:0a", 9000.0, vm="new")
    assert choose_loser(IP, [PHYS, vm_new], policy).loser == vm_new
    # ...and when the newer one is a device, which cannot move, the VM still yields.
    d = choose_loser(IP, [PHYS, SERVING], policy)
    assert d.loser == SERVING and "cannot yield" in d.reason


def test_three_claimants() -> None:
    d = choose_loser(IP, [SERVING, CLONE, PHYS])
    assert d.loser == CLONE and d.winner == PHYS  # PHYS ranks last in the yield order


def test_ties_are_refused() -> None:
    twin = Claimant("02:4e:56:01:00:0b", CLONE.first_claimed, vm="twin")
    d = choose_loser(IP, [CLONE, twin])
    assert not d.ok and d.refused is not None and "cannot choose" in d.refused
    close = Claimant("02:4e:56:01:00:0b", CLONE.first_claimed + 0.5, vm="close")
    assert choose_loser(IP, [CLONE, close]).loser == close
    assert not choose_loser(IP, [CLONE, close], YieldPolicy(tie_window=1.0)).ok


def test_validation() -> None:
    with pytest.raises(ValueError, match="invalid IPv4"):
        choose_loser("198.18.1", [SERVING, CLONE])
    with pytest.raises(ValueError, match="more than once"):
        choose_loser(IP, [SERVING, Claimant(SERVING.mac.upper(), 3.0, vm="x")])
    with pytest.raises(ValueError, match="claimant"):
        Claimant("nope", 1.0)
    with pytest.raises(ValueError, match="first_claimed"):
        Claimant(SERVING.mac, float("inf"))
    with pytest.raises(ValueError, match="unknown yield rule"):
        YieldPolicy(rules=("protected", "loudest"))
    with pytest.raises(ValueError, match="both"):
        YieldPolicy(rules=("newest", "oldest"))
    with pytest.raises(ValueError, match="repeat"):
        YieldPolicy(rules=("newest", "newest"))
    with pytest.raises(ValueError, match="tie_window"):
        YieldPolicy(tie_window=-1)
    assert YieldPolicy.default() == DEFAULT_POLICY


_claimant = st.builds(
    Claimant,
    mac=st.integers(1, 40).map(lambda i: f"02:00:00:00:00:{i:02x}"),
    first_claimed=st.integers(0, 20).map(float),
    vm=st.none() | st.sampled_from(["a", "b", "c"]),
    protected=st.booleans(),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_claimant, min_size=2, max_size=5, unique_by=lambda c: c.mac),
    st.sampled_from([YieldPolicy(), YieldPolicy.oldest_yields(), YieldPolicy(rules=("newest",)),
                     YieldPolicy(rules=())]),
)
def test_safety_rules_always_hold(claimants: list[Claimant], policy: YieldPolicy) -> None:
    d = choose_loser(IP, claimants, policy)
    assert isinstance(d, Decision) and d.reason
    if d.loser is None:
        assert d.refused and d.winner is None
    else:
        assert d.loser.vm is not None and not d.loser.protected
        assert d.winner is not None and d.winner != d.loser and d.refused is None
    for perm in itertools.islice(itertools.permutations(claimants), 6):
        assert choose_loser(IP, list(perm), policy).loser == d.loser


# -- AddressPool -------------------------------------------------------------------------------


def take(it: Iterator[str], n: int) -> list[str]:
    return list(itertools.islice(it, n))


def test_pool_whole_network() -> None:
    pool = AddressPool("198.18.1.0/29", exclude={"198.18.1.1"})
    assert list(pool.candidates()) == [f"198.18.1.{i}" for i in (2, 3, 4, 5, 6)]
    assert list(pool.candidates({"198.18.1.3", "198.18.1.5"})) == [
        "198.18.1.2", "198.18.1.4", "198.18.1.6"
    ]
    assert len(pool) == 5
    assert "198.18.1.2" in pool and "198.18.1.0" not in pool and "198.18.1.7" not in pool
    assert "198.18.1.1" not in pool and "10.0.0.1" not in pool and "junk" not in pool


def test_pool_ranges_in_given_order() -> None:
    pool = AddressPool(
        "198.18.1.0/24",
        ranges=[("198.18.1.200", "198.18.1.202"), ("198.18.1.250", "198.18.1.255")],
        exclude={"198.18.1.201"},
    )
    assert list(pool.candidates({"198.18.1.250"})) == [
        "198.18.1.200", "198.18.1.202", "198.18.1.251", "198.18.1.252", "198.18.1.253",
        "198.18.1.254",  # .255 is the broadcast address
    ]


def test_pool_small_prefixes() -> None:
    assert list(AddressPool("198.18.1.0/31").candidates()) == ["198.18.1.0", "198.18.1.1"]
    assert list(AddressPool("198.18.1.7/32").candidates()) == ["198.18.1.7"]


def test_pool_is_lazy_on_big_networks() -> None:
    pool = AddressPool("10.0.0.0/8")
    assert take(pool.candidates({"10.0.0.1"}), 3) == ["10.0.0.2", "10.0.0.3", "10.0.0.4"]
    assert len(pool) == 2**24 - 2


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cidr": "198.18.1.5/24"}, "invalid CIDR '198.18.1.5/24'"),
        ({"cidr": "198.18.1.0/33"}, "invalid CIDR"),
        ({"cidr": "banana"}, "invalid CIDR 'banana'"),
        ({"cidr": "2001:db8::/64"}, "invalid CIDR"),
        ({"cidr": "198.18.1.0/24", "ranges": [("198.18.2.1", "198.18.2.9")]}, "not in"),
        ({"cidr": "198.18.1.0/24", "ranges": [("198.18.1.9", "198.18.1.1")]}, "after the last"),
        ({"cidr": "198.18.1.0/24", "ranges": [("198.18.1.1", "198.18.1.9"),
                                               ("198.18.1.5", "198.18.1.20")]}, "overlaps"),
        ({"cidr": "198.18.1.0/24", "ranges": [("198.18.1.1",)]}, "pair"),
        ({"cidr": "198.18.1.0/24", "exclude": {"198.18.9.1"}}, "excluded address"),
        ({"cidr": "198.18.1.0/24", "exclude": {"x"}}, "excluded address"),
    ],
)
def test_pool_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        AddressPool(**kwargs)  # type: ignore[arg-type]


def test_pool_validates_in_use() -> None:
    pool = AddressPool("198.18.1.0/29")
    with pytest.raises(ValueError, match="in_use"):
        pool.candidates({"198.18.1"})
