//! VmMmu: the simulator-only view of a VM's shadow MMU (kvmmmu_core::mmu::inspect):
//! shadow pages, roots, rmaps, the audit and a DOT picture. Read-only.

use std::sync::Arc;

use kvmmmu_core::mmu::inspect::{self, DotOptions, MmuSummary, RootInfo, SpInfo, VcpuRoots};
use kvmmmu_core::mmu::role::Role;
use kvmmmu_core::mmu::shadow::PageState;
use kvmmmu_core::mmu::spte::SPTE_ENT_PER_PAGE;
use kvmmmu_core::vm::Vm;
use numpy::{PyArray1, PyArray2, PyArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use crate::IntoPy;

/// Simulator-only view of a VM's shadow MMU.
#[pyclass(frozen, module = "kvmmmu._core")]
pub struct VmMmu {
    pub vm: Arc<Vm>,
}

/// Every field of a role word by its KVM name, plus `word`.
pub fn role_dict<'py>(py: Python<'py>, r: Role) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("level", r.level())?;
    d.set_item("has_4_byte_gpte", r.has_4_byte_gpte())?;
    d.set_item("quadrant", r.quadrant())?;
    d.set_item("direct", r.direct())?;
    d.set_item("access", r.access())?;
    d.set_item("invalid", r.invalid())?;
    d.set_item("efer_nx", r.efer_nx())?;
    d.set_item("cr0_wp", r.cr0_wp())?;
    d.set_item("smep_andnot_wp", r.smep_andnot_wp())?;
    d.set_item("smap_andnot_wp", r.smap_andnot_wp())?;
    d.set_item("ad_disabled", r.ad_disabled())?;
    d.set_item("guest_mode", r.guest_mode())?;
    d.set_item("passthrough", r.passthrough())?;
    d.set_item("is_mirror", r.is_mirror())?;
    d.set_item("smm", r.smm())?;
    d.set_item("word", r.word())?;
    Ok(d)
}

/// The fields of a `kvm_mmu_page_role` word, by KVM name (and `word`).
#[pyfunction]
pub fn decode_role(py: Python<'_>, word: u32) -> PyResult<Bound<'_, PyDict>> {
    role_dict(py, Role(word))
}

fn state_name(s: PageState) -> &'static str {
    match s {
        PageState::Active => "active",
        PageState::InvalidRoot => "invalid_root",
        PageState::Zapped => "zapped",
        PageState::Free => "free",
    }
}

fn page_dict<'py>(py: Python<'py>, sp: &SpInfo) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("index", sp.index)?;
    d.set_item("gfn", sp.gfn)?;
    d.set_item("role", role_dict(py, sp.role)?)?;
    d.set_item("state", state_name(sp.state))?;
    d.set_item("obsolete", sp.obsolete)?;
    d.set_item("unsync", sp.unsync)?;
    d.set_item("unsync_children", sp.unsync_children)?;
    let bitmap = sp
        .unsync_child_bitmap
        .iter()
        .enumerate()
        .flat_map(|(w, &bits)| {
            (0..64)
                .filter(move |b| bits & (1 << b) != 0)
                .map(move |b| w * 64 + b)
        })
        .collect::<Vec<usize>>();
    d.set_item("unsync_child_bitmap", bitmap)?;
    d.set_item("root_count", sp.root_count)?;
    d.set_item("write_flooding_count", sp.write_flooding_count)?;
    d.set_item("mmu_valid_gen", sp.mmu_valid_gen)?;
    d.set_item("parents", sp.parents.clone())?;
    d.set_item(
        "children",
        sp.children()
            .map(|(i, c)| (i as u16, c))
            .collect::<Vec<_>>(),
    )?;
    Ok(d)
}

type Root = Option<(u64, &'static str, Vec<Option<u32>>)>;

fn root_tuple(r: &Option<RootInfo>) -> Root {
    r.as_ref().map(|r| (r.pgd, r.kind.name(), r.pages.clone()))
}

#[pymethods]
impl VmMmu {
    /// Every shadow page that is not free (or only page `index`, if it is not free):
    /// (list of field dicts, sptes, kinds, gfns), the three arrays of shape (pages,
    /// 512): SPTE values (uint64), SPTE kinds (uint8: 0 none, 1 non-leaf, 2 leaf, 3
    /// MMIO) and the gfn each SPTE maps or links to.
    #[pyo3(signature = (index = None))]
    #[allow(clippy::type_complexity)]
    fn shadow_pages<'py>(
        &self,
        py: Python<'py>,
        index: Option<u32>,
    ) -> PyResult<(
        Bound<'py, PyList>,
        Bound<'py, PyArray2<u64>>,
        Bound<'py, PyArray2<u8>>,
        Bound<'py, PyArray2<u64>>,
    )> {
        let pages = py.detach(|| {
            let st = self.vm.state();
            match index {
                None => inspect::shadow_pages(&st.mmu),
                Some(i) => inspect::shadow_page(&st.mmu, i).into_iter().collect(),
            }
        });
        let n = pages.len();
        let mut sptes = Vec::with_capacity(n * SPTE_ENT_PER_PAGE);
        let mut kinds = Vec::with_capacity(n * SPTE_ENT_PER_PAGE);
        let mut gfns = Vec::with_capacity(n * SPTE_ENT_PER_PAGE);
        let list = PyList::empty(py);
        for sp in &pages {
            sptes.extend(sp.sptes.iter().map(|s| s.0));
            kinds.extend((0..SPTE_ENT_PER_PAGE).map(|i| sp.kind(i) as u8));
            gfns.extend_from_slice(&sp.gfns[..]);
            list.append(page_dict(py, sp)?)?;
        }
        let shape = [n, SPTE_ENT_PER_PAGE];
        Ok((
            list,
            PyArray1::from_vec(py, sptes).reshape(shape)?,
            PyArray1::from_vec(py, kinds).reshape(shape)?,
            PyArray1::from_vec(py, gfns).reshape(shape)?,
        ))
    }

    /// Every vCPU's roots: [(vcpu_id, root_role_word, current, [prev0, prev1, prev2])],
    /// each root None (not loaded) or (pgd, "page" | "pae" | "dummy", [sp index or None]).
    fn roots(&self, py: Python<'_>) -> Vec<(u32, u32, Root, Vec<Root>)> {
        let roots: Vec<VcpuRoots> = py.detach(|| inspect::vcpu_roots(&self.vm));
        roots
            .iter()
            .map(|v| {
                (
                    v.vcpu_id,
                    v.root_role.word(),
                    root_tuple(&v.current),
                    v.prev.iter().map(root_tuple).collect(),
                )
            })
            .collect()
    }

    /// The leaf SPTEs mapping `gfn`: [(level, sp index, spte index)].
    fn rmap(&self, py: Python<'_>, gfn: u64) -> Vec<(u8, u32, u16)> {
        py.detach(|| inspect::rmap(&self.vm.state().mmu, gfn))
            .into_iter()
            .map(|e| (e.level, e.sp, e.index))
            .collect()
    }

    /// The full audit (every vCPU's roots included): None, or what is wrong.
    /// Host memory events (MMU notifiers) on [hva, hva + size) of guest memory the
    /// simulator owns: discard (MADV_DONTNEED, new zero frames).
    fn host_discard(&self, py: Python<'_>, hva: u64, size: u64) -> PyResult<()> {
        py.detach(|| self.vm.host_discard(hva, size)).py_err()
    }

    /// Migrate the page at `hva` to a new frame (same contents); returns the frame.
    fn host_migrate(&self, py: Python<'_>, hva: u64) -> PyResult<u64> {
        py.detach(|| self.vm.host_migrate(hva)).py_err()
    }

    /// Map [hva, hva + size) read-only in the host (KSM merge, fork's COW).
    fn host_write_protect(&self, py: Python<'_>, hva: u64, size: u64) -> PyResult<()> {
        py.detach(|| self.vm.host_write_protect(hva, size)).py_err()
    }

    /// clear_flush_young (clear, flush), clear_young (clear) or test_young.
    fn host_age(&self, py: Python<'_>, hva: u64, size: u64, clear: bool, flush: bool) -> bool {
        py.detach(|| self.vm.host_age(hva, size, clear, flush))
    }

    /// invalidate_range_start: zap, and block faults on the range until the end.
    fn host_invalidate_start(&self, py: Python<'_>, hva: u64, size: u64) {
        py.detach(|| self.vm.host_invalidate_start(hva, size))
    }

    /// invalidate_range_end (EINVAL without a start).
    fn host_invalidate_end(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.vm.host_invalidate_end()).py_err()
    }

    /// Two-dimensional paging instead of the shadow MMU (before any vCPU: EBUSY).
    fn set_tdp(&self, on: bool) -> PyResult<()> {
        self.vm.set_tdp(on).py_err()
    }

    /// "tdp" or "shadow".
    #[getter]
    fn mode(&self) -> &'static str {
        if self.vm.state().tdp {
            "tdp"
        } else {
            "shadow"
        }
    }

    fn audit(&self, py: Python<'_>) -> Option<String> {
        py.detach(|| self.vm.audit()).err()
    }

    /// {n_used, n_max, n_requested, mmu_valid_gen, indirect_shadow_pages, memory_bytes}.
    fn summary<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s: MmuSummary = py.detach(|| MmuSummary::of(&self.vm.state().mmu));
        let d = PyDict::new(py);
        d.set_item("n_used", s.n_used)?;
        d.set_item("n_max", s.n_max)?;
        d.set_item("n_requested", s.n_requested)?;
        d.set_item("mmu_valid_gen", s.mmu_valid_gen)?;
        d.set_item("indirect_shadow_pages", s.indirect_shadow_pages)?;
        d.set_item("memory_bytes", s.memory_bytes)?;
        Ok(d)
    }

    /// The shadow page graph as Graphviz DOT (kvmmmu_core::mmu::inspect::to_dot).
    #[pyo3(signature = (leaves = true, prev_roots = true))]
    fn to_dot(&self, py: Python<'_>, leaves: bool, prev_roots: bool) -> String {
        py.detach(|| {
            let snap = inspect::snapshot(&self.vm);
            inspect::to_dot(&snap, &DotOptions { leaves, prev_roots })
        })
    }
}
