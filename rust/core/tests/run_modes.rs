//! The simulated vCPU in real mode and 32-bit protected mode (no paging, 2-level,
//! PAE), with exception delivery through the IVT and the 32-bit IDT.

mod run_guest;

use iced_x86::code_asm::*;
use kvmmmu_core::paging::PagingMode;
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::vcpu::run::*;
use run_guest::*;

#[test]
fn real_mode_int_iret_and_segments() {
    let g = real_guest(|a| {
        a.mov(ax, 0x100)?;
        a.mov(ds, ax)?; // DS base 0x1000
        a.mov(bx, word_ptr(0x800))?; // reads 0x1800
        a.int(0x10)?;
        a.xor(dx, dx)?;
        a.mov(ax, 7)?;
        a.mov(cx, 0)?;
        a.div(cx)?; // #DE through IVT entry 0
        a.hlt()?;
        Ok(())
    });
    g.write_bytes(0x1800, &0xbeefu16.to_le_bytes());
    // INT 0x10 handler at 0200:0000 (linear 0x2000): sets SI, IRET.
    let h = TestGuest::assemble(16, 0, |a| {
        a.mov(si, 0x55)?;
        a.iret()?;
        Ok(())
    });
    g.write_bytes(0x2000, &h);
    g.write_bytes(0x40, &[0, 0, 0x00, 0x02]);
    // #DE handler at 0300:0000: records IP of the fault from the stack, halts.
    let de = TestGuest::assemble(16, 0, |a| {
        a.mov(bp, sp)?;
        a.mov(di, word_ptr(bp))?;
        a.hlt()?;
        Ok(())
    });
    g.write_bytes(0x3000, &de);
    g.write_bytes(0, &[0, 0, 0x00, 0x03]);
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = g.vcpu.get_regs();
    assert_eq!(r.rbx & 0xffff, 0xbeef);
    assert_eq!(r.rsi & 0xffff, 0x55);
    // The faulting DIV's IP: mov ax (3) mov ds (2) mov bx (4) int (2) xor (2) mov ax (3) mov cx (3).
    assert_eq!(r.rdi & 0xffff, CODE + 19);
    assert_eq!(g.vcpu.get_sregs().cs.base, 0x3000);
}

fn pm32_page_fault(mode: PagingMode) {
    let g = pm32_guest(mode, 0, &[], |a| {
        a.mov(ebx, 0x30_0000)?;
        a.mov(eax, dword_ptr(ebx))?; // not mapped
        a.hlt()?;
        Ok(())
    });
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT), "{mode:?}");
    let r = report(&g);
    assert_eq!(
        (r.vector, r.error_code, r.cr2),
        (14, 0, 0x30_0000),
        "{mode:?}"
    );
    assert_eq!(r.rip, CODE + 5);
    assert_eq!(r.cs, 0x08);
    g.audit().unwrap();
}

#[test]
fn page_fault_in_2level_paging() {
    pm32_page_fault(PagingMode::Bits32);
}

#[test]
fn page_fault_in_pae_paging() {
    pm32_page_fault(PagingMode::Pae);
}

#[test]
fn pm32_without_paging_general_protection_on_limit() {
    let g = pm32_guest(PagingMode::None, 0, &[], |a| {
        a.mov(ax, 0x10)?;
        a.mov(ds, ax)?;
        a.mov(eax, dword_ptr(0x10000))?;
        a.hlt()?;
        Ok(())
    });
    // A DS limit of 64 KiB - 1: the read at 0x10000 is #GP(0).
    {
        let mut st = g.vcpu.state();
        st.sregs.ds.limit = 0xffff;
    }
    // The MOV DS reloads the flat descriptor: shrink it in the GDT too.
    g.write_u64(GDT + 0x10, 0x0040_9200_0000_ffff);
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = report(&g);
    assert_eq!((r.vector, r.error_code), (13, 0));
}

#[test]
fn user_mode_privilege_change_and_io_permission() {
    // CPL3 32-bit code: OUT with IOPL=3 works; with IOPL=0 it is #GP(0) delivered on
    // the TSS's SS0:ESP0.
    let g = pm32_guest(PagingMode::Bits32, 3, &[CODE, STACK3 - 0x1000], |a| {
        a.out(0x10, al)?;
        a.hlt()?; // #GP at CPL3
        Ok(())
    });
    {
        let mut r = g.vcpu.get_regs();
        r.rflags = 2 | (3 << 12);
        g.vcpu.set_regs(&r).unwrap();
    }
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_IO));
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = report(&g);
    assert_eq!((r.vector, r.error_code, r.cs), (13, 0, 0x1b));
    assert_eq!(r.rsp_at_entry, STACK0 - 5 * 4);
    // Now IOPL = 0 (no I/O bitmap in the TSS: its base is past the limit).
    let g = pm32_guest(PagingMode::Bits32, 3, &[CODE, STACK3 - 0x1000], |a| {
        a.out(0x10, al)?;
        Ok(())
    });
    g.write_bytes(TSS + 0x66, &0x68u16.to_le_bytes());
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    assert_eq!((report(&g).vector, report(&g).error_code), (13, 0));
}

#[test]
fn long_mode_user_out_is_general_protection() {
    // Hardware: a 64-bit CPL3 OUT with IOPL < 3 and no I/O bitmap is #GP(0).
    let g = long_guest(3, &[CODE, STACK3 - 0x1000], |a| {
        a.out(0x10, al)?;
        Ok(())
    });
    // The I/O map base past the TSS limit: no bitmap.
    g.write_bytes(TSS + 0x66, &0x68u16.to_le_bytes());
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    assert_eq!((report(&g).vector, report(&g).error_code), (13, 0));
}

#[test]
fn real_mode_to_long_mode() {
    // The guest builds nothing itself: the tables come from long_guest's layout,
    // reused from real mode (GDT, IDT, page tables), and it enables PAE, LME, paging
    // and jumps to 64-bit code.
    let lg = long_guest(0, &[], |_| Ok(()));
    let root = lg.cr3();
    let g = lg;
    let code64 = 0x1800u64;
    let c64 = TestGuest::assemble(64, code64, |a| {
        a.mov(rax, 0x1234_5678_9abc_def0u64)?;
        a.mov(rbx, cr0)?;
        a.hlt()?;
        Ok(())
    });
    g.write_bytes(code64, &c64);
    let gdtr = 0x1f00u64;
    g.write_bytes(gdtr, &(7u16 * 8 - 1).to_le_bytes());
    g.write_bytes(gdtr + 2, &(GDT as u32).to_le_bytes());
    let c16 = TestGuest::assemble(16, CODE, |a| {
        a.cli()?;
        a.lgdt(dword_ptr(gdtr as u32))?;
        a.mov(eax, cr4)?;
        a.or(eax, 0x20)?; // PAE
        a.mov(cr4, eax)?;
        a.mov(eax, root as u32)?;
        a.mov(cr3, eax)?;
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, 0x100)?; // LME
        a.wrmsr()?;
        a.mov(eax, cr0)?;
        a.or(eax, 0x8000_0001u32 as i32)?; // PG | PE
        a.mov(cr0, eax)?;
        a.jmp_far(0x08, code64 as u32)?;
        Ok(())
    });
    g.write_bytes(CODE, &c16);
    {
        let mut st = g.vcpu.state();
        let s = &mut st.sregs;
        s.cr0 = 0x10;
        s.cr4 = 0;
        s.efer = 0;
        s.cr3 = 0;
        let mut r = seg(0, 3, 0, false, 1);
        r.limit = 0xffff;
        r.g = 0;
        r.db = 0;
        s.cs = kvmmmu_core::uapi::kvm_segment { type_: 11, ..r };
        (s.ds, s.es, s.ss, s.fs, s.gs) = (r, r, r, r, r);
        st.mmu.reset_pending = true;
    }
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = g.vcpu.get_regs();
    let s = g.vcpu.get_sregs();
    assert_eq!(r.rax, 0x1234_5678_9abc_def0);
    assert_eq!(s.efer & 0x500, 0x500);
    assert_eq!(s.cs.l, 1);
    assert_eq!(r.rbx & 0x8000_0001, 0x8000_0001);
    g.audit().unwrap();
}

#[test]
fn write_to_a_host_write_protected_page_breaks_cow() {
    // The host maps the page read-only (KSM, fork): the guest's write makes KVM's
    // get_user_pages(FOLL_WRITE) copy it, and the write lands.
    for mode in [PagingMode::None, PagingMode::Bits32] {
        let g = pm32_guest(mode, 0, &[], |a| {
            a.mov(dword_ptr(0x10_0000), 0x1234_5678)?;
            a.hlt()?;
            Ok(())
        });
        g.vm.host_write_protect(g.host.addr() + 0x10_0000, 4096)
            .unwrap();
        let mut res = g.vcpu.get_regs();
        res.rflags = 2;
        g.vcpu.set_regs(&res).unwrap();
        g.vcpu.set_instruction_budget(Some(10_000));
        assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT), "{mode:?}");
        assert_eq!(g.read_bytes(0x10_0000, 4), 0x1234_5678u32.to_le_bytes());
    }
}

#[test]
fn compatibility_mode_code_and_its_page_fault() {
    // 32-bit code under long mode (CS.L = 0, CS.D = 1): 32-bit addressing, and a #PF
    // delivered through the 64-bit IDT into 64-bit code.
    let g = long_guest(0, &[], |a| a.nop());
    let code = TestGuest::assemble(32, CODE, |a| {
        a.mov(ebx, 0x10_0000)?;
        a.mov(dword_ptr(ebx), 0xabcd)?;
        a.mov(ecx, dword_ptr(ebx))?;
        a.push(ecx)?; // 4-byte push in compatibility mode
        a.mov(ebx, 0x40_0000)?;
        a.mov(eax, dword_ptr(ebx))?; // not mapped
        Ok(())
    });
    g.write_bytes(CODE, &code);
    {
        let mut st = g.vcpu.state();
        st.sregs.cs.l = 0;
        st.sregs.cs.db = 1;
    }
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = report(&g);
    assert_eq!((r.vector, r.cr2), (14, 0x40_0000));
    assert_eq!(g.vcpu.get_regs().rcx & 0xffff_ffff, 0xabcd);
    assert_eq!(g.read_bytes(STACK0 - 4, 4), 0xabcdu32.to_le_bytes());
    assert_eq!(
        g.vcpu.get_sregs().cs.l,
        1,
        "the handler runs in 64-bit mode"
    );
}
