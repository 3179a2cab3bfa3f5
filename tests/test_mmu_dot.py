"""``vm.mmu.to_dot()``: the shadow page graph in Graphviz DOT.

Graphviz is not installed everywhere, so the output is checked with a small parser
of the DOT language (tokens, statements, attribute lists) that also checks the
attribute values against what Graphviz accepts; where ``dot`` is installed the
output is also rendered with ``dot -Tsvg``.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from kvmmmu import GuestMemory, dot
from kvmmmu.guest.paging import P, U, W

from .test_shadow_mmu import (
    HOLE,
    MMIO,
    PF,
    PF_U,
    Guest,
    Read,
    SetPte,
    gva,
    pattern,
    run,
)

# -- a DOT parser (the grammar of https://graphviz.org/doc/info/lang.html, no HTML labels)

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?\*/|^\#[^\n]*)
  | (?P<edgeop>->|--)
  | (?P<punct>[{}\[\];,=:])
  | (?P<string>"(?:[^"\\]|\\.)*")
  | (?P<number>-?(?:\.\d+|\d+(?:\.\d*)?))
  | (?P<id>[A-Za-z_\x80-\uffff][A-Za-z_0-9\x80-\uffff]*)
    """,
    re.VERBOSE | re.DOTALL | re.MULTILINE,
)
_KEYWORDS = {"strict", "graph", "digraph", "subgraph", "node", "edge"}


def tokens(src: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(src):
        m = _TOKEN.match(src, pos)
        if m is None:
            raise SyntaxError(f"bad DOT at {pos}: {src[pos : pos + 30]!r}")
        pos = m.end()
        kind = m.lastgroup or ""
        text = m.group()
        if kind == "ws":
            continue
        if kind == "string":
            text = re.sub(r'\\"', '"', text[1:-1])
        elif kind == "id" and text.lower() in _KEYWORDS:
            kind = text.lower()
        out.append((kind, text))
    return out


@dataclass
class Graph:
    directed: bool
    name: str | None
    attrs: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, dict[str, str]] = field(default_factory=dict)
    edges: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


class Parser:
    def __init__(self, src: str) -> None:
        self.toks = tokens(src)
        self.i = 0

    def peek(self, k: int = 0) -> tuple[str, str]:
        return self.toks[self.i + k] if self.i + k < len(self.toks) else ("eof", "")

    def take(self, *kinds: str, text: str | None = None) -> str:
        kind, t = self.peek()
        if kind not in kinds or (text is not None and t != text):
            raise SyntaxError(f"expected {kinds} {text or ''} at token {self.i}, got {kind} {t!r}")
        self.i += 1
        return t

    def at(self, kind: str, text: str | None = None) -> bool:
        k, t = self.peek()
        return k == kind and (text is None or t == text)

    def ident(self) -> str:
        return self.take("id", "string", "number")

    def graph(self) -> Graph:
        if self.at("strict"):
            self.take("strict")
        directed = self.take("graph", "digraph") == "digraph"
        name = None if self.at("punct", "{") else self.ident()
        g = Graph(directed, name)
        self.body(g)
        self.take("eof")
        return g

    def body(self, g: Graph) -> list[str]:
        """`{ stmt_list }`; returns the nodes named inside (for subgraph edges)."""
        self.take("punct", text="{")
        named: list[str] = []
        while not self.at("punct", "}"):
            named += self.stmt(g)
            if self.at("punct", ";"):
                self.take("punct")
        self.take("punct", text="}")
        return named

    def attr_list(self) -> dict[str, str]:
        attrs: dict[str, str] = {}
        while self.at("punct", "["):
            self.take("punct")
            while not self.at("punct", "]"):
                key = self.ident()
                self.take("punct", text="=")
                attrs[key] = self.ident()
                if self.at("punct", ",") or self.at("punct", ";"):
                    self.take("punct")
            self.take("punct", text="]")
        return attrs

    def operand(self, g: Graph) -> list[str]:
        if self.at("subgraph") or self.at("punct", "{"):
            if self.at("subgraph"):
                self.take("subgraph")
                if not self.at("punct", "{"):
                    self.ident()
            return self.body(g)
        name = self.ident()
        if self.at("punct", ":"):
            self.take("punct")
            self.ident()
        g.nodes.setdefault(name, {})
        return [name]

    def stmt(self, g: Graph) -> list[str]:
        kind, _ = self.peek()
        if kind in ("graph", "node", "edge"):
            self.take(kind)
            attrs = self.attr_list()
            if kind == "graph":
                g.attrs.update(attrs)
            return []
        if kind in ("id", "string", "number") and self.peek(1) == ("punct", "="):
            key = self.ident()
            self.take("punct")
            g.attrs[key] = self.ident()
            return []
        left = self.operand(g)
        chain = [left]
        while self.at("edgeop"):
            op = self.take("edgeop")
            if op != ("->" if g.directed else "--"):
                raise SyntaxError(f"{op} in a {'digraph' if g.directed else 'graph'}")
            chain.append(self.operand(g))
        attrs = self.attr_list()
        if len(chain) == 1:
            for n in left:
                g.nodes[n].update(attrs)
        for a, b in itertools.pairwise(chain):
            g.edges += [(x, y, attrs) for x in a for y in b]
        return [n for part in chain for n in part]


def parse(src: str) -> Graph:
    return Parser(src).graph()


# What Graphviz accepts for the attributes the picture uses.
STYLES = {"filled", "dashed", "dotted", "bold", "rounded", "solid", "invis"}
SHAPES = {"box", "ellipse", "oval", "record", "plaintext", "circle"}
COLOR = re.compile(r"#[0-9a-fA-F]{6}|[a-z]+")
KNOWN = {
    "label",
    "style",
    "fillcolor",
    "color",
    "penwidth",
    "shape",
    "fontname",
    "fontsize",
    "rankdir",
    "labelloc",
    "rank",
}


def check_graphviz_values(g: Graph) -> None:
    every = [g.attrs, *g.nodes.values(), *(a for _, _, a in g.edges)]
    for attrs in every:
        assert set(attrs) <= KNOWN, set(attrs) - KNOWN
        if "style" in attrs:
            assert set(attrs["style"].split(",")) <= STYLES, attrs["style"]
        if "shape" in attrs:
            assert attrs["shape"] in SHAPES
        for c in ("color", "fillcolor"):
            if c in attrs:
                assert COLOR.fullmatch(attrs[c]), attrs[c]
        if "penwidth" in attrs:
            float(attrs["penwidth"])


def test_parser_accepts_and_rejects() -> None:
    g = parse('digraph x { a -> b -> c [label="1"]; { rank=min; a; } b [style="filled"]; }')
    assert [(a, b) for a, b, _ in g.edges] == [("a", "b"), ("b", "c")]
    assert g.nodes["b"] == {"style": "filled"}
    for bad in ("digraph { a -- b }", "digraph { a -> }", 'digraph { a [label="x] }', "digraph {"):
        with pytest.raises(SyntaxError):
            parse(bad)


# -- the MMU pictures ----------------------------------------------------------------------


def graph_of(g: Guest, **kw: bool) -> Graph:
    src = g.mmu.to_dot(**kw)
    gr = parse(src)
    check_graphviz_values(gr)
    assert gr.directed and gr.name == "shadow_mmu"
    pages = g.mmu.shadow_pages()
    sp_nodes = {n for n in gr.nodes if n.startswith("sp")}
    assert sp_nodes == {f"sp{p.index}" for p in pages}, "one node per shadow page"
    links = {(f"sp{p.index}", f"sp{c}", str(i)) for p in pages for i, c in p.children}
    drawn = {(a, b, attrs.get("label")) for a, b, attrs in gr.edges if a.startswith("sp")}
    assert drawn == links, "one edge per non-leaf SPTE, labelled with its index"
    return gr


def roots_drawn(gr: Graph) -> dict[str, dict[str, str]]:
    return {n: a for n, a in gr.nodes.items() if n.startswith("vcpu")}


@pytest.fixture
def unsync_guest() -> Iterator[Guest]:
    g = Guest()
    run(g, [Read(gva(0), pattern(0)), SetPte(gva(1), 1, 0)])
    yield g
    g.close()


def test_dot_shows_roots_pages_and_links(unsync_guest: Guest) -> None:
    g = unsync_guest
    gr = graph_of(g)
    (root,) = roots_drawn(gr)
    assert root == "vcpu0_root"
    cur = g.root()
    assert cur is not None
    assert (root, f"sp{cur.page}") in [(a, b) for a, b, _ in gr.edges]
    label = gr.nodes[f"sp{cur.page}"]["label"]
    assert label.startswith(f"sp {cur.page}  L4  gfn {g.pt.cr3 >> 12:#x}")
    assert "uwx indirect" in label and "root_count 1" in label


def test_dot_marks_unsync_pages_and_their_ancestors(unsync_guest: Guest) -> None:
    g = unsync_guest
    gr = graph_of(g)
    for p in g.mmu.shadow_pages():
        attrs = gr.nodes[f"sp{p.index}"]
        if p.unsync:
            assert "UNSYNC" in attrs["label"] and attrs["fillcolor"] != "white"
        if p.unsync_children:
            assert "bold" in attrs["style"] and "color" in attrs
            assert f"unsync_children {p.unsync_children}" in attrs["label"]
        if not p.unsync and not p.unsync_children:
            assert "UNSYNC" not in attrs["label"] and "color" not in attrs
    red = [(a, b) for a, b, attrs in gr.edges if "color" in attrs]
    assert len(red) == 3, "the path from the root down to the unsync page"


def test_dot_leaf_summary(unsync_guest: Guest) -> None:
    g = unsync_guest
    leaf = g.leaf_of(0x10_0000)
    assert leaf is not None
    assert "1 leaf (4K)" in parse(g.mmu.to_dot()).nodes[f"sp{leaf[0].index}"]["label"]
    assert "leaf" not in g.mmu.to_dot(leaves=False)


def test_dot_marks_obsolete_roots() -> None:
    g = Guest(n=1)
    extra = GuestMemory(2 << 20)
    g.vm.set_user_memory_region(1, 64 << 20, 2 << 20, extra)
    run(g, [Read(gva(0), pattern(0))])
    g.vm.set_user_memory_region(1, 64 << 20, 0, 0)  # fast zap-all
    gr = graph_of(g)
    (root,) = roots_drawn(gr).values()
    assert "OBSOLETE" in root["label"] and "dashed" in root["style"]
    (page,) = (a for n, a in gr.nodes.items() if n.startswith("sp"))
    assert "INVALID" in page["label"] and "dashed" in page["style"]
    g.close()


def test_dot_pae_roots_and_mmio() -> None:
    g = Guest("pae", n=1)
    g.pt.map(gva(1), HOLE, flags=P | W | U)
    run(g, [Read(gva(0), pattern(0)), Read(gva(1), MMIO(HOLE))])
    gr = graph_of(g)
    (root,) = roots_drawn(gr)
    pae_edges = [attrs["label"] for a, _, attrs in gr.edges if a == root]
    assert pae_edges and all(lbl.startswith("pae ") for lbl in pae_edges)
    assert any("1 mmio" in a["label"] for a in gr.nodes.values())
    g.close()


def test_dot_dummy_root() -> None:
    g = Guest(n=1)
    run(g, [Read(gva(0), pattern(0))])
    g.vcpu.mmu.load_cr3(HOLE)
    run(g, [Read(gva(0), PF(PF_U))])
    gr = graph_of(g)
    dummy = roots_drawn(gr)["vcpu0_root"]
    assert "dummy" in dummy["label"]
    assert not [e for e in gr.edges if e[0] == "vcpu0_root"]
    g.close()


def test_dot_prev_roots_can_be_left_out() -> None:
    g = Guest(n=1)
    run(g, [Read(gva(0), pattern(0))])
    cr3 = g.pt.cr3
    g.vcpu.mmu.load_cr3(g.pt.alloc())  # an empty address space
    run(g, [Read(gva(0), PF(PF_U))])
    gr = graph_of(g)
    assert set(roots_drawn(gr)) == {"vcpu0_root", "vcpu0_prev0"}
    assert "dotted" in roots_drawn(gr)["vcpu0_prev0"]["style"]
    assert set(roots_drawn(graph_of(g, prev_roots=False))) == {"vcpu0_root"}
    g.vcpu.mmu.load_cr3(cr3)
    g.mmu.audit()
    g.close()


def test_dot_save_writes_text(tmp_path: Path, unsync_guest: Guest) -> None:
    src = unsync_guest.mmu.to_dot()
    p = dot.save(src, tmp_path / "mmu.dot")
    assert p.read_text() == src


@pytest.mark.skipif(not dot.available(), reason="Graphviz's dot is not installed")
def test_dot_renders_with_graphviz(unsync_guest: Guest, tmp_path: Path) -> None:
    svg = dot.render(unsync_guest.mmu.to_dot(), "svg")
    assert svg.lstrip().startswith(b"<?xml") and b"<svg" in svg
    assert dot.save(unsync_guest.mmu.to_dot(), tmp_path / "mmu.svg").stat().st_size > 0


def test_render_without_graphviz_says_so() -> None:
    with pytest.raises(FileNotFoundError, match="not installed"):
        dot.render("digraph {}", program="kvmmmu-no-such-dot")
