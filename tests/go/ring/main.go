// Command ring is the Go reference for tests/unit/test_ring.py.
//
// It transliterates two Go consistent-hash rings so that the Python ring in
// appliance/cache/ring.py can be checked against real Go semantics
// (crc32.ChecksumIEEE, map overwrite on collisions, sort.Ints, sort.Search):
//
//   - "seed":       the seed's ConsistentHash (AddTruthNode / GetTruthNode),
//     virtual node i of node N hashed as N + strconv.Itoa(i);
//   - "groupcache": golang/groupcache consistenthash.Map (Add / Get),
//     hashed as strconv.Itoa(i) + N. Upstream's newer prefix table is only
//     a lookup shortcut over the same sorted keys, so it is left out.
//
// Input on stdin, one item per line:
//
//	scheme
//	replicas
//	number of peers P
//	P lines: hex of each peer name
//	remaining lines: hex of each key
//
// Output: one line per key, the hex of its owner, or "!" when the ring is
// empty. Hex keeps arbitrary keys (newlines, NUL, long strings) line-safe.
package main

import (
	"bufio"
	"encoding/hex"
	"fmt"
	"hash/crc32"
	"os"
	"sort"
	"strconv"
)

// ConsistentHash mirrors the seed's ring: ring []int, hashmap map[int]string.
type ConsistentHash struct {
	replicas int
	seed     bool // true: node + i (seed); false: i + node (groupcache)
	ring     []int
	hashmap  map[int]string
}

func NewConsistentHash(replicas int, seed bool) *ConsistentHash {
	return &ConsistentHash{replicas: replicas, seed: seed, hashmap: make(map[int]string)}
}

func (c *ConsistentHash) AddTruthNode(nodes ...string) {
	for _, node := range nodes {
		for i := 0; i < c.replicas; i++ {
			var vnode string
			if c.seed {
				vnode = node + strconv.Itoa(i)
			} else {
				vnode = strconv.Itoa(i) + node
			}
			h := int(crc32.ChecksumIEEE([]byte(vnode)))
			c.ring = append(c.ring, h)
			c.hashmap[h] = node
		}
	}
	sort.Ints(c.ring)
}

func (c *ConsistentHash) IsEmpty() bool { return len(c.ring) == 0 }

func (c *ConsistentHash) GetTruthNode(key string) string {
	if c.IsEmpty() {
		return ""
	}
	h := int(crc32.ChecksumIEEE([]byte(key)))
	idx := sort.Search(len(c.ring), func(i int) bool { return c.ring[i] >= h })
	return c.hashmap[c.ring[idx%len(c.ring)]]
}

func fail(format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "ring: "+format+"\n", args...)
	os.Exit(2)
}

func main() {
	in := bufio.NewScanner(os.Stdin)
	in.Buffer(make([]byte, 1<<20), 64<<20)
	next := func(what string) string {
		if !in.Scan() {
			if err := in.Err(); err != nil {
				fail("reading %s: %v", what, err)
			}
			fail("missing %s", what)
		}
		return in.Text()
	}
	unhex := func(s string) string {
		b, err := hex.DecodeString(s)
		if err != nil {
			fail("bad hex %q: %v", s, err)
		}
		return string(b)
	}

	scheme := next("scheme")
	if scheme != "seed" && scheme != "groupcache" {
		fail("unknown scheme %q", scheme)
	}
	replicas, err := strconv.Atoi(next("replicas"))
	if err != nil || replicas < 1 {
		fail("bad replicas: %v", err)
	}
	npeers, err := strconv.Atoi(next("peer count"))
	if err != nil || npeers < 0 {
		fail("bad peer count: %v", err)
	}
	peers := make([]string, npeers)
	for i := range peers {
		peers[i] = unhex(next("peer"))
	}

	ch := NewConsistentHash(replicas, scheme == "seed")
	if npeers > 0 {
		ch.AddTruthNode(peers...)
	}

	out := bufio.NewWriter(os.Stdout)
	defer out.Flush()
	for in.Scan() {
		key := unhex(in.Text())
		if ch.IsEmpty() {
			out.WriteString("!\n")
			continue
		}
		out.WriteString(hex.EncodeToString([]byte(ch.GetTruthNode(key))))
		out.WriteByte('\n')
	}
	if err := in.Err(); err != nil {
		fail("reading keys: %v", err)
	}
}
