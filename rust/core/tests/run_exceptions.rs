//! Exceptions on the simulated vCPU: delivery through the 64-bit IDT with CR2 and
//! error codes, privilege changes with RSP0 from the TSS, double and triple faults.

mod run_guest;

use iced_x86::code_asm::*;
use kvmmmu_core::vcpu::run::*;
use run_guest::*;

#[test]
fn page_fault_through_the_idt() {
    let g = long_guest(0, &[], |a| {
        a.mov(rbx, 0x40_0000u64)?;
        a.mov(rax, qword_ptr(rbx))?; // not mapped
        a.hlt()?;
        Ok(())
    });
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = report(&g);
    assert_eq!((r.vector, r.error_code, r.cr2), (14, 0, 0x40_0000));
    assert_eq!(r.rip, CODE + 10);
    assert_eq!(r.cs, 0x08);
    assert_eq!(g.vcpu.get_sregs().cr2, 0x40_0000);
    g.audit().unwrap();
}

#[test]
fn write_and_fetch_fault_error_codes() {
    // A write to a read-only page, then a fetch from an NX page.
    let g = long_guest(0, &[], |a| {
        a.mov(rbx, 0x10_0000u64)?;
        a.mov(qword_ptr(rbx), rax)?;
        Ok(())
    });
    let root = g.cr3();
    let mut g = g;
    g.map(root, 0x10_0000, 0x10_0000, 1, P);
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = report(&g);
    assert_eq!((r.vector, r.error_code, r.cr2), (14, 0x3, 0x10_0000));
}

#[test]
fn general_protection_ud_and_divide_error() {
    for (code, vector, ec) in [
        (0u8, 13u64, 0u64), // non-canonical
        (1, 6, 0),          // ud2
        (2, 0, 0),          // div by zero
    ] {
        let g = long_guest(0, &[], |a| {
            match code {
                0 => {
                    a.mov(rbx, 0x0000_8000_0000_0000u64)?;
                    a.mov(rax, qword_ptr(rbx))?;
                }
                1 => a.ud2()?,
                _ => {
                    a.xor(ecx, ecx)?;
                    a.div(ecx)?;
                }
            }
            Ok(())
        });
        assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
        let r = report(&g);
        assert_eq!((r.vector, r.error_code), (vector, ec), "case {code}");
    }
}

#[test]
fn user_code_faults_on_supervisor_page_and_switches_stack() {
    let g = long_guest(3, &[CODE, STACK3 - 0x1000], |a| {
        a.mov(rbx, RESULT)?;
        a.mov(rax, qword_ptr(rbx))?; // a supervisor page
        Ok(())
    });
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = report(&g);
    assert_eq!((r.vector, r.error_code, r.cr2), (14, 0x5, RESULT));
    assert_eq!(r.cs, 0x1b);
    // The handler ran on RSP0 with the 64-bit frame (RIP, CS, RFLAGS, RSP, SS).
    assert_eq!(r.rsp_at_entry, STACK0 - 5 * 8);
    assert_eq!(g.read_u64(STACK0 - 16), STACK3);
    assert_eq!(g.read_u64(STACK0 - 8), 0x23);
    assert_eq!(g.vcpu.get_sregs().cs.dpl, 0);
    use kvmmmu_core::stats::VcpuStat;
    assert!(g.vcpu.stats.get(VcpuStat::PfGuest as usize) >= 1);
    g.audit().unwrap();
}

#[test]
fn double_fault_then_triple_fault() {
    // #PF whose gate is not present: #NP during #PF delivery is a #DF.
    let g = long_guest(0, &[], |a| {
        a.mov(rbx, 0x40_0000u64)?;
        a.mov(rax, qword_ptr(rbx))?;
        Ok(())
    });
    let gate = IDT + 16 * 14 + 4;
    let hi = g.read_u64(gate - 4);
    g.write_u64(gate - 4, hi & !(1 << 47));
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = report(&g);
    assert_eq!((r.vector, r.error_code), (8, 0));

    // No IDT at all: #PF, #GP on the IDT limit, #DF, then shutdown.
    let g = long_guest(0, &[], |a| {
        a.mov(rbx, 0x40_0000u64)?;
        a.mov(rax, qword_ptr(rbx))?;
        Ok(())
    });
    g.vcpu.state().sregs.idt.limit = 0;
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_SHUTDOWN));
    assert_eq!(g.vcpu.get_regs().rip, CODE + 10);
}

#[test]
fn int3_int_n_and_iretq() {
    let g = long_guest(0, &[], |a| {
        a.int(0x21)?;
        a.mov(rcx, 0x77u64)?;
        a.hlt()?;
        Ok(())
    });
    // Gate 0x21: a handler that sets RBX and returns.
    let handler = 0x8000u64;
    let h = kvmmmu_core::testkit::TestGuest::assemble(64, handler, |a| {
        a.mov(ebx, 0x55)?;
        a.iretq()?;
        Ok(())
    });
    g.write_bytes(handler, &h);
    g.write_u64(
        IDT + 16 * 0x21,
        (handler & 0xffff) | (0x08 << 16) | (0x8e << 40) | ((handler >> 16) & 0xffff) << 48,
    );
    g.write_u64(IDT + 16 * 0x21 + 8, 0);
    g.vcpu.state().sregs.idt.limit = 0x22 * 16 - 1;
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = g.vcpu.get_regs();
    assert_eq!((r.rbx, r.rcx, r.rsp), (0x55, 0x77, STACK0));

    let g = long_guest(0, &[], |a| {
        a.nop()?;
        a.int3()?;
        Ok(())
    });
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = report(&g);
    // #BP is a trap: the return address follows the INT3.
    assert_eq!((r.vector, r.rip), (3, CODE + 2));
}

#[test]
fn injected_exception_with_payload() {
    let g = long_guest(0, &[], |a| a.hlt());
    {
        let mut st = g.vcpu.state();
        let e = &mut st.events.exception;
        e.pending = true;
        e.nr = 14;
        e.has_error_code = true;
        e.error_code = 0x6;
        e.has_payload = true;
        e.payload = 0xdead_0000;
    }
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = report(&g);
    assert_eq!(
        (r.vector, r.error_code, r.cr2, r.rip),
        (14, 6, 0xdead_0000, CODE)
    );
    g.vcpu.state().events.triple_fault_pending = true;
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_SHUTDOWN));
}

#[test]
fn iretq_to_user_mode_and_back_through_a_fault() {
    // CPL0 builds an IRET frame to CPL3 code, which then faults on a supervisor page:
    // the #PF comes back to CPL0 on RSP0 with the user SS:RSP in the frame.
    let user = 0x2000u64;
    let g = long_guest(0, &[CODE, user, STACK3 - 0x1000], |a| {
        a.push(0x23)?; // SS
        a.push(STACK3 as i32)?; // RSP
        a.push(0x202)?; // RFLAGS (IF)
        a.push(0x1b)?; // CS
        a.push(user as i32)?; // RIP
        a.iretq()?;
        Ok(())
    });
    let u = kvmmmu_core::testkit::TestGuest::assemble(64, user, |a| {
        a.mov(rax, 0x1234u64)?;
        a.mov(rbx, RESULT)?;
        a.mov(qword_ptr(rbx), rax)?; // supervisor page: #PF 0x7
        Ok(())
    });
    g.write_bytes(user, &u);
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = report(&g);
    assert_eq!((r.vector, r.error_code, r.cr2), (14, 7, RESULT));
    assert_eq!(r.cs, 0x1b);
    assert_eq!(r.rip, user + 10 + 10);
    assert_eq!(g.read_u64(STACK0 - 8), 0x23);
    assert_eq!(g.read_u64(STACK0 - 16), STACK3);
    assert_eq!(g.read_u64(STACK0 - 24) & 0x200, 0x200);
}

#[test]
fn syscall_sysret_swapgs() {
    let user = 0x2000u64;
    let handler = 0x2800u64;
    let g = long_guest(0, &[CODE, user, STACK3 - 0x1000], |a| {
        let wrmsr = |a: &mut CodeAssembler, msr: u32, v: u64| -> Result<(), IcedError> {
            a.mov(ecx, msr)?;
            a.mov(eax, v as u32)?;
            a.mov(edx, (v >> 32) as u32)?;
            a.wrmsr()
        };
        wrmsr(a, 0xc000_0081, (0x08u64 << 48) | (0x08 << 32))?; // STAR
        wrmsr(a, 0xc000_0082, handler)?; // LSTAR
        wrmsr(a, 0xc000_0084, 0x200)?; // SFMASK: IF
        wrmsr(a, 0xc000_0102, 0x5555_0000)?; // KERNEL_GS_BASE
        a.mov(ecx, 0xc000_0080u32)?;
        a.rdmsr()?;
        a.or(eax, 1)?; // EFER.SCE
        a.wrmsr()?;
        a.mov(rcx, user)?;
        a.mov(r11, 0x202u64)?;
        a.mov(rsp, STACK3)?;
        a.sysretq()?;
        Ok(())
    });
    let u = kvmmmu_core::testkit::TestGuest::assemble(64, user, |a| {
        a.mov(eax, 0x77)?;
        a.syscall()?;
        Ok(())
    });
    g.write_bytes(user, &u);
    let h = kvmmmu_core::testkit::TestGuest::assemble(64, handler, |a| {
        a.swapgs()?;
        a.hlt()?;
        Ok(())
    });
    g.write_bytes(handler, &h);
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = g.vcpu.get_regs();
    let s = g.vcpu.get_sregs();
    assert_eq!(r.rax, 0x77);
    assert_eq!(r.rcx, user + 5 + 2, "return RIP after SYSCALL");
    assert_eq!(r.r11, 0x202, "RFLAGS at SYSCALL");
    assert_eq!(r.rflags & 0x200, 0, "SFMASK cleared IF");
    assert_eq!((s.cs.selector, s.cs.dpl, s.cs.l), (0x08, 0, 1));
    assert_eq!((s.ss.selector, s.ss.dpl), (0x10, 0));
    assert_eq!(s.gs.base, 0x5555_0000);
    assert_eq!(r.rip, handler + 3 + 1);
}

#[test]
fn interrupt_stack_table() {
    // Gate 14 with IST1: the #PF handler runs on TSS.IST1 (STACK0 - 0x800), aligned.
    let g = long_guest(0, &[], |a| {
        a.mov(rsp, 0x8ff3u64)?; // an unaligned stack that must not be used
        a.mov(rbx, 0x40_0000u64)?;
        a.mov(rax, qword_ptr(rbx))?;
        Ok(())
    });
    let lo = g.read_u64(IDT + 16 * 14);
    g.write_u64(IDT + 16 * 14, lo | (1 << 32));
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = report(&g);
    assert_eq!(r.vector, 14);
    // The stub popped the error code: 5 of the 6 pushed words remain.
    assert_eq!(r.rsp_at_entry, STACK0 - 0x800 - 5 * 8);
    assert_eq!(
        g.read_u64(STACK0 - 0x800 - 16),
        0x8ff3,
        "old RSP in the frame"
    );
}
