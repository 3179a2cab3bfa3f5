//! VcpuMmu: the simulator-only MMU surface of a vCPU (walks, guest accesses through
//! the shadow MMU, TLB maintenance, control-register writes).

use std::sync::Arc;

use kvmmmu_core::errno::Errno;
use kvmmmu_core::paging::{Access, PagingMode, WalkError};
use kvmmmu_core::vcpu::guest_ops::{AccessKind, AccessOutcome, ControlReg};
use kvmmmu_core::vcpu::Vcpu;
use numpy::{PyArray1, PyReadonlyArray1};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyTuple};

use crate::IntoPy;

/// Simulator-only access to a vCPU's MMU: walks through its current paging state,
/// and guest accesses and TLB maintenance through the shadow MMU.
#[pyclass(frozen, module = "kvmmmu._core")]
pub struct VcpuMmu {
    pub vcpu: Arc<Vcpu>,
}

fn access(write: bool, user: bool, fetch: bool, implicit: bool) -> Access {
    Access {
        write,
        user,
        fetch,
        implicit,
    }
}

#[pymethods]
impl VcpuMmu {
    /// Walk `gva`: (True, gpa, level, page_size, access, pkey, dirty, gptes) or
    /// (False, vector, error_code, address).
    #[pyo3(signature = (gva, write = false, user = false, fetch = false, implicit = false))]
    fn walk<'py>(
        &self,
        py: Python<'py>,
        gva: u64,
        write: bool,
        user: bool,
        fetch: bool,
        implicit: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let r = py
            .detach(|| self.vcpu.walk(gva, access(write, user, fetch, implicit)))
            .py_err()?;
        match r {
            Ok(w) => {
                let gptes: Vec<(u8, u64, u64)> = w.gptes.to_vec();
                (
                    true,
                    w.gpa,
                    w.level,
                    w.page_size,
                    w.access,
                    w.pkey,
                    w.dirty,
                    gptes,
                )
                    .into_pyobject(py)
            }
            Err(e) => {
                let address = match e {
                    WalkError::PageFault { address, .. } => address,
                    WalkError::GeneralProtection { .. } => gva,
                };
                (false, e.vector(), e.error_code(), address).into_pyobject(py)
            }
        }
    }

    /// Walk every gva of a uint64 array: (gpas, vectors, error_codes) arrays; a fault
    /// gives gpa 2**64-1 and its vector and error code, a success vector 0.
    #[pyo3(signature = (gvas, write = false, user = false, fetch = false, implicit = false))]
    #[allow(clippy::type_complexity)]
    fn walk_many<'py>(
        &self,
        py: Python<'py>,
        gvas: PyReadonlyArray1<'py, u64>,
        write: bool,
        user: bool,
        fetch: bool,
        implicit: bool,
    ) -> PyResult<(
        Bound<'py, PyArray1<u64>>,
        Bound<'py, PyArray1<u8>>,
        Bound<'py, PyArray1<u32>>,
    )> {
        let input: Vec<u64> = match gvas.as_slice() {
            Ok(s) => s.to_vec(),
            Err(_) => gvas.as_array().iter().copied().collect(),
        };
        let n = input.len();
        let (mut g, mut v, mut e) = (vec![0u64; n], vec![0u8; n], vec![0u32; n]);
        py.detach(|| {
            self.vcpu.walk_many(
                &input,
                access(write, user, fetch, implicit),
                &mut g,
                &mut v,
                &mut e,
            )
        })
        .py_err()?;
        Ok((
            PyArray1::from_vec(py, g),
            PyArray1::from_vec(py, v),
            PyArray1::from_vec(py, e),
        ))
    }

    /// MOV to CR0/CR3/CR4 or WRMSR EFER as the guest does it, with KVM's MMU reaction
    /// (new roots, context reset, sync): None, or the fault (vector, error_code) it
    /// raises (#GP).
    fn write_control(&self, py: Python<'_>, reg: &str, value: u64) -> PyResult<Option<(u8, u32)>> {
        let reg = match reg {
            "cr0" => ControlReg::Cr0,
            "cr3" => ControlReg::Cr3,
            "cr4" => ControlReg::Cr4,
            "efer" => ControlReg::Efer,
            _ => {
                return Err(PyValueError::new_err(format!(
                    "no control register {reg:?}"
                )))
            }
        };
        let r = py
            .detach(|| self.vcpu.guest_write_control(reg, value))
            .py_err()?;
        Ok(r.err().map(|e| (e.vector(), e.error_code())))
    }

    /// A guest access of `size` bytes at `gva` through the shadow MMU (the SPTEs are
    /// the vCPU's TLB), split at page boundaries as the CPU does. A write takes its
    /// bytes from `data`. Returns (0, bytes or None) when it completed; (1, gpa,
    /// offset, length) when bytes `offset..offset+length` of the access (one page's
    /// part) have no memory behind them (MMIO: KVM_EXIT_MMIO); (2, vector,
    /// error_code, address) for the fault the guest takes (#PF with CR2, or #GP).
    #[pyo3(signature = (
        gva, size, data = None, write = false, fetch = false, user = false, implicit = false
    ))]
    #[allow(clippy::too_many_arguments)]
    fn access<'py>(
        &self,
        py: Python<'py>,
        gva: u64,
        size: usize,
        data: Option<&[u8]>,
        write: bool,
        fetch: bool,
        user: bool,
        implicit: bool,
    ) -> PyResult<Bound<'py, PyTuple>> {
        let mut buf = match data {
            Some(d) if d.len() == size => d.to_vec(),
            Some(_) => return Err(PyValueError::new_err("data must be `size` bytes")),
            None if write => return Err(PyValueError::new_err("a write needs data")),
            None => vec![0u8; size],
        };
        let kind = AccessKind {
            write,
            fetch,
            user,
            implicit,
        };
        let r = py
            .detach(|| guest_access(&self.vcpu, gva, &mut buf, kind))
            .py_err()?;
        match r {
            Part::Done if write => (0, py.None()).into_pyobject(py),
            Part::Done => (0, PyBytes::new(py, &buf)).into_pyobject(py),
            Part::Mmio { gpa, offset, len } => (1, gpa, offset, len).into_pyobject(py),
            Part::Fault(e, addr) => {
                let address = match e {
                    WalkError::PageFault { address, .. } => address,
                    WalkError::GeneralProtection { .. } => addr,
                };
                (2, e.vector(), e.error_code(), address).into_pyobject(py)
            }
            Part::RingFull => (3, py.None()).into_pyobject(py),
        }
    }

    /// INVLPG executed by the guest (kvm_mmu_invlpg: resync the SPTEs on the path of
    /// `gva` in the current and the cached roots).
    fn invlpg(&self, py: Python<'_>, gva: u64) -> PyResult<()> {
        py.detach(|| self.vcpu.guest_invlpg(gva)).py_err()
    }

    /// A guest TLB flush not tied to an address or CR3 (INVPCID all-context, a CR4.PGE
    /// toggle): KVM_REQ_TLB_FLUSH_GUEST, which syncs every unsync page of the roots.
    fn flush_tlb(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.vcpu.guest_flush_tlb()).py_err()
    }

    /// PKRU, the protection-key rights register the walker checks.
    #[getter]
    fn get_pkru(&self) -> u32 {
        self.vcpu.state().pkru
    }

    #[setter]
    fn set_pkru(&self, value: u32) {
        self.vcpu.state().pkru = value;
    }

    /// The PAE PDPTE registers.
    #[getter]
    fn pdptrs(&self) -> [u64; 4] {
        self.vcpu.state().pdptrs
    }

    /// The paging mode: "none", "32-bit", "pae", "4-level" or "5-level".
    #[getter]
    fn mode(&self) -> &'static str {
        match self.vcpu.state().walk_ctx().mode() {
            PagingMode::None => "none",
            PagingMode::Bits32 => "32-bit",
            PagingMode::Pae => "pae",
            PagingMode::Long4 => "4-level",
            PagingMode::Long5 => "5-level",
        }
    }
}

/// How one trace-driven access ended.
enum Part {
    Done,
    /// Bytes `offset..offset + len` of the access (one page's part) are MMIO at `gpa`.
    Mmio {
        gpa: u64,
        offset: usize,
        len: usize,
    },
    /// The guest's fault, and the address of the part that raised it.
    Fault(WalkError, u64),
    /// The dirty ring is at its soft limit (KVM_EXIT_DIRTY_RING_FULL).
    RingFull,
}

/// The access in page parts, one Vcpu::guest_access each (the core splits the same
/// way), so that an MMIO outcome names the part KVM_EXIT_MMIO would report.
fn guest_access(vcpu: &Vcpu, gva: u64, buf: &mut [u8], kind: AccessKind) -> Result<Part, Errno> {
    let mut done = 0usize;
    while done < buf.len() {
        let addr = gva.wrapping_add(done as u64);
        let len = (buf.len() - done).min(4096 - (addr & 0xfff) as usize);
        match vcpu.guest_access(addr, &mut buf[done..done + len], kind)? {
            AccessOutcome::Done => done += len,
            AccessOutcome::Mmio { gpa } => {
                return Ok(Part::Mmio {
                    gpa,
                    offset: done,
                    len,
                })
            }
            AccessOutcome::Fault(e) => return Ok(Part::Fault(e, addr)),
            AccessOutcome::DirtyRingFull => return Ok(Part::RingFull),
        }
    }
    Ok(Part::Done)
}
