//! Random instruction bytes in every mode: KVM_RUN never panics, returns an exit or
//! an errno, and the MMU audit holds afterwards.

mod run_guest;

use kvmmmu_core::paging::PagingMode;
use kvmmmu_core::testkit::TestGuest;
use proptest::prelude::*;
use run_guest::*;

fn build(mode: u8) -> TestGuest {
    match mode {
        0 => real_guest(|a| a.nop()),
        1 => pm32_guest(PagingMode::None, 0, &[], |a| a.nop()),
        2 => pm32_guest(PagingMode::Bits32, 0, &[], |a| a.nop()),
        3 => pm32_guest(PagingMode::Pae, 3, &[CODE, STACK3 - 0x1000], |a| a.nop()),
        4 => long_guest(0, &[], |a| a.nop()),
        _ => long_guest(3, &[CODE, STACK3 - 0x1000], |a| a.nop()),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]
    #[test]
    fn random_code_never_panics(
        mode in 0u8..6,
        code in proptest::collection::vec(any::<u8>(), 1..64),
        regs in proptest::array::uniform8(any::<u64>()),
        tf in any::<bool>(),
    ) {
        let g = build(mode);
        g.write_bytes(CODE, &code);
        let mut r = g.vcpu.get_regs();
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rbp, r.r8) =
            (regs[0], regs[1], regs[2], regs[3], regs[4], regs[5], regs[6], regs[7]);
        if tf {
            r.rflags |= 0x100;
        }
        g.vcpu.set_regs(&r).unwrap();
        g.vcpu.set_instruction_budget(Some(5000));
        for _ in 0..8 {
            let (res, reason) = g.run();
            if res.is_err() || reason == kvmmmu_core::vcpu::run::KVM_EXIT_SHUTDOWN {
                break;
            }
        }
        prop_assert!(g.audit().is_ok(), "{:?}", g.audit());
    }
}
