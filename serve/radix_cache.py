"""Radix tree of token pages: the prefix cache over the engine's KV pool, with a host-RAM tier below it.

Every edge is one full page (page_size tokens): page granularity puts every possible split at a page boundary
anyway, and one node per page gives eviction, tiering and remote keys the page as their unit. A node's KV lives
on the device (`page`), in host RAM (`host`), or both; a node with neither is removed. Invariants (`check`):
- a node on the device has its parent on the device, so a match is a device run followed by a host-only run;
- a locked node (in use by a request) has locked ancestors and stays on the device while it is locked;
- the tree holds one allocator reference per device page it names.

Eviction takes least-recently-used unlocked device leaves: their page is copied to the host tier when there is
room there (host-only leaves are evicted, LRU, to make room), else the node and its host-only subtree go. A match
stops one token short of the prompt, so a full-prompt hit still recomputes the last token (whose logits start
decoding) and never writes into a shared page.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter

import numpy as np

from serve.host_tier import HostTier
from serve.page_allocator import PageAllocator
from serve.remote_tier import RemoteTier, chain


class Node:
    __slots__ = ("tokens", "parent", "children", "page", "host", "digest", "lock", "last_access", "in_remote",
                 "device_children")

    def __init__(self, tokens: tuple[int, ...], parent: Node | None, digest: bytes):
        self.tokens = tokens
        self.parent = parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.page: int | None = None  # device page id
        self.host: int | None = None  # host-tier slot
        self.digest = digest  # chained SHA-256 of the prefix through this page (the remote key)
        self.lock = 0
        self.last_access = 0
        self.in_remote = False
        self.device_children = 0


class RadixCache:
    def __init__(self, allocator: PageAllocator, page_size: int, root_digest: bytes, *, kv=None,
                 host: HostTier | None = None, remote: RemoteTier | None = None):
        """kv: the engine's PagedKVCache (read_pages / write_pages), needed with a host or remote tier."""
        self.allocator, self.page_size = allocator, page_size
        self.kv, self.host, self.remote = kv, host if host is not None and host.capacity else None, remote
        self.root = Node((), None, root_digest)
        self._clock = itertools.count(1)
        self.num_nodes = 0
        self.num_device = 0
        self.num_evictable = 0  # unlocked nodes on the device: pages eviction can free
        self.stats = Counter()

    # ---- lookups -------------------------------------------------------------------------------------------

    def match(self, tokens, *, touch: bool = True) -> list[Node]:
        """Nodes for the longest cached page prefix of tokens[:-1] (device run, then host-only run); `touch`
        marks them used now (for LRU)."""
        ps, node, path = self.page_size, self.root, []
        now = next(self._clock)
        for lo in range(0, len(tokens) - ps, ps):
            node = node.children.get(tuple(tokens[lo : lo + ps]))
            if node is None:
                break
            if touch:
                node.last_access = now
            path.append(node)
        return path

    def digest_after(self, path: list[Node]) -> bytes:
        return path[-1].digest if path else self.root.digest

    # ---- locks ---------------------------------------------------------------------------------------------

    def lock(self, path: list[Node]) -> None:
        for n in path:
            if n.lock == 0 and n.page is not None:
                self.num_evictable -= 1
            n.lock += 1

    def unlock(self, path: list[Node]) -> None:
        now = next(self._clock)
        for n in path:
            assert n.lock > 0, "unlock of an unlocked node"
            n.lock -= 1
            n.last_access = now
            if n.lock == 0 and n.page is not None:
                self.num_evictable += 1

    # ---- device residency ----------------------------------------------------------------------------------

    def _set_page(self, n: Node, page: int | None) -> None:
        was = n.page is not None
        n.page = page
        now = page is not None
        if was != now:
            d = 1 if now else -1
            self.num_device += d
            if n.parent is not self.root:
                n.parent.device_children += d
            if n.lock == 0:
                self.num_evictable += d

    def load(self, path: list[Node]) -> int:
        """Brings the host-only nodes of a (locked) match back to the device, in order, as far as free pages
        allow; returns how many nodes of the path are on the device afterwards."""
        todo = [n for n in path if n.page is None]
        n_dev = len(path) - len(todo)
        if not todo:
            return n_dev
        todo = todo[: self.allocator.num_free]
        if not todo:
            return n_dev
        pages = self.allocator.allocate(len(todo))
        self.kv.write_pages(pages, self.host.load([n.host for n in todo]))
        for n, p in zip(todo, pages, strict=True):
            self._set_page(n, p)
        self.stats["host_loaded_pages"] += len(todo)
        return n_dev + len(todo)

    # ---- insertion -----------------------------------------------------------------------------------------

    def insert(self, tokens, pages: list[int], *, known_remote: range = range(0)) -> list[Node]:
        """Caches the full pages of `tokens`, whose KV sits in `pages` (one per full page, held by the caller,
        who keeps its own references). Existing nodes keep their page, nodes without a device page take the
        caller's. Pages with an index in `known_remote` came from the remote store; the others are written
        through to it unless already there. Returns the path, for the caller to lock."""
        ps, node, path = self.page_size, self.root, []
        now = next(self._clock)
        new: list[Node] = []
        for i in range(len(tokens) // ps):
            page_tokens = tuple(tokens[i * ps : (i + 1) * ps])
            child = node.children.get(page_tokens)
            if child is None:
                child = Node(page_tokens, node, chain(node.digest, page_tokens))
                node.children[page_tokens] = child
                self.num_nodes += 1
            if child.page is None:
                self.allocator.incref([pages[i]])
                self._set_page(child, pages[i])
            if i in known_remote:
                child.in_remote = True
            elif self.remote is not None and not child.in_remote:
                new.append(child)
            child.last_access = now
            path.append(child)
            node = child
        if new:
            self._write_remote(new)
        return path

    def _write_remote(self, nodes: list[Node]) -> None:
        data = self.kv.read_pages([n.page for n in nodes])  # the writer thread copies it out (see HostTier)
        if self.remote.put([n.digest for n in nodes], data):
            for n in nodes:
                n.in_remote = True
            self.stats["remote_written_pages"] += len(nodes)

    # ---- eviction ------------------------------------------------------------------------------------------

    def _device_leaves(self) -> list[tuple[int, int, Node]]:
        out, stack = [], [self.root]
        while stack:
            n = stack.pop()
            for c in n.children.values():
                if c.page is not None:
                    stack.append(c)
                    if c.lock == 0 and c.device_children == 0:
                        out.append((c.last_access, id(c), c))
        return out

    def evict(self, n_pages: int, *, spill: bool = True) -> int:
        """Frees up to n_pages device pages from LRU unlocked leaves, copying them to the host tier when
        `spill` and there is a host tier; returns how many it freed."""
        if n_pages <= 0:
            return 0
        heap = self._device_leaves()
        heapq.heapify(heap)
        victims: list[Node] = []
        going: Counter = Counter()  # parent id -> device children chosen so far
        while heap and len(victims) < n_pages:
            _, _, n = heapq.heappop(heap)
            victims.append(n)
            p = n.parent
            going[id(p)] += 1
            # the parent becomes a leaf once its last device child goes
            if p is not self.root and p.lock == 0 and going[id(p)] == p.device_children:
                heapq.heappush(heap, (p.last_access, id(p), p))
        if not victims:
            return 0
        spill_nodes = [n for n in victims if n.host is None] if spill and self.host is not None else []
        if spill_nodes:
            spill_nodes = spill_nodes[: self._make_host_room(len(spill_nodes))]
            if spill_nodes:
                slots = self.host.allocate(len(spill_nodes))
                # dispatched before the pages are freed, so a later step that reuses them runs after the copy
                self.host.store(slots, self.kv.read_pages([n.page for n in spill_nodes]))
                for n, s in zip(spill_nodes, slots, strict=True):
                    n.host = s
                self.stats["host_stored_pages"] += len(spill_nodes)
        freed_pages = []
        for n in victims:  # children before parents: a parent is queued only after its device children
            freed_pages.append(n.page)
            self._set_page(n, None)
            if n.host is None:
                self._remove_subtree(n)
        self.allocator.decref(freed_pages)
        self.stats["evicted_pages"] += len(victims)
        return len(victims)

    def _make_host_room(self, n: int) -> int:
        """Evicts LRU unlocked host-only leaves until n host slots are free (or none is left to evict); returns
        the number of free host slots, at most n."""
        if self.host.num_free < n:
            heap = [(x.last_access, id(x), x) for x in self._nodes() if self._host_leaf(x)]
            heapq.heapify(heap)
            while heap and self.host.num_free < n:
                _, _, x = heapq.heappop(heap)
                parent = x.parent
                self._remove_subtree(x)
                if parent is not self.root and self._host_leaf(parent):
                    heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return min(n, self.host.num_free)

    @staticmethod
    def _host_leaf(x: Node) -> bool:
        return x.page is None and x.host is not None and not x.children and x.lock == 0

    def _nodes(self) -> list[Node]:
        """Every node, parents before children."""
        out, stack = [], list(self.root.children.values())
        while stack:
            x = stack.pop()
            out.append(x)
            stack.extend(x.children.values())
        return out

    def _remove_subtree(self, n: Node) -> None:
        """Drops n and its descendants (none of them on the device) from the tree and the host tier."""
        stack, slots = [n], []
        while stack:
            x = stack.pop()
            assert x.page is None and x.lock == 0, "removing a node still on the device or locked"
            stack.extend(x.children.values())
            if x.host is not None:
                slots.append(x.host)
                x.host = None
            self.num_nodes -= 1
        if slots:
            self.host.release(slots)
        del n.parent.children[n.tokens]

    def flush(self) -> int:
        """Drops every unlocked node from the device and host tiers (the remote store keeps its copies);
        returns the device pages freed."""
        freed = self.evict(self.num_evictable, spill=False)
        for x in reversed(self._nodes()):  # children before parents
            if x.page is None and x.lock == 0 and not x.children:
                self._remove_subtree(x)
            elif x.host is not None and self.host is not None:
                self.host.release([x.host])
                x.host = None
        return freed

    # ---- invariants ----------------------------------------------------------------------------------------

    def holders(self) -> Counter:
        """page -> 1 for every device page the tree holds (for PageAllocator.check)."""
        out, stack = Counter(), [self.root]
        while stack:
            n = stack.pop()
            stack.extend(n.children.values())
            if n.page is not None:
                out[n.page] += 1
        return out

    def check(self) -> None:
        nodes = devices = evictable = 0
        host_slots: set[int] = set()
        stack = list(self.root.children.values())
        while stack:
            n = stack.pop()
            nodes += 1
            assert n.parent.children.get(n.tokens) is n, "child not under its key"
            assert len(n.tokens) == self.page_size, "node is not one full page"
            assert n.digest == chain(n.parent.digest, n.tokens), "digest does not chain"
            assert n.page is not None or n.host is not None, "node with neither a device page nor a host copy"
            assert n.lock >= 0 and (n.parent is self.root or n.parent.lock >= n.lock), "lock not on the path"
            if n.lock:
                assert n.page is not None, "locked node off the device"
            if n.page is not None:
                devices += 1
                evictable += n.lock == 0
                assert n.parent is self.root or n.parent.page is not None, "device node under a host-only parent"
                assert self.allocator.refs[n.page] >= 1
            if n.host is not None:
                assert n.host not in host_slots, "host slot shared by two nodes"
                host_slots.add(n.host)
            assert n.device_children == sum(c.page is not None for c in n.children.values()), "device_children"
            stack.extend(n.children.values())
        assert (nodes, devices, evictable) == (self.num_nodes, self.num_device, self.num_evictable), (
            (nodes, devices, evictable), (self.num_nodes, self.num_device, self.num_evictable))
        if self.host is not None:
            self.host.check(host_slots)
        else:
            assert not host_slots


def page_array_shape(kv) -> tuple[int, ...]:
    """(L, 2, Hkv, S, D): one page of every layer, the unit the host and remote tiers store."""
    k = kv.pages[0][0]
    return (len(kv.pages), 2, k.shape[0], k.shape[2], k.shape[3])


def dtype_of(kv) -> np.dtype:
    return np.dtype(kv.pages[0][0].dtype)
