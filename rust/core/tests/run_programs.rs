//! Small programs of the data-movement, stack, string, conversion, condition and
//! control-flow groups, checked against the device: `data/programs_device.txt` holds
//! what each left in the 16 GPRs, RFLAGS and the 512 bytes at 0x8f00 when run on
//! /dev/kvm from the same start (KVM's emulator runs CPL0 code there). Regenerate:
//! `cargo test -p kvmmmu-core --test run_programs -- --ignored` (writes
//! `data/programs.txt`), then `python rust/core/tests/data/gen_programs_device.py`.

mod run_guest;

use iced_x86::code_asm::*;
use kvmmmu_core::testkit::TestGuest;
use kvmmmu_core::vcpu::run::KVM_EXIT_HLT;
use run_guest::*;

type Prog = fn(&mut CodeAssembler) -> Result<(), IcedError>;

/// The programs: each ends in HLT (appended).
fn programs() -> Vec<(&'static str, Prog)> {
    let mut v: Vec<(&'static str, Prog)> = vec![
        ("movs_rep_b", |a| a.rep().movsb()),
        ("movs_rep_w_df", |a| {
            a.std()?;
            a.rep().movsw()
        }),
        ("movs_rep_q", |a| a.rep().movsq()),
        ("stos_rep_d", |a| a.rep().stosd()),
        ("stos_rep_b_df", |a| {
            a.std()?;
            a.rep().stosb()
        }),
        ("lods_q", |a| {
            a.lodsq()?;
            a.lodsq()
        }),
        ("cmps_repe_b", |a| a.repe().cmpsb()),
        ("cmps_repne_w", |a| a.repne().cmpsw()),
        ("scas_repne_b", |a| {
            a.mov(al, 0x2a)?;
            a.repne().scasb()
        }),
        ("scas_repe_d", |a| a.repe().scasd()),
        ("movs_a32", |a| {
            a.mov(ecx, 3)?;
            // rep movsd with a 32-bit address size
            a.db(&[0x67, 0xf3, 0xa5])
        }),
        ("push_pop", |a| {
            a.push(rax)?;
            a.push(0x1234)?;
            a.push(qword_ptr(rsi))?;
            a.pop(rdx)?;
            a.pop(qword_ptr(rdi))?;
            a.pop(r9)?;
            a.push(ax)?;
            a.pop(r10w)
        }),
        ("pushf_popf", |a| {
            a.stc()?;
            a.pushfq()?;
            a.pop(rdx)?;
            a.or(rdx, 0x8d5)?;
            a.push(rdx)?;
            a.popfq()?;
            a.db(&[0x66, 0x9c])?; // pushfw
            a.pop(r8w)
        }),
        ("xchg_cmpxchg_xadd", |a| {
            a.xchg(qword_ptr(rsi), rax)?;
            a.mov(rax, qword_ptr(rdi))?;
            a.cmpxchg(qword_ptr(rdi), rbx)?;
            a.cmpxchg(dword_ptr(rdi + 8), ebx)?;
            a.lock().xadd(word_ptr(rdi + 16), cx)?;
            a.xadd(edx, edx)
        }),
        ("movzx_movsx", |a| {
            a.movzx(eax, byte_ptr(rsi + 0x7f))?;
            a.movsx(rbx, byte_ptr(rsi + 0x7f))?;
            a.movsx(ecx, word_ptr(rsi + 0x7e))?;
            a.movsxd(rdx, dword_ptr(rsi + 0x7c))?;
            a.movzx(r8, r9w)?;
            a.movsx(r10w, r11b)
        }),
        ("conversions", |a| {
            a.mov(rax, 0x8765_4321_fedc_ba98u64)?;
            a.cbw()?;
            a.mov(r8, rax)?;
            a.cwde()?;
            a.mov(r9, rax)?;
            a.cdqe()?;
            a.mov(r10, rax)?;
            a.cqo()?;
            a.mov(r11, rdx)?;
            a.mov(eax, 0x8000)?;
            a.cwd()?;
            a.mov(r12, rdx)?;
            a.cdq()
        }),
        ("setcc_cmov", |a| {
            a.cmp(rax, rbx)?;
            a.seta(byte_ptr(rdi))?;
            a.setae(byte_ptr(rdi + 1))?;
            a.setb(byte_ptr(rdi + 2))?;
            a.setbe(byte_ptr(rdi + 3))?;
            a.setg(byte_ptr(rdi + 4))?;
            a.setge(byte_ptr(rdi + 5))?;
            a.setl(byte_ptr(rdi + 6))?;
            a.setle(byte_ptr(rdi + 7))?;
            a.sets(byte_ptr(rdi + 8))?;
            a.seto(byte_ptr(rdi + 9))?;
            a.setp(byte_ptr(rdi + 10))?;
            a.setne(byte_ptr(rdi + 11))?;
            a.cmovg(r8, rcx)?;
            a.cmovl(r9, rcx)?;
            a.cmovb(r10d, ecx)?;
            a.cmovae(r11d, ecx)?;
            a.cmovo(r12w, cx)
        }),
        ("lea_forms", |a| {
            a.lea(r8, ptr(rax + rbx * 4 + 0x10))?;
            a.lea(r9d, ptr(rcx + rdx * 8 - 8))?;
            a.lea(r10w, ptr(rsi + 0x7fff))?;
            a.lea(r11, ptr(rbx * 2))?;
            a.lea(r12d, ptr(eax + ecx))
        }),
        ("enter_leave", |a| {
            a.mov(rbp, 0x8800u64)?;
            a.enter(0x20, 0)?;
            a.mov(qword_ptr(rbp - 8), rax)?;
            a.leave()
        }),
        // KVM's emulator does not nest (internal error on the device): not compared.
        ("enter_nested", |a| {
            a.mov(rbp, 0x8800u64)?;
            a.enter(0x10, 2)?;
            a.mov(r8, rbp)?;
            a.mov(r9, rsp)?;
            a.leave()
        }),
        ("loops", |a| {
            let mut l1 = a.create_label();
            let mut l2 = a.create_label();
            let mut l3 = a.create_label();
            a.xor(edx, edx)?;
            a.set_label(&mut l1)?;
            a.inc(edx)?;
            a.loop_(l1)?;
            a.mov(ecx, 10)?;
            a.set_label(&mut l2)?;
            a.cmp(edx, 5)?;
            a.inc(edx)?;
            a.loopne(l2)?;
            a.mov(r8, rcx)?;
            a.jrcxz(l3)?;
            a.mov(ecx, 0)?;
            a.set_label(&mut l3)?;
            a.mov(r9, rcx)
        }),
        ("bt_memory", |a| {
            a.mov(rcx, 67u64)?;
            a.bts(qword_ptr(rdi), rcx)?;
            a.mov(rcx, -5i64 as u64)?;
            a.btc(dword_ptr(rdi + 16), ecx)?;
            a.btr(word_ptr(rsi), 3)?;
            a.setc(dl)?;
            a.bt(qword_ptr(rsi + 8), 63)?;
            a.setc(dh)
        }),
        ("memory_rmw", |a| {
            a.neg(qword_ptr(rsi))?;
            a.not(dword_ptr(rsi + 8))?;
            a.inc(word_ptr(rsi + 12))?;
            a.dec(byte_ptr(rsi + 14))?;
            a.add(qword_ptr(rdi), 0x7f)?;
            a.sub(dword_ptr(rdi + 8), -1)?;
            a.adc(byte_ptr(rdi + 12), 0x80u32 as i32)?;
            a.shl(qword_ptr(rdi + 16), 3)?;
            a.rcr(word_ptr(rdi + 24), cl)?;
            a.imul_3(r8, qword_ptr(rsi), 0x1234)?;
            a.imul_2(r9d, dword_ptr(rdi))
        }),
        ("lahf_sahf_bswap", |a| {
            a.cmp(eax, ebx)?;
            a.lahf()?;
            a.mov(r8, rax)?;
            a.mov(ah, 0xd5)?;
            a.sahf()?;
            a.bswap(rbx)?;
            a.bswap(ecx)
        }),
        ("div_idiv", |a| {
            a.mov(rax, 0x1234_5678_9abc_def0u64)?;
            a.xor(edx, edx)?;
            a.mov(rcx, 0x1_0000_0001u64)?;
            a.div(rcx)?;
            a.mov(r8, rax)?;
            a.mov(r9, rdx)?;
            a.mov(eax, -1000i32)?;
            a.cdq()?;
            a.mov(ecx, 7)?;
            a.idiv(ecx)?;
            a.mov(ax, 500)?;
            a.mov(cl, -7i32)?;
            a.idiv(cl)
        }),
        ("call_ret", |a| {
            let mut f = a.create_label();
            let mut end = a.create_label();
            a.call(f)?;
            a.mov(r8, rsp)?;
            a.jmp(end)?;
            a.set_label(&mut f)?;
            a.mov(r9, qword_ptr(rsp))?;
            a.push(rax)?;
            a.pop(rax)?;
            a.ret_1(0)?;
            a.set_label(&mut end)?;
            a.lea(rax, ptr(f))?;
            a.push(rax)?;
            a.call(qword_ptr(rsp))?;
            a.mov(r10, rsp)
        }),
        ("moffs_and_sizes", |a| {
            a.mov(al, byte_ptr(0x9004u64))?;
            a.mov(ax, word_ptr(0x9006u64))?;
            a.mov(qword_ptr(0x9088u64), rax)?;
            a.mov(r8b, 0x11)?;
            a.mov(r9w, 0x2222)?;
            a.mov(r10d, 0x3333_3333)?;
            a.mov(ah, bl)?;
            a.mov(byte_ptr(rdi + 3), ch)
        }),
        ("system_regs", |a| {
            a.mov(word_ptr(rdi), 0x27)?;
            a.mov(qword_ptr(rdi + 2), 0x3000)?;
            a.lgdt(ptr(rdi))?;
            a.sgdt(ptr(rdi + 16))?;
            a.smsw(edx)?;
            a.mov(r8, cr0)?;
            a.mov(r9, cr4)?;
            a.mov(rax, r9)?;
            a.or(rax, 0x80)?; // PGE
            a.mov(cr4, rax)?;
            a.mov(r10, cr4)?;
            a.mov(r11, cr8)?;
            a.mov(rax, 0x1234u64)?;
            a.mov(dr0, rax)?;
            a.mov(r12, dr0)?;
            a.mov(r13, dr7)?;
            a.mov(r14, dr6)?;
            a.mov(ecx, 0xc000_0080u32)?;
            a.rdmsr()?;
            a.mov(r15, rax)?;
            a.clts()?;
            a.lmsw(bx)?;
            a.mov(rbx, cr0)?;
            a.invlpg(ptr(rsi))
        }),
        // Beyond KVM's emulator (internal error on the device): not compared.
        ("cmpxchg16b", |a| {
            a.mov(rax, qword_ptr(rsi))?;
            a.mov(rdx, qword_ptr(rsi + 8))?;
            a.cmpxchg16b(xmmword_ptr(rsi))?;
            a.setz(r8b)
        }),
        ("cmpxchg8b", |a| {
            a.cmpxchg8b(qword_ptr(rdi))?;
            a.setz(r9b)?;
            a.cmpxchg8b(qword_ptr(rdi))?;
            a.setz(r10b)
        }),
        // Beyond KVM's emulator: checked by `bit_counts_and_cmpxchg16b` instead.
        ("bit_counts", |a| {
            a.popcnt(r8, rax)?;
            a.lzcnt(r9d, ebx)?;
            a.tzcnt(r10w, cx)?;
            a.xor(edx, edx)?;
            a.tzcnt(r11, rdx)?;
            a.pushfq()?;
            a.pop(r12)
        }),
        ("xlat_clflush_fsbase", |a| {
            a.mov(rbx, rsi)?;
            a.mov(al, 0x35)?;
            a.xlatb()?;
            a.clflush(byte_ptr(rsi))?;
            a.mov(ecx, 0xc000_0100u32)?;
            a.mov(eax, 0x1000)?;
            a.xor(edx, edx)?;
            a.wrmsr()?;
            a.mov(r8, qword_ptr(0))?; // fs not used: DS
            a.mov(r9, qword_ptr(0x9000))?;
            a.db(&[0x64, 0x48, 0x8b, 0x04, 0x25, 0x00, 0x80, 0x00, 0x00])?; // mov rax, fs:[0x8000]
            a.rdmsr()
        }),
        ("shifts_memory", |a| {
            a.mov(cl, 5)?;
            a.shld(qword_ptr(rsi), rbx, cl)?;
            a.shrd(dword_ptr(rsi + 8), ebx, 7)?;
            a.sar(word_ptr(rsi + 12), cl)?;
            a.rol(byte_ptr(rsi + 14), 1)?;
            a.ror(qword_ptr(rsi + 16), cl)
        }),
    ];
    v.sort_by_key(|p| p.0);
    v
}

/// 32-bit protected-mode programs (no paging, flat segments, CPL0).
fn programs32() -> Vec<(&'static str, Prog)> {
    let mut v: Vec<(&'static str, Prog)> = vec![
        ("pm32_movs_rep_b", |a| a.rep().movsb()),
        ("pm32_movs_rep_w_a16", |a| {
            a.mov(ecx, 0x1_0003)?; // only CX counts with a 16-bit address size
            a.db(&[0x67, 0xf3, 0x66, 0xa5]) // rep movsw, a16
        }),
        ("pm32_stos_lods", |a| {
            a.rep().stosd()?;
            a.lodsd()?;
            a.std()?;
            a.lodsw()
        }),
        ("pm32_cmps_scas", |a| {
            a.repe().cmpsd()?;
            a.mov(al, 0x2a)?;
            a.repne().scasb()
        }),
        ("pm32_push_pop", |a| {
            a.push(eax)?;
            a.push(0x1234)?;
            a.push(dword_ptr(esi))?;
            a.pop(edx)?;
            a.pop(dword_ptr(edi))?;
            a.pop(ebx)?;
            a.push(ax)?;
            a.pop(bp)?;
            a.pushfd()?;
            a.pop(ecx)
        }),
        ("pm32_pusha_popa", |a| {
            a.pushad()?;
            a.mov(eax, dword_ptr(esp + 12))?;
            a.mov(dword_ptr(esp), 0x55)?;
            a.popad()
        }),
        ("pm32_alu16", |a| {
            a.add(ax, bx)?;
            a.adc(cx, 0x7fff)?;
            a.sub(word_ptr(esi), dx)?;
            a.imul_3(bp, word_ptr(edi), -3)?;
            a.mul(word_ptr(esi + 2))?;
            a.shl(dx, 4)?;
            a.xchg(ah, al)
        }),
        ("pm32_call_ret_loop", |a| {
            let mut f = a.create_label();
            let mut end = a.create_label();
            let mut l = a.create_label();
            a.call(f)?;
            a.jmp(end)?;
            a.set_label(&mut f)?;
            a.mov(ebp, dword_ptr(esp))?;
            a.ret_1(0)?;
            a.set_label(&mut end)?;
            a.mov(ecx, 7)?;
            a.set_label(&mut l)?;
            a.add(edx, ecx)?;
            a.loop_(l)?;
            a.cwd()?;
            a.cbw()?;
            a.cdq()
        }),
    ];
    v.sort_by_key(|p| p.0);
    v
}

/// The start state: GPRs, RSP 0x8000, RSI 0x9000, RDI 0x9080, RCX 5, data bytes.
fn start(g: &TestGuest) {
    let mut data = [0u8; 512];
    for (i, b) in data.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(7).wrapping_add(3) ^ if i % 17 == 0 { 0x2a } else { 0 };
    }
    data.copy_within(0x100..0x110, 0x180);
    g.write_bytes(0x8f00, &data);
    let mut r = g.vcpu.get_regs();
    let vals: [u64; 16] = std::array::from_fn(|i| {
        0x0123_4567_89ab_cdefu64.rotate_left(8 * i as u32) ^ (i as u64 * 0x1111)
    });
    (r.rax, r.rbx, r.rdx, r.rbp) = (vals[0], vals[3], vals[2], vals[5]);
    (r.r8, r.r9, r.r10, r.r11) = (vals[8], vals[9], vals[10], vals[11]);
    (r.r12, r.r13, r.r14, r.r15) = (vals[12], vals[13], vals[14], vals[15]);
    (r.rcx, r.rsi, r.rdi, r.rsp) = (5, 0x9000, 0x9080, 0x8000);
    (r.rip, r.rflags) = (CODE, 2);
    g.vcpu.set_regs(&r).unwrap();
}

fn outcome(g: &TestGuest, bits: u32) -> String {
    let r = g.vcpu.get_regs();
    let regs = [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15,
    ];
    let n = if bits == 64 { 16 } else { 8 };
    let mask = if bits == 64 { u64::MAX } else { 0xffff_ffff };
    let regs: Vec<String> = regs[..n]
        .iter()
        .map(|v| format!("{:x}", v & mask))
        .collect();
    let mem: String = g
        .read_bytes(0x8f00, 512)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    format!("{} {:x} {}", regs.join(" "), r.rflags & 0xfff, mem)
}

fn assemble(p: Prog, bits: u32) -> Vec<u8> {
    TestGuest::assemble(bits, CODE, |a| {
        p(a)?;
        a.hlt()
    })
}

fn all_programs() -> Vec<(&'static str, Prog, u32)> {
    let mut v: Vec<_> = programs().into_iter().map(|(n, p)| (n, p, 64)).collect();
    v.extend(programs32().into_iter().map(|(n, p)| (n, p, 32)));
    v
}

#[test]
#[ignore = "writes data/programs.txt for the device generator"]
fn dump_programs() {
    let mut out = String::from("# name code-hex (run_programs.rs); first the start state\n");
    let g = long_guest(0, &[], |a| a.nop());
    start(&g);
    out.push_str(&format!("start {}\n", outcome(&g, 64)));
    for (name, p, bits) in all_programs() {
        let code: String = assemble(p, bits)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        out.push_str(&format!("{name} {bits} {code}\n"));
    }
    std::fs::write(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/programs.txt"),
        out,
    )
    .unwrap();
}

#[test]
fn programs_match_the_device() {
    let want: std::collections::BTreeMap<&str, &str> = include_str!("data/programs_device.txt")
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .collect();
    let mut failures = Vec::new();
    for (name, p, bits) in all_programs() {
        let Some(w) = want.get(name) else {
            failures.push(format!("{name}: not recorded"));
            continue;
        };
        if w.starts_with("skip") {
            continue;
        }
        let g = if bits == 64 {
            long_guest(0, &[], |a| a.nop())
        } else {
            pm32_guest(kvmmmu_core::paging::PagingMode::None, 0, &[], |a| a.nop())
        };
        g.write_bytes(CODE, &assemble(p, bits));
        start(&g);
        let (r, reason) = g.run();
        let got = outcome(&g, bits);
        if r != Ok(0) || reason != KVM_EXIT_HLT || got != *w {
            let gw: Vec<&str> = got.split(' ').collect();
            let ww: Vec<&str> = w.split(' ').collect();
            let diffs: Vec<String> = gw
                .iter()
                .zip(&ww)
                .enumerate()
                .filter(|(_, (a, b))| a != b)
                .map(|(i, (a, b))| format!("field {i}: sim {a} device {b}"))
                .collect();
            failures.push(format!("{name} ({r:?} {reason}): {}", diffs.join("; ")));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// A guest holding the 64-bit program `name`, in the start state.
fn load_program(name: &str) -> TestGuest {
    let g = long_guest(0, &[], |a| a.nop());
    let (_, p) = programs()
        .into_iter()
        .find(|p| p.0 == name)
        .expect("program");
    g.write_bytes(CODE, &assemble(p, 64));
    start(&g);
    g
}

/// Runs the 64-bit program `name` from the start state to its HLT; returns the guest
/// and the registers it started with.
fn run_program(name: &str) -> (TestGuest, kvmmmu_core::uapi::kvm_regs) {
    let g = load_program(name);
    let r0 = g.vcpu.get_regs();
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT), "{name}");
    (g, r0)
}

#[test]
fn bit_counts_and_cmpxchg16b() {
    // What the device cannot run (its emulator has no POPCNT/LZCNT/TZCNT/CMPXCHG16B).
    let (g, r0) = run_program("bit_counts");
    let r = g.vcpu.get_regs();
    assert_eq!(r.r8, u64::from(r0.rax.count_ones()));
    assert_eq!(
        r.r9 & 0xffff_ffff,
        u64::from((r0.rbx as u32).leading_zeros())
    );
    assert_eq!(r.r10 & 0xffff, u64::from((r0.rcx as u16).trailing_zeros()));
    assert_eq!(r.r11, 64);
    // TZCNT of zero: CF set, ZF clear.
    assert_eq!(r.r12 & 0x41, 0x01);

    let (g, r0) = run_program("cmpxchg16b");
    let r = g.vcpu.get_regs();
    assert_eq!(r.r8 & 0xff, 1, "equal: ZF");
    assert_eq!(g.read_u64(0x9000), r0.rbx);
    assert_eq!(g.read_u64(0x9008), r0.rcx);
}

#[test]
fn enter_nested_builds_the_display() {
    // The device's emulator cannot nest ENTER (internal error), so the frame is the
    // SDM's: ENTER 0x10, 2 from RSP 0x8000, RBP 0x8800 pushes RBP, the enclosing
    // frame pointer read at RBP - 8, the new frame pointer 0x7ff8, then reserves 0x10.
    let g = load_program("enter_nested");
    g.write_u64(0x87f8, 0x0bad_f00d_1234_5678);
    assert_eq!(g.run(), (Ok(0), KVM_EXIT_HLT));
    let r = g.vcpu.get_regs();
    assert_eq!((r.r8, r.r9), (0x7ff8, 0x7fd8), "RBP and RSP after ENTER");
    assert_eq!((r.rbp, r.rsp), (0x8800, 0x8000), "after LEAVE");
    assert_eq!(g.read_u64(0x7ff8), 0x8800);
    assert_eq!(g.read_u64(0x7ff0), 0x0bad_f00d_1234_5678);
    assert_eq!(g.read_u64(0x7fe8), 0x7ff8);
}
