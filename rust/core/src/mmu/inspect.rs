//! Read-only views of the shadow MMU for tools and the Python API: plain-data copies
//! of the shadow pages, the vCPUs' roots and the rmap, and a Graphviz (DOT) picture of
//! the shadow page graph. Nothing here changes MMU state; each view is taken under
//! the locks in one go, so it is consistent.
//!
//! ```ignore
//! let snap = inspect::snapshot(&vm);
//! for sp in &snap.pages { println!("{} L{} gfn {:#x}", sp.index, sp.role.level(), sp.gfn); }
//! std::fs::write("mmu.dot", inspect::to_dot(&snap, &DotOptions::default()))?;
//! ```

use std::fmt::Write as _;

use super::context::{KvmMmu, Root, RootHpa, KVM_MMU_NUM_PREV_ROOTS};
use super::rmap::{index_of, sp_of, KVM_NR_PAGE_SIZES};
use super::role::Role;
use super::shadow::{Mmu, PageState, ShadowPage, SpIndex, NIL};
use super::spte::{Spte, SPTE_ENT_PER_PAGE};
use crate::vm::Vm;

/// What one SPTE is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SpteKind {
    /// Not present (and not an MMIO SPTE).
    None = 0,
    /// A link to a lower shadow page.
    NonLeaf = 1,
    /// A present leaf: a translation to a host page (4 KiB, or huge above level 1).
    Leaf = 2,
    /// A cached MMIO SPTE (not present; the gfn has no memslot).
    Mmio = 3,
}

impl SpteKind {
    /// The kind of `spte` in a page of `level`.
    pub fn of(spte: Spte, level: u8) -> SpteKind {
        if spte.is_mmio() {
            SpteKind::Mmio
        } else if !spte.is_shadow_present() {
            SpteKind::None
        } else if spte.is_leaf(level) {
            SpteKind::Leaf
        } else {
            SpteKind::NonLeaf
        }
    }
}

/// A copy of one shadow page (struct kvm_mmu_page) with what an observer needs.
#[derive(Clone, Debug)]
pub struct SpInfo {
    pub index: SpIndex,
    /// The guest table's gfn, or the first gfn of a direct page's range.
    pub gfn: u64,
    pub role: Role,
    pub state: PageState,
    /// is_obsolete_sp: invalid, or from before the last fast zap-all.
    pub obsolete: bool,
    pub unsync: bool,
    pub unsync_children: u16,
    pub unsync_child_bitmap: [u64; SPTE_ENT_PER_PAGE / 64],
    pub root_count: u32,
    pub write_flooding_count: u8,
    pub mmu_valid_gen: u8,
    /// Every parent SPTE linking to this page: (parent page, SPTE index in it).
    pub parents: Vec<(SpIndex, u16)>,
    pub sptes: Box<[Spte; SPTE_ENT_PER_PAGE]>,
    /// Per SPTE, the gfn it maps (leaf), the gfn of the table it links to (non-leaf:
    /// kvm_mmu_page_get_gfn) or the gfn cached in an MMIO SPTE; 0 for an empty SPTE.
    pub gfns: Box<[u64; SPTE_ENT_PER_PAGE]>,
}

/// How many SPTEs of a page are of each kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SpteCounts {
    pub nonleaf: usize,
    pub leaf: usize,
    pub mmio: usize,
}

impl SpInfo {
    pub fn from_page(mmu: &Mmu, index: SpIndex, sp: &ShadowPage) -> SpInfo {
        let level = sp.role.level();
        let mut gfns = Box::new([0u64; SPTE_ENT_PER_PAGE]);
        for (i, g) in gfns.iter_mut().enumerate() {
            let s = sp.spt[i];
            *g = match SpteKind::of(s, level) {
                SpteKind::None => 0,
                SpteKind::Mmio => s.mmio_gfn(),
                SpteKind::Leaf | SpteKind::NonLeaf => sp.get_gfn(i),
            };
        }
        SpInfo {
            index,
            gfn: sp.gfn,
            role: sp.role,
            state: sp.state(),
            obsolete: mmu.is_obsolete(index),
            unsync: sp.unsync,
            unsync_children: sp.unsync_children,
            unsync_child_bitmap: sp.unsync_child_bitmap,
            root_count: sp.root_count,
            write_flooding_count: sp.write_flooding_count,
            mmu_valid_gen: sp.mmu_valid_gen,
            parents: sp
                .parent_ptes
                .iter()
                .map(|p| (sp_of(p), index_of(p) as u16))
                .collect(),
            sptes: sp.spt.clone(),
            gfns,
        }
    }

    pub fn level(&self) -> u8 {
        self.role.level()
    }

    /// The kind of SPTE `i`.
    pub fn kind(&self, i: usize) -> SpteKind {
        SpteKind::of(self.sptes[i], self.level())
    }

    /// (SPTE index, child page) for every non-leaf SPTE.
    pub fn children(&self) -> impl Iterator<Item = (usize, SpIndex)> + '_ {
        (0..SPTE_ENT_PER_PAGE)
            .filter(|&i| self.kind(i) == SpteKind::NonLeaf)
            .map(|i| (i, self.sptes[i].child_index()))
    }

    pub fn counts(&self) -> SpteCounts {
        let mut c = SpteCounts::default();
        for i in 0..SPTE_ENT_PER_PAGE {
            match self.kind(i) {
                SpteKind::NonLeaf => c.nonleaf += 1,
                SpteKind::Leaf => c.leaf += 1,
                SpteKind::Mmio => c.mmio += 1,
                SpteKind::None => {}
            }
        }
        c
    }
}

/// Every shadow page that is not free, in arena order.
pub fn shadow_pages(mmu: &Mmu) -> Vec<SpInfo> {
    mmu.iter()
        .map(|(i, sp)| SpInfo::from_page(mmu, i, sp))
        .collect()
}

/// One shadow page, if `index` names a page that is not free.
pub fn shadow_page(mmu: &Mmu, index: SpIndex) -> Option<SpInfo> {
    mmu.iter()
        .find(|&(i, _)| i == index)
        .map(|(i, sp)| SpInfo::from_page(mmu, i, sp))
}

/// What a root names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RootKind {
    /// One shadow page (4- and 5-level guests).
    Page,
    /// The vCPU's PAE root: four level-2 pages (32-bit, PAE and non-paging guests).
    Pae,
    /// CR3 outside every memslot: KVM's dummy root, no shadow page.
    Dummy,
}

impl RootKind {
    pub fn name(self) -> &'static str {
        match self {
            RootKind::Page => "page",
            RootKind::Pae => "pae",
            RootKind::Dummy => "dummy",
        }
    }
}

/// One loaded root (struct kvm_mmu_root_info).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RootInfo {
    pub pgd: u64,
    pub kind: RootKind,
    /// Page: one page; Pae: four entries, None for an invalid PAE root; Dummy: none.
    pub pages: Vec<Option<SpIndex>>,
}

impl RootInfo {
    /// None for INVALID_PAGE (no root loaded).
    pub fn of(root: &Root) -> Option<RootInfo> {
        let (kind, pages) = match root.hpa {
            RootHpa::Invalid => return None,
            RootHpa::Page(sp) => (RootKind::Page, vec![Some(sp)]),
            RootHpa::Pae(r) => (
                RootKind::Pae,
                r.iter().map(|&sp| (sp != NIL).then_some(sp)).collect(),
            ),
            RootHpa::Dummy => (RootKind::Dummy, Vec::new()),
        };
        Some(RootInfo {
            pgd: root.pgd,
            kind,
            pages,
        })
    }
}

/// A vCPU's roots: the current one and the cached previous ones (MRU first).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VcpuRoots {
    pub vcpu_id: u32,
    /// The role a new root gets (mmu->root_role).
    pub root_role: Role,
    pub current: Option<RootInfo>,
    pub prev: [Option<RootInfo>; KVM_MMU_NUM_PREV_ROOTS],
}

impl VcpuRoots {
    pub fn of(vcpu_id: u32, ctx: &KvmMmu) -> VcpuRoots {
        VcpuRoots {
            vcpu_id,
            root_role: ctx.root_role,
            current: RootInfo::of(&ctx.root),
            prev: ctx.prev_roots.each_ref().map(RootInfo::of),
        }
    }
}

/// One rmap entry: a leaf SPTE mapping the gfn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RmapEntry {
    /// 1 = 4 KiB, 2 = 2 MiB, 3 = 1 GiB (the leaf maps the frame holding the gfn).
    pub level: u8,
    pub sp: SpIndex,
    pub index: u16,
}

/// Every leaf SPTE that maps `gfn`, level by level, in KVM's rmap walk order.
pub fn rmap(mmu: &Mmu, gfn: u64) -> Vec<RmapEntry> {
    let Some(meta) = mmu.slot_meta_for_gfn(gfn) else {
        return Vec::new();
    };
    (1..=KVM_NR_PAGE_SIZES as u8)
        .flat_map(|level| {
            meta.rmap.iter(gfn, level).map(move |p| RmapEntry {
                level,
                sp: sp_of(p),
                index: index_of(p) as u16,
            })
        })
        .collect()
}

/// The VM-wide numbers of the shadow MMU (cheap: no page is copied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmuSummary {
    pub n_used: u64,
    pub n_max: u64,
    pub n_requested: u64,
    pub mmu_valid_gen: u8,
    pub indirect_shadow_pages: u64,
    pub memory_bytes: usize,
}

impl MmuSummary {
    pub fn of(mmu: &Mmu) -> MmuSummary {
        MmuSummary {
            n_used: mmu.n_used(),
            n_max: mmu.n_max(),
            n_requested: mmu.n_requested(),
            mmu_valid_gen: mmu.mmu_valid_gen(),
            indirect_shadow_pages: mmu.indirect_shadow_pages(),
            memory_bytes: mmu.memory_bytes(),
        }
    }
}

/// The whole shadow MMU of a VM at one instant: pages, every vCPU's roots, numbers.
#[derive(Clone, Debug)]
pub struct MmuSnapshot {
    pub pages: Vec<SpInfo>,
    /// By vCPU id.
    pub vcpus: Vec<VcpuRoots>,
    pub summary: MmuSummary,
}

impl MmuSnapshot {
    pub fn page(&self, index: SpIndex) -> Option<&SpInfo> {
        self.pages
            .binary_search_by_key(&index, |p| p.index)
            .ok()
            .map(|i| &self.pages[i])
    }
}

/// The roots of every vCPU of `vm`, by id (each vCPU's state locked in turn).
pub fn vcpu_roots(vm: &Vm) -> Vec<VcpuRoots> {
    vm.vcpus()
        .iter()
        .map(|v| VcpuRoots::of(v.id, &v.state().mmu))
        .collect()
}

/// A consistent snapshot of `vm`'s shadow MMU. As Vm::audit does, the vCPU states are
/// locked in id order before the VM, so no event runs while it is taken.
pub fn snapshot(vm: &Vm) -> MmuSnapshot {
    let vcpus = vm.vcpus();
    let states: Vec<_> = vcpus.iter().map(|v| v.state()).collect();
    let roots = vcpus
        .iter()
        .zip(&states)
        .map(|(v, s)| VcpuRoots::of(v.id, &s.mmu))
        .collect();
    let st = vm.state();
    MmuSnapshot {
        pages: shadow_pages(&st.mmu),
        vcpus: roots,
        summary: MmuSummary::of(&st.mmu),
    }
}

/// What [`to_dot`] draws.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DotOptions {
    /// Summarise each page's leaves (present leaves, MMIO SPTEs) in its label.
    pub leaves: bool,
    /// Draw the cached previous roots too.
    pub prev_roots: bool,
}

impl Default for DotOptions {
    fn default() -> Self {
        DotOptions {
            leaves: true,
            prev_roots: true,
        }
    }
}

/// Colours of the picture (also its legend).
const UNSYNC_FILL: &str = "#ffb3b3";
const UNSYNC_CHILDREN: &str = "#d62728";
const INVALID_FILL: &str = "#dddddd";
const DIRECT_FILL: &str = "#e0ecff";

/// "uwx" style rights of an ACC_* value (ACC_EXEC 1, ACC_WRITE 2, ACC_USER 4).
pub fn acc_str(acc: u8) -> String {
    let f = |bit: u8, c: char| if acc & bit != 0 { c } else { '-' };
    [f(4, 'u'), f(2, 'w'), f(1, 'x')].iter().collect()
}

fn page_node(out: &mut String, sp: &SpInfo, opts: &DotOptions) {
    let r = sp.role;
    let mut label = format!("sp {}  L{}  gfn {:#x}\\n", sp.index, r.level(), sp.gfn);
    label += &format!(
        "{} {}",
        acc_str(r.access()),
        if r.direct() { "direct" } else { "indirect" }
    );
    if r.has_4_byte_gpte() {
        label += &format!(" q{}", r.quadrant());
    }
    if !r.cr0_wp() {
        label += " !wp";
    }
    if r.smm() != 0 {
        label += " smm";
    }
    if sp.root_count > 0 {
        label += &format!("\\nroot_count {}", sp.root_count);
    }
    if sp.unsync {
        label += "\\nUNSYNC";
    }
    if sp.unsync_children > 0 {
        label += &format!("\\nunsync_children {}", sp.unsync_children);
    }
    if r.invalid() {
        label += "\\nINVALID";
    } else if sp.obsolete {
        label += "\\nOBSOLETE";
    }
    if opts.leaves {
        let c = sp.counts();
        if c.leaf > 0 {
            let size = match r.level() {
                1 => "4K",
                2 => "2M",
                3 => "1G",
                _ => "?",
            };
            let noun = if c.leaf == 1 { "leaf" } else { "leaves" };
            label += &format!("\\n{} {noun} ({size})", c.leaf);
        }
        if c.mmio > 0 {
            label += &format!("\\n{} mmio", c.mmio);
        }
    }
    let mut style = vec!["filled"];
    let mut attrs = String::new();
    let fill = if r.invalid() || sp.obsolete {
        style.push("dashed");
        INVALID_FILL
    } else if sp.unsync {
        UNSYNC_FILL
    } else if r.direct() {
        DIRECT_FILL
    } else {
        "white"
    };
    if r.direct() {
        style.push("rounded");
    }
    if sp.unsync_children > 0 {
        style.push("bold");
        attrs += &format!(", color=\"{UNSYNC_CHILDREN}\", penwidth=2");
    }
    let _ = writeln!(
        out,
        "  sp{} [label=\"{label}\", style=\"{}\", fillcolor=\"{fill}\"{attrs}];",
        sp.index,
        style.join(",")
    );
}

fn root_nodes(out: &mut String, snap: &MmuSnapshot, opts: &DotOptions) -> Vec<String> {
    let mut names = Vec::new();
    for v in &snap.vcpus {
        let roots = std::iter::once((None, &v.current)).chain(
            v.prev
                .iter()
                .enumerate()
                .filter(|_| opts.prev_roots)
                .map(|(i, r)| (Some(i), r)),
        );
        for (slot, root) in roots {
            let Some(root) = root else { continue };
            let (name, what) = match slot {
                None => (format!("vcpu{}_root", v.vcpu_id), "root".to_string()),
                Some(i) => (
                    format!("vcpu{}_prev{i}", v.vcpu_id),
                    format!("prev_roots[{i}]"),
                ),
            };
            let stale = root
                .pages
                .iter()
                .flatten()
                .any(|&sp| snap.page(sp).is_none_or(|p| p.obsolete || p.role.invalid()));
            let mut label = format!(
                "vCPU {} {what}\\n{} pgd {:#x}",
                v.vcpu_id,
                root.kind.name(),
                root.pgd
            );
            if root.kind == RootKind::Dummy {
                label += "\\n(no memslot: dummy)";
            }
            if stale {
                label += "\\nOBSOLETE";
            }
            let style = match (slot.is_some(), stale) {
                (false, false) => "filled",
                (false, true) => "filled,dashed",
                (true, false) => "filled,dotted",
                (true, true) => "filled,dashed",
            };
            let fill = if stale {
                INVALID_FILL
            } else if slot.is_none() {
                "#c7f0c2"
            } else {
                "#eef7ec"
            };
            let _ = writeln!(
                out,
                "  {name} [shape=ellipse, label=\"{label}\", style=\"{style}\", \
                 fillcolor=\"{fill}\"];"
            );
            for (i, sp) in root.pages.iter().enumerate() {
                let Some(sp) = sp else { continue };
                let elabel = if root.kind == RootKind::Pae {
                    format!(" [label=\"pae {i}\"]")
                } else {
                    String::new()
                };
                let estyle = if slot.is_some() {
                    " [style=dotted]"
                } else {
                    ""
                };
                let _ = writeln!(out, "  {name} -> sp{sp}{elabel}{estyle};");
            }
            names.push(name);
        }
    }
    names
}

/// The shadow page graph in Graphviz DOT: the vCPUs' roots on top (current roots
/// solid, cached previous roots dotted), one node per shadow page labelled with its
/// index, level, gfn, role access and direct/indirect, and an edge per non-leaf SPTE
/// labelled with the SPTE index. Unsync pages are filled red, pages with unsync
/// children have a bold red border, direct pages are rounded and blue, and invalid
/// or obsolete pages (and the roots still holding them) are grey and dashed.
pub fn to_dot(snap: &MmuSnapshot, opts: &DotOptions) -> String {
    let s = &snap.summary;
    let mut out = String::new();
    out += "digraph shadow_mmu {\n";
    let _ = writeln!(
        out,
        "  graph [rankdir=TB, fontname=\"monospace\", labelloc=t, \
         label=\"shadow MMU: {} pages used of {}, generation {}\"];",
        s.n_used, s.n_max, s.mmu_valid_gen
    );
    out += "  node [shape=box, fontname=\"monospace\", fontsize=10];\n";
    out += "  edge [fontname=\"monospace\", fontsize=9];\n";
    let roots = root_nodes(&mut out, snap, opts);
    if !roots.is_empty() {
        let _ = writeln!(out, "  {{ rank=min; {}; }}", roots.join("; "));
    }
    for sp in &snap.pages {
        page_node(&mut out, sp, opts);
    }
    for sp in &snap.pages {
        for (i, child) in sp.children() {
            let style = if snap
                .page(child)
                .is_some_and(|c| c.unsync || c.unsync_children > 0)
                && sp.unsync_child_bitmap[i / 64] & (1 << (i % 64)) != 0
            {
                format!(", color=\"{UNSYNC_CHILDREN}\"")
            } else {
                String::new()
            };
            let _ = writeln!(out, "  sp{} -> sp{child} [label=\"{i}\"{style}];", sp.index);
        }
    }
    out += "}\n";
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::PagingMode;
    use crate::testkit::TestGuest;

    #[test]
    fn snapshot_of_a_4level_guest() {
        let mut g = TestGuest::new(PagingMode::Long4, 16 << 20).unwrap();
        let cr3 = g.cr3();
        g.map(cr3, 0x4000_0000, 0x10_0000, 1, 0x7);
        g.read(0x4000_0000, true).unwrap();
        let snap = snapshot(&g.vm);
        assert_eq!(snap.pages.len(), 4);
        let root = snap.vcpus[0].current.clone().unwrap();
        assert_eq!(root.kind, RootKind::Page);
        assert_eq!(root.pgd, cr3);
        let mut sp = snap.page(root.pages[0].unwrap()).unwrap();
        for level in (2..=4).rev() {
            assert_eq!(sp.level(), level);
            let kids: Vec<_> = sp.children().collect();
            assert_eq!(kids.len(), 1);
            let child = snap.page(kids[0].1).unwrap();
            assert_eq!(child.parents, vec![(sp.index, kids[0].0 as u16)]);
            sp = child;
        }
        assert_eq!(sp.counts().leaf, 1);
        let leaf = (0..512).find(|&i| sp.kind(i) == SpteKind::Leaf).unwrap();
        assert_eq!(sp.gfns[leaf], 0x100);
        let r = rmap(&g.vm.state().mmu, 0x100);
        assert_eq!(
            r,
            vec![RmapEntry {
                level: 1,
                sp: sp.index,
                index: leaf as u16
            }]
        );
        let dot = to_dot(&snap, &DotOptions::default());
        assert!(dot.starts_with("digraph shadow_mmu {"));
        assert_eq!(dot.matches(" -> ").count(), 4);
    }
}
