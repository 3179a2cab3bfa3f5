//! Guest code through the MMU model: A/D bits, dirty logging of guest writes,
//! unsync gptes (stale until INVLPG), read-only slots, self-modifying code, and the
//! run loop's kick / single-step / breakpoint exits.

mod run_guest;

use std::sync::Arc;

use iced_x86::code_asm::*;
use kvmmmu_core::hostmem::HostRegion;
use kvmmmu_core::memslot::RegionIoctl;
use kvmmmu_core::stats::{VcpuStat, VmStat};
use kvmmmu_core::uapi::kvm_userspace_memory_region2;
use kvmmmu_core::uapi::run_off::EXIT_UNION;
use kvmmmu_core::vcpu::run::*;
use run_guest::*;

const X: u64 = 0x40_0000;
const SLOT1: u64 = 16 << 20;

#[test]
fn accessed_and_dirty_bits_from_user_code() {
    let mut g = long_guest(3, &[CODE, STACK3 - 0x1000], |a| {
        a.mov(rbx, X)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.mov(qword_ptr(rbx + 0x1000), rax)?;
        a.mov(rax, MMIO)?;
        a.mov(byte_ptr(rax), 1)?;
        Ok(())
    });
    let root = g.cr3();
    g.map(root, X, 0x20_0000, 1, P | W | U);
    g.map(root, X + 0x1000, 0x20_1000, 1, P | W | U);
    let read_pte = g.entry_gpa(root, X, 1);
    let write_pte = g.entry_gpa(root, X + 0x1000, 1);
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_MMIO));
    assert_eq!(g.read_gpte(read_pte) & (A | D), A);
    assert_eq!(g.read_gpte(write_pte) & (A | D), A | D);
    assert!(g.vcpu.stats.get(VcpuStat::PfFixed as usize) >= 2);
    g.audit().unwrap();
}

#[test]
fn dirty_log_shows_guest_writes() {
    let mut g = long_guest(0, &[], |a| {
        a.mov(rbx, X)?;
        for p in [0u64, 3, 7] {
            a.mov(byte_ptr(rbx + (p * 4096) as i32), 1)?;
        }
        a.mov(al, byte_ptr(rbx + 10 * 4096))?;
        a.hlt()?;
        Ok(())
    });
    let host = HostRegion::new(64 * 4096).unwrap();
    g.vm.set_user_memory_region(
        &kvm_userspace_memory_region2 {
            slot: 1,
            flags: kvmmmu_core::uapi::KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: SLOT1,
            memory_size: 64 * 4096,
            userspace_addr: host.addr(),
            ..Default::default()
        },
        RegionIoctl::V2,
    )
    .unwrap();
    let root = g.cr3();
    for p in 0..16 {
        g.map(root, X + p * 4096, SLOT1 + p * 4096, 1, P | W);
    }
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    assert_eq!(g.vm.harvest_dirty_pages(1).unwrap(), vec![0, 3, 7]);
    g.audit().unwrap();
}

#[test]
fn guest_pte_edit_is_stale_until_invlpg() {
    // The PTE of X is reachable at X_PTE_ALIAS; the guest points X at another page.
    let mut g = long_guest(0, &[], |_| Ok(()));
    let root = g.cr3();
    g.map(root, X, 0x10_0000, 1, P | W);
    let pte = g.entry_gpa(root, X, 1);
    let alias = 0x50_0000u64;
    g.map(root, alias, pte & !0xfff, 1, P | W);
    g.write_u64(0x10_0000, 0xaaaa);
    g.write_u64(0x11_0000, 0xbbbb);
    let code = kvmmmu_core::testkit::TestGuest::assemble(64, CODE, |a| {
        a.mov(rbx, X)?;
        a.mov(r8, qword_ptr(rbx))?; // A
        a.mov(rcx, alias + (pte & 0xfff))?;
        a.mov(rax, 0x11_0000u64 | P | W | A)?;
        a.mov(qword_ptr(rcx), rax)?; // the guest edits its PTE
        a.mov(r9, qword_ptr(rbx))?; // still A: no INVLPG yet
        a.invlpg(qword_ptr(rbx))?;
        a.mov(r10, qword_ptr(rbx))?; // B
        a.hlt()?;
        Ok(())
    });
    g.write_bytes(CODE, &code);
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = g.vcpu.get_regs();
    assert_eq!((r.r8, r.r9, r.r10), (0xaaaa, 0xaaaa, 0xbbbb));
    assert_eq!(g.vm.stats.get(VmStat::MmuUnsync as usize), 1);
    assert_eq!(g.vcpu.stats.get(VcpuStat::Invlpg as usize), 1);
    g.audit().unwrap();
}

#[test]
fn read_only_slot_write_exits_as_mmio() {
    let mut g = long_guest(0, &[], |a| {
        a.mov(rbx, X)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.mov(qword_ptr(rbx), rcx)?;
        a.hlt()?;
        Ok(())
    });
    let host = HostRegion::new(4096).unwrap();
    host.write(0, b"ROMDATA!").unwrap();
    g.vm.set_user_memory_region(
        &kvm_userspace_memory_region2 {
            slot: 1,
            flags: kvmmmu_core::uapi::KVM_MEM_READONLY,
            guest_phys_addr: SLOT1,
            memory_size: 4096,
            userspace_addr: host.addr(),
            ..Default::default()
        },
        RegionIoctl::V2,
    )
    .unwrap();
    let root = g.cr3();
    g.map(root, X, SLOT1, 1, P | W);
    let mut r = g.vcpu.get_regs();
    r.rcx = 0x4142_4344_4546_4748;
    g.vcpu.set_regs(&r).unwrap();
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_MMIO));
    assert_eq!(g.vcpu.get_regs().rax, u64::from_le_bytes(*b"ROMDATA!"));
    assert_eq!(g.run_bytes(EXIT_UNION, 8), SLOT1.to_le_bytes());
    assert_eq!(
        g.run_bytes(EXIT_UNION + 8, 8),
        0x4142_4344_4546_4748u64.to_le_bytes()
    );
    let mut b = [0u8; 8];
    host.read(0, &mut b).unwrap();
    assert_eq!(&b, b"ROMDATA!");
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
}

#[test]
fn self_modifying_code_is_seen() {
    // The loop rewrites the immediate of an instruction it already executed.
    let g = long_guest(0, &[], |a| {
        let mut target = a.create_label();
        a.xor(ebx, ebx)?;
        a.mov(ecx, 2)?;
        a.set_label(&mut target)?;
        a.mov(eax, 1)?; // B8 imm32: the imm is patched
        a.add(ebx, eax)?;
        a.lea(rdx, ptr(target))?;
        a.mov(dword_ptr(rdx + 1), 100)?;
        a.dec(ecx)?;
        a.jnz(target)?;
        a.hlt()?;
        Ok(())
    });
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    assert_eq!(g.vcpu.get_regs().rbx, 101);
}

#[test]
fn kick_ends_an_infinite_loop() {
    let g = long_guest(0, &[], |a| {
        let mut top = a.create_label();
        a.set_label(&mut top)?;
        a.jmp(top)?;
        Ok(())
    });
    let t = kick_after(&g.vcpu, 50);
    let (r, reason) = g.run();
    t.join().unwrap();
    assert_eq!(r, Err(kvmmmu_core::errno::Errno::EINTR));
    assert_eq!(reason, KVM_EXIT_INTR);
    assert_eq!(g.vcpu.stats.get(VcpuStat::SignalExits as usize), 1);
    // immediate_exit written by another thread while running works the same way.
    let v = Arc::clone(&g.vcpu);
    let t = after(50, move || {
        let _ = v
            .run_area()
            .write(kvmmmu_core::uapi::run_off::IMMEDIATE_EXIT, &[1]);
    });
    let (r, reason) = g.run();
    t.join().unwrap();
    assert_eq!(
        (r, reason),
        (Err(kvmmmu_core::errno::Errno::EINTR), KVM_EXIT_INTR)
    );
}

#[test]
fn single_step_and_software_breakpoints() {
    let g = long_guest(0, &[], |a| {
        a.nop()?;
        a.mov(eax, 5)?;
        a.int3()?;
        a.hlt()?;
        Ok(())
    });
    let step = kvmmmu_core::vcpu::emulate::KVM_GUESTDBG_ENABLE
        | kvmmmu_core::vcpu::emulate::KVM_GUESTDBG_SINGLESTEP;
    g.vcpu.set_guest_debug(step, [0; 8]).unwrap();
    for pc in [CODE + 1, CODE + 6] {
        assert_eq!(g.run(), (Ok(0), KVM_EXIT_DEBUG));
        assert_eq!(g.run_bytes(EXIT_UNION, 4), 1u32.to_le_bytes());
        assert_eq!(g.run_bytes(EXIT_UNION + 8, 8), pc.to_le_bytes());
        assert_eq!(
            g.run_bytes(EXIT_UNION + 16, 8),
            0xffff_4ff0u64.to_le_bytes()
        );
    }
    let swbp = kvmmmu_core::vcpu::emulate::KVM_GUESTDBG_ENABLE
        | kvmmmu_core::vcpu::emulate::KVM_GUESTDBG_USE_SW_BP;
    g.vcpu.set_guest_debug(swbp, [0; 8]).unwrap();
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_DEBUG));
    assert_eq!(g.run_bytes(EXIT_UNION, 4), 3u32.to_le_bytes());
    assert_eq!(g.run_bytes(EXIT_UNION + 8, 8), (CODE + 6).to_le_bytes());
    assert_eq!(g.vcpu.get_regs().rip, CODE + 6);
    assert_eq!(
        g.vcpu.set_guest_debug(1 << 30, [0; 8]),
        Err(kvmmmu_core::errno::Errno::EINVAL)
    );
}

#[test]
fn trap_flag_delivers_debug_exception() {
    let g = long_guest(0, &[], |a| {
        a.pushfq()?;
        a.or(qword_ptr(rsp), 0x100)?;
        a.popfq()?;
        a.nop()?; // the #DB comes after this one
        a.hlt()?;
        Ok(())
    });
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = report(&g);
    assert_eq!(r.vector, 1);
    // POPF sets TF; the trap follows the next instruction (NOP): pushfq (1 byte),
    // or qword [rsp], 0x100 (8), popfq (1), nop (1).
    assert_eq!(r.rip, CODE + 11);
    assert_ne!(g.vcpu.state().debugregs.dr6 & (1 << 14), 0);
}

#[test]
fn tdp_guest_faults_and_sets_accessed_dirty() {
    // Under TDP the CPU walks the guest tables itself: #PF goes straight to the guest,
    // A/D bits are set by the walk, MMIO exits as before.
    let g =
        kvmmmu_core::testkit::TestGuest::new_tdp(kvmmmu_core::paging::PagingMode::Long4, 4 << 20)
            .unwrap();
    let mut g = run_guest::long_guest_on(g, 0, &[], |a| {
        a.mov(rbx, X)?;
        a.mov(qword_ptr(rbx), rbx)?;
        a.mov(rax, MMIO)?;
        a.mov(qword_ptr(rax), rbx)?;
        a.mov(rbx, 0x60_0000u64)?;
        a.mov(rax, qword_ptr(rbx))?; // not mapped: #PF
        Ok(())
    });
    let root = g.cr3();
    g.map(root, X, 0x20_0000, 1, P | W);
    let pte = g.entry_gpa(root, X, 1);
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_MMIO));
    assert_eq!(g.read_gpte(pte) & (A | D), A | D);
    assert_eq!(g.read_u64(0x20_0000), X);
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = report(&g);
    assert_eq!((r.vector, r.error_code, r.cr2), (14, 0, 0x60_0000));
    g.audit().unwrap();
}

#[test]
fn cpuid_from_the_table_with_kvm_leaves_and_out_of_range() {
    let g = long_guest(0, &[], |a| {
        a.mov(eax, 0x4000_0000u32)?;
        a.cpuid()?;
        a.mov(r8d, ebx)?;
        a.mov(eax, 0x4000_0001u32)?;
        a.cpuid()?;
        a.mov(r9d, eax)?;
        a.mov(eax, 0x7fff_ffffu32)?; // above the basic range: the highest basic leaf
        a.xor(ecx, ecx)?;
        a.cpuid()?;
        a.mov(r10d, eax)?;
        a.mov(r11d, ebx)?;
        a.hlt()?;
        Ok(())
    });
    let table = kvmmmu_core::cpuid::supported_cpuid();
    kvmmmu_core::cpuid::set_vcpu_cpuid(&g.vcpu, table.clone()).unwrap();
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = g.vcpu.get_regs();
    let find = |f: u32| {
        table
            .iter()
            .find(|e| e.function == f && e.index == 0)
            .copied()
    };
    let kvm = find(0x4000_0000).expect("KVM signature leaf");
    assert_eq!(r.r8 as u32, kvm.ebx);
    assert_eq!(kvm.ebx.to_le_bytes(), *b"KVMK", "KVMKVMKVM");
    assert_eq!(r.r9 as u32, find(0x4000_0001).unwrap().eax);
    let max_basic = find(0).unwrap().eax;
    let top = find(max_basic).unwrap();
    assert_eq!((r.r10 as u32, r.r11 as u32), (top.eax, top.ebx));
    assert!(g.vcpu.stats.get(VcpuStat::Exits as usize) >= 3);
}

#[test]
fn fault_during_host_invalidation_waits_for_its_end() {
    // The guest touches a page whose host memory is being invalidated: KVM keeps
    // retrying the fault (re-entering the guest) until invalidate_range_end; KVM_RUN
    // neither fails nor holds the VM lock meanwhile, and a kick still ends it.
    let g = long_guest(0, &[], |a| {
        a.mov(rbx, 0x10_0000u64)?;
        a.mov(rax, qword_ptr(rbx))?;
        a.hlt()?;
        Ok(())
    });
    let hva = g.host.addr() + 0x10_0000;
    g.vm.host_invalidate_start(hva, 4096);
    let vm = Arc::clone(&g.vm);
    let t = after(50, move || vm.host_invalidate_end().unwrap());
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    t.join().unwrap();
    // Kicked while waiting: EINTR, and the instruction has not run.
    g.vm.host_invalidate_start(hva, 4096);
    let mut r = g.vcpu.get_regs();
    r.rip = CODE;
    g.vcpu.set_regs(&r).unwrap();
    let t = kick_after(&g.vcpu, 50);
    let (r, reason) = g.run();
    t.join().unwrap();
    assert_eq!(
        (r, reason),
        (Err(kvmmmu_core::errno::Errno::EINTR), KVM_EXIT_INTR)
    );
    assert_eq!(g.vcpu.get_regs().rip, CODE + 10);
    g.vm.host_invalidate_end().unwrap();
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    g.audit().unwrap();
}

#[test]
fn hlt_with_an_in_kernel_irqchip_blocks_until_an_event() {
    // KVM_CREATE_IRQCHIP: HLT halts inside KVM_RUN (mp_state HALTED, halt_exits +1, no
    // exit); a kick ends the run with EINTR, an NMI queued by KVM_SET_VCPU_EVENTS
    // wakes it and is delivered.
    let g = long_guest(0, &[], |a| {
        a.hlt()?;
        a.mov(eax, 1)?;
        a.hlt()?;
        Ok(())
    });
    // (KVM_CREATE_IRQCHIP must precede the vCPU, which the test kit made already.)
    g.vm.state().irqchip = true;
    let t = kick_after(&g.vcpu, 50);
    let (r, reason) = g.run();
    t.join().unwrap();
    assert_eq!(
        (r, reason),
        (Err(kvmmmu_core::errno::Errno::EINTR), KVM_EXIT_INTR)
    );
    assert_eq!(g.vcpu.get_regs().rip, CODE + 1);
    assert_eq!(
        g.vcpu.state().mp.current(true),
        kvmmmu_core::vcpu::mp_state::HALTED
    );
    assert_eq!(g.vcpu.stats.get(VcpuStat::HaltExits as usize), 1);
    g.vcpu.state().events.nmi_pending = 1;
    let t = kick_after(&g.vcpu, 100);
    let (r, _) = g.run();
    t.join().unwrap();
    assert_eq!(r, Err(kvmmmu_core::errno::Errno::EINTR));
    // The NMI (vector 2) went through the IDT to its stub, which halted again.
    assert_eq!(report(&g).vector, 2);
    assert_eq!(report(&g).rip, CODE + 1);
}
