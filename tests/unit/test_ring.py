"""HashRing: key placement must match the Go nodes exactly (design contract 3).

The real check is `test_agrees_with_go`, which builds tests/go/ring (a Go
transliteration of the seed's ConsistentHash and golang/groupcache's
consistenthash.Map) and compares owners on thousands of keys. The golden
vectors below were produced by that Go program, so agreement is still
checked on machines without a Go toolchain.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import zlib
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from appliance.cache.ring import SCHEMES, HashRing

GO_SRC = Path(__file__).resolve().parents[1] / "go" / "ring"

PEERS3 = ("127.0.0.1:9999", "127.0.0.1:10000", "127.0.0.1:10001")

# "127.0.0.1:1024" + "10" == "127.0.0.1:10241" + "0": with the seed scheme,
# one address that extends another by a digit shares virtual nodes with it
# (10 of 50 here), and the later node in the list owns the shared ones.
COLLIDING_PAIR = ("127.0.0.1:1024", "127.0.0.1:10241")


# --------------------------------------------------------------------------
# Golden vectors, from `go build ./tests/go/ring` (Go 1.19), replicas=50.
# --------------------------------------------------------------------------

GOLDEN = {
    "seed": [
        ("Tom", "127.0.0.1:10000"),
        ("Jack", "127.0.0.1:9999"),
        ("Sam", "127.0.0.1:10001"),
        ("张三", "127.0.0.1:9999"),
        ("李四", "127.0.0.1:10000"),
        ("😀", "127.0.0.1:9999"),
        ("e\u0301", "127.0.0.1:9999"),
        ("", "127.0.0.1:9999"),
        ("user:42", "127.0.0.1:9999"),
        ("127.0.0.1:99990", "127.0.0.1:9999"),
        ("x" * 1000, "127.0.0.1:10001"),
        ("🇨🇳 café", "127.0.0.1:10001"),
    ],
    "groupcache": [
        ("Tom", "127.0.0.1:10000"),
        ("Jack", "127.0.0.1:9999"),
        ("Sam", "127.0.0.1:10000"),
        ("张三", "127.0.0.1:9999"),
        ("李四", "127.0.0.1:10001"),
        ("😀", "127.0.0.1:9999"),
        ("e\u0301", "127.0.0.1:10000"),
        ("", "127.0.0.1:9999"),
        ("user:42", "127.0.0.1:10000"),
        ("127.0.0.1:99990", "127.0.0.1:9999"),
        ("x" * 1000, "127.0.0.1:10000"),
        ("🇨🇳 café", "127.0.0.1:10000"),
    ],
}

# (peer order, key, owner) for the seed scheme, also from the Go program.
# "127.0.0.1:102410" hashes exactly onto a shared virtual node.
GOLDEN_COLLISION = [
    (COLLIDING_PAIR, "127.0.0.1:102410", "127.0.0.1:10241"),
    (COLLIDING_PAIR, "127.0.0.1:102415", "127.0.0.1:10241"),
    (COLLIDING_PAIR, "127.0.0.1:10240", "127.0.0.1:1024"),
    (COLLIDING_PAIR[::-1], "127.0.0.1:102410", "127.0.0.1:1024"),
    (COLLIDING_PAIR[::-1], "127.0.0.1:102415", "127.0.0.1:1024"),
    (COLLIDING_PAIR[::-1], "127.0.0.1:10240", "127.0.0.1:1024"),
]


@pytest.mark.parametrize("scheme", SCHEMES)
def test_golden_vectors(scheme):
    ring = HashRing(PEERS3, scheme=scheme)
    for key, owner in GOLDEN[scheme]:
        assert ring.owner(key) == owner, key


@pytest.mark.parametrize(("peers", "key", "owner"), GOLDEN_COLLISION)
def test_golden_collision_later_node_wins(peers, key, owner):
    assert HashRing(peers).owner(key) == owner


# --------------------------------------------------------------------------
# Small known cases and API behaviour.
# --------------------------------------------------------------------------


def vnode_hashes(nodes, replicas=50, scheme="seed"):
    fmt = (lambda n, i: n + str(i)) if scheme == "seed" else (lambda n, i: str(i) + n)
    return [zlib.crc32(fmt(n, i).encode()) for n in nodes for i in range(replicas)]


def test_defaults():
    ring = HashRing(PEERS3)
    assert ring.replicas == 50
    assert ring.scheme == "seed"
    assert ring.nodes == PEERS3
    assert len(ring) == 3
    assert "127.0.0.1:9999" in ring
    assert "127.0.0.1:1" not in ring
    assert [] not in ring  # unhashable: just "no"
    assert SCHEMES == ("seed", "groupcache")


def test_empty_ring_has_no_owner():
    ring = HashRing()
    assert len(ring) == 0
    assert ring.nodes == ()
    assert ring.owner("anything") is None
    assert ring.owner("") is None
    assert HashRing([], scheme="groupcache").owner("k") is None


def test_single_node_owns_everything():
    ring = HashRing(["127.0.0.1:9999"])
    for key in ["", "a", "张三", "😀", "x" * 10_000]:
        assert ring.owner(key) == "127.0.0.1:9999"


def test_accepts_any_iterable_and_keeps_order():
    ring = HashRing(p for p in reversed(PEERS3))
    assert ring.nodes == PEERS3[::-1]
    assert HashRing(iter(PEERS3)) == HashRing(PEERS3)


def test_duplicate_nodes_count_once():
    ring = HashRing(["a:1", "b:2", "a:1"])
    assert len(ring) == 2
    assert ring.nodes == ("a:1", "b:2", "a:1")
    assert {ring.owner(f"k{i}") for i in range(200)} <= {"a:1", "b:2"}


def test_replicas_one_exact_placement():
    # One virtual node each: ownership is decided by hand-computed hashes.
    nodes = ["n1", "n2", "n3"]
    points = sorted((zlib.crc32(f"{n}0".encode()), n) for n in nodes)
    ring = HashRing(nodes, replicas=1)
    for h, n in points:
        # A key hashing exactly onto a virtual node belongs to it (>=, not >).
        assert ring.owner(f"{n}0") == n
        assert zlib.crc32(f"{n}0".encode()) == h
    for i in range(500):
        key = f"key-{i}"
        kh = zlib.crc32(key.encode())
        expected = next((n for h, n in points if h >= kh), points[0][1])
        assert ring.owner(key) == expected


def test_wrap_around_to_first_virtual_node():
    ring = HashRing(PEERS3)
    hashes = sorted(vnode_hashes(PEERS3))
    lowest = next(n + str(i) for n in PEERS3 for i in range(50) if zlib.crc32((n + str(i)).encode()) == hashes[0])
    first_owner = ring.owner(lowest)  # the node of the lowest virtual node
    wrapped = [k for k in (f"w{i}" for i in range(20_000)) if zlib.crc32(k.encode()) > hashes[-1]]
    assert wrapped, "expected some keys above the highest virtual node"
    for key in wrapped:
        assert ring.owner(key) == first_owner


def test_key_equal_to_every_virtual_node_hash():
    for scheme in SCHEMES:
        ring = HashRing(PEERS3, scheme=scheme)
        for node in PEERS3:
            for i in range(50):
                vnode = node + str(i) if scheme == "seed" else str(i) + node
                assert ring.owner(vnode) == node, (scheme, vnode)


def test_deterministic_across_instances():
    keys = [f"user:{i}" for i in range(2000)]
    a = HashRing(PEERS3)
    b = HashRing(list(PEERS3))
    assert [a.owner(k) for k in keys] == [b.owner(k) for k in keys]
    assert a == b and hash(a) == hash(b)
    assert a != HashRing(PEERS3, scheme="groupcache")
    assert a != HashRing(PEERS3, replicas=49)
    assert "HashRing(" in repr(a)


def test_schemes_place_keys_differently():
    seed = HashRing(PEERS3, scheme="seed")
    gc = HashRing(PEERS3, scheme="groupcache")
    keys = [f"user:{i}" for i in range(2000)]
    differ = sum(seed.owner(k) != gc.owner(k) for k in keys)
    assert differ > len(keys) // 4


def test_seed_collision_makes_order_matter():
    a = HashRing(COLLIDING_PAIR)
    b = HashRing(COLLIDING_PAIR[::-1])
    shared = set(vnode_hashes(COLLIDING_PAIR[:1])) & set(vnode_hashes(COLLIDING_PAIR[1:]))
    assert len(shared) == 10
    keys = [f"k{i}" for i in range(20_000)]
    assert any(a.owner(k) != b.owner(k) for k in keys)


def test_is_immutable():
    ring = HashRing(PEERS3)
    with pytest.raises(AttributeError):
        ring.nodes = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        ring.extra = 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("replicas", [0, -1, 1.5, "50", True, None])
def test_rejects_bad_replicas(replicas):
    with pytest.raises(ValueError, match="replicas must be an integer >= 1"):
        HashRing(PEERS3, replicas=replicas)


def test_rejects_unknown_scheme():
    with pytest.raises(ValueError, match=r"unknown ring scheme 'ketama'.*seed, groupcache"):
        HashRing(PEERS3, scheme="ketama")


def test_rejects_single_string_and_non_str_nodes():
    with pytest.raises(TypeError, match="iterable of node names"):
        HashRing("127.0.0.1:9999")
    with pytest.raises(TypeError, match="must be str"):
        HashRing(["127.0.0.1:9999", 10000])


# --------------------------------------------------------------------------
# Rebalancing.
# --------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
def test_adding_fifth_node_moves_about_a_fifth(scheme):
    four = [f"127.0.0.1:{9999 + i}" for i in range(4)]
    new = "127.0.0.1:10003"
    before = HashRing(four, scheme=scheme)
    after = HashRing([*four, new], scheme=scheme)
    keys = [f"key-{i}" for i in range(10_000)]
    moved = [k for k in keys if before.owner(k) != after.owner(k)]
    assert 0.12 <= len(moved) / len(keys) <= 0.30
    assert all(after.owner(k) == new for k in moved)


# --------------------------------------------------------------------------
# Property-based tests.
# --------------------------------------------------------------------------

addresses = st.builds(
    "{}.{}.{}.{}:{}".format,
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(0, 255),
    st.integers(1, 65535),
)
node_names = st.one_of(addresses, st.text(min_size=1, max_size=16))
node_lists = st.lists(node_names, min_size=1, max_size=8, unique=True)
keys = st.text(max_size=40)
schemes = st.sampled_from(SCHEMES)
replica_counts = st.integers(1, 60)


def reference_owner(nodes, replicas, scheme, key):
    """Plain reading of the Go code: map overwrite, then a linear scan."""
    owner_of = {}
    for h, n in zip(vnode_hashes(nodes, replicas, scheme), (n for n in nodes for _ in range(replicas)), strict=True):
        owner_of[h] = n
    ring = sorted(vnode_hashes(nodes, replicas, scheme))
    kh = zlib.crc32(key.encode())
    for h in ring:
        if h >= kh:
            return owner_of[h]
    return owner_of[ring[0]]


@given(node_lists, replica_counts, schemes, st.lists(keys, max_size=20))
def test_prop_owner_is_a_member(nodes, replicas, scheme, ks):
    ring = HashRing(nodes, replicas=replicas, scheme=scheme)
    for key in ks:
        assert ring.owner(key) in nodes


@given(
    # Digit-extended names force the seed scheme's shared virtual nodes.
    st.lists(st.sampled_from(["h:1", "h:10", "h:11", "h:12", "h:103", "1h", "21h"]), min_size=1, max_size=5),
    replica_counts,
    schemes,
    st.lists(keys, max_size=20),
)
def test_prop_matches_reference_even_with_collisions(nodes, replicas, scheme, ks):
    ring = HashRing(nodes, replicas=replicas, scheme=scheme)
    for key in ks + [nodes[0] + "1", "1" + nodes[-1]]:
        assert ring.owner(key) == reference_owner(nodes, replicas, scheme, key)


@given(st.data(), node_lists, replica_counts, schemes, st.lists(keys, min_size=1, max_size=20))
def test_prop_order_only_matters_on_collisions(data, nodes, replicas, scheme, ks):
    hashes = vnode_hashes(nodes, replicas, scheme)
    assume(len(set(hashes)) == len(hashes))
    shuffled = data.draw(st.permutations(nodes))
    a = HashRing(nodes, replicas=replicas, scheme=scheme)
    b = HashRing(shuffled, replicas=replicas, scheme=scheme)
    for key in ks:
        assert a.owner(key) == b.owner(key)


@given(
    st.data(),
    st.lists(node_names, min_size=2, max_size=8, unique=True),
    replica_counts,
    schemes,
    st.lists(keys, min_size=1, max_size=30),
)
def test_prop_removing_a_node_only_moves_its_keys(data, nodes, replicas, scheme, ks):
    gone = data.draw(st.sampled_from(nodes))
    before = HashRing(nodes, replicas=replicas, scheme=scheme)
    after = HashRing([n for n in nodes if n != gone], replicas=replicas, scheme=scheme)
    for key in ks:
        old = before.owner(key)
        new = after.owner(key)
        assert new != gone
        if old != gone:
            assert new == old


@given(node_lists, node_names, replica_counts, schemes, st.lists(keys, min_size=1, max_size=30))
def test_prop_appending_a_node_only_moves_keys_to_it(nodes, extra, replicas, scheme, ks):
    assume(extra not in nodes)
    before = HashRing(nodes, replicas=replicas, scheme=scheme)
    after = HashRing([*nodes, extra], replicas=replicas, scheme=scheme)
    for key in ks:
        assert after.owner(key) in (before.owner(key), extra)


# --------------------------------------------------------------------------
# Agreement with Go.
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def go_ring(tmp_path_factory):
    """Path of the built tests/go/ring binary (built once per module)."""
    go = shutil.which("go")
    if go is None:
        pytest.skip("go toolchain not installed (apt-get install golang-go)")
    tmp = tmp_path_factory.mktemp("go-ring")
    env = {
        **os.environ,
        "GO111MODULE": "off",  # stdlib only: no go.mod, no network
        "GOFLAGS": "",
        "GOCACHE": str(tmp / "cache"),
        "GOPATH": str(tmp / "gopath"),
        "GOTOOLCHAIN": "local",
        "CGO_ENABLED": "0",
    }
    binary = tmp / "ring"
    proc = subprocess.run(
        [go, "build", "-o", str(binary), "main.go"],
        cwd=GO_SRC,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"go build failed:\n{proc.stderr}"
    return binary


def go_owners(binary, scheme, replicas, peers, ks):
    lines = [scheme, str(replicas), str(len(peers))]
    lines += [p.encode().hex() for p in peers]
    lines += [k.encode().hex() for k in ks]
    proc = subprocess.run(
        [str(binary)],
        input="\n".join(lines) + "\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout.splitlines()
    assert len(out) == len(ks)
    return [None if o == "!" else bytes.fromhex(o).decode() for o in out]


def agreement_keys():
    """5,000+ keys: random mixes of scripts plus hand-picked edge cases."""
    rng = random.Random(20240607)
    edge = [
        "",
        " ",
        "\t",
        "\n",
        "\r\n",
        "\x00",
        "\x7f",
        "a",
        "Tom",
        "user:0",
        "张三",
        "李四",
        "王五",
        "北京市朝阳区",
        "😀",
        "👨‍👩‍👧‍👦",
        "🇨🇳",
        "🏳️‍🌈",
        "e\u0301",
        "é",
        "A\u030a",
        "Å",
        "\ufeff",
        "\u200b",
        "ﬁ",
        "ß",
        "İ",
        "مرحبا",
        "שלום",
        "नमस्ते",
        "Ελληνικά",
        "Привет",
        "\U0010ffff",
        "x" * 1000,
        "长" * 5000,
        "😀" * 3000,
        "k" * 100_000,
        "127.0.0.1:9999",
        "127.0.0.1:99990",
        "0127.0.0.1:9999",
    ]
    pools = [
        lambda: f"user:{rng.randrange(10**9)}",
        lambda: "".join(chr(rng.randrange(0x20, 0x7F)) for _ in range(rng.randrange(1, 40))),
        lambda: "".join(chr(rng.randrange(0x4E00, 0xA000)) for _ in range(rng.randrange(1, 8))),
        lambda: "".join(chr(rng.randrange(0x1F300, 0x1FB00)) for _ in range(rng.randrange(1, 6))),
        lambda: "".join(rng.choice("aeiou") + chr(rng.randrange(0x300, 0x370)) for _ in range(rng.randrange(1, 6))),
        lambda: "".join(
            chr(rng.choice([rng.randrange(1, 0xD800), rng.randrange(0xE000, 0x110000)]))
            for _ in range(rng.randrange(1, 12))
        ),
    ]
    random_keys = [rng.choice(pools)() for _ in range(5200)]
    return edge + random_keys


def vnode_keys(peers, replicas):
    # Keys hashing exactly onto virtual nodes exercise sort.Search's ">=".
    return [f(n, i) for n in peers for i in range(replicas) for f in (lambda n, i: n + str(i), lambda n, i: str(i) + n)]


PEER_LISTS = {
    "none": (),
    "1": ("127.0.0.1:9999",),
    "3": PEERS3,
    "4": tuple(f"10.0.0.{i}:9999" for i in range(1, 5)),
    "8": (
        "127.0.0.1:9999",
        "127.0.0.1:10000",
        "192.168.1.20:6324",
        "192.168.1.21:6324",
        "cache-1.internal:8080",
        "cache-2.internal:8080",
        "[::1]:9999",
        "10.0.0.1:80",
    ),
    "collide": COLLIDING_PAIR,
    "collide-reversed": COLLIDING_PAIR[::-1],
}

CASES = [(name, scheme, 50) for name in PEER_LISTS for scheme in SCHEMES]
CASES += [("3", scheme, r) for scheme in SCHEMES for r in (1, 7, 200)]


@pytest.mark.parametrize(("peers_name", "scheme", "replicas"), CASES)
def test_agrees_with_go(go_ring, peers_name, scheme, replicas):
    peers = PEER_LISTS[peers_name]
    ks = agreement_keys() + vnode_keys(peers, replicas)
    ring = HashRing(peers, replicas=replicas, scheme=scheme)
    expected = go_owners(go_ring, scheme, replicas, peers, ks)
    mismatches = [(k[:40], o, e) for k, o, e in zip(ks, map(ring.owner, ks), expected, strict=True) if o != e]
    assert not mismatches, f"{len(mismatches)} of {len(ks)} keys disagree, e.g. {mismatches[:5]}"

    if peers:
        # The key set must really reach both edges of the ring.
        top = max(vnode_hashes(peers, replicas, scheme))
        assert any(zlib.crc32(k.encode()) > top for k in ks), "no key wrapped around"
        assert len(set(expected)) == len(set(peers))


def test_go_golden_vectors_still_hold(go_ring):
    # Guards the hard-coded vectors above against drift in the Go program.
    for scheme in SCHEMES:
        ks = [k for k, _ in GOLDEN[scheme]]
        assert go_owners(go_ring, scheme, 50, PEERS3, ks) == [o for _, o in GOLDEN[scheme]]
    for peers, key, owner in GOLDEN_COLLISION:
        assert go_owners(go_ring, "seed", 50, peers, [key]) == [owner]


def test_shares_cover_the_key_space_and_match_owned_keys():
    from appliance.cache.ring import HashRing

    ring = HashRing([f"127.0.0.1:{9000 + i}" for i in range(3)], 50)
    shares = ring.shares()
    assert abs(sum(shares.values()) - 1.0) < 1e-9
    counts = dict.fromkeys(shares, 0)
    for i in range(30000):
        counts[ring.owner(f"key-{i}")] += 1
    for node, share in shares.items():
        assert abs(counts[node] / 30000 - share) < 0.02
    assert HashRing([], 50).shares() == {}


def test_balance_warning_past_limit_names_the_remedy():
    from appliance.cache.ring import balance_warning

    assert balance_warning({"a": 0.34, "b": 0.33, "c": 0.33}, 50) is None
    warning = balance_warning({"a": 0.5, "b": 0.25, "c": 0.25}, 50)
    assert warning is not None and "1.50x" in warning and "replicas" in warning
    assert balance_warning({"a": 1.0}, 50) is None
