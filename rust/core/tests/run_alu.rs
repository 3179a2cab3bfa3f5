//! Arithmetic, logic, shift, bit and multiply/divide instructions against the
//! device: `data/alu_device.txt` holds 4204 cases (instruction bytes, inputs) with
//! what the device computed (its emulator runs the host CPU's instruction, so its
//! flags are this machine's, undefined ones included). BSF/BSR compare only ZF.

mod run_guest;

use kvmmmu_core::vcpu::run::KVM_EXIT_HLT;
use run_guest::*;

const CASES: &str = include_str!("data/alu_device.txt");

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s, 16).expect("hex")
}

#[test]
fn alu_matches_the_device() {
    let g = long_guest(0, &[], |a| a.nop());
    let mut failures = Vec::new();
    let mut n = 0;
    for line in CASES.lines().filter(|l| !l.starts_with('#')) {
        let (input, output) = line.split_once(" | ").expect("two halves");
        let i: Vec<&str> = input.split(' ').collect();
        let o: Vec<u64> = output.split(' ').map(hex).collect();
        let mut code: Vec<u8> = (0..i[0].len())
            .step_by(2)
            .map(|k| u8::from_str_radix(&i[0][k..k + 2], 16).expect("byte"))
            .collect();
        // pushfq; pop rsi; hlt
        code.extend_from_slice(&[0x9c, 0x5e, 0xf4]);
        g.write_bytes(CODE, &code);
        let mut r = g.vcpu.get_regs();
        (r.rip, r.rsp) = (CODE, STACK0);
        (r.rax, r.rbx, r.rcx, r.rdx, r.rsi) = (hex(i[1]), hex(i[2]), hex(i[3]), 0, 0);
        r.rflags = hex(i[4]);
        g.vcpu.set_regs(&r).unwrap();
        let (res, reason) = g.run();
        let r = g.vcpu.get_regs();
        let got = (r.rax, r.rbx, r.rcx, r.rdx, r.rsi & o[4]);
        let want = (o[0], o[1], o[2], o[3], o[5] & o[4]);
        if res != Ok(0) || reason != KVM_EXIT_HLT || got != want {
            failures.push(format!("{input}: got {got:x?}, device {want:x?}"));
        }
        n += 1;
    }
    assert!(n > 4000);
    assert!(
        failures.is_empty(),
        "{} of {n} differ:\n{}",
        failures.len(),
        failures[..failures.len().min(20)].join("\n")
    );
}
