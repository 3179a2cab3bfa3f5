//! Property: for random page tables (random entries in a small pool of
//! pages, most pointing back into the pool, some of the pool absent or
//! read-only), random CPU state, random gva and two random accesses in a row,
//! the walker and the SDM oracle agree on the outcome and on guest memory
//! afterwards (plus the A/D write sequence and dirty log when no entry of the
//! walk aliases another).

mod common;

use common::*;
use proptest::prelude::*;

/// 4 MiB-aligned, so that pool addresses in a 4 MiB PDE only touch the
/// PSE-36 bits 16:13, never the reserved 21:17.
const POOL_BASE: u64 = 0x400;
const POOL: usize = 8;
/// Levels whose index gets an entry in every pool page.
const LEVELS: usize = 5;

#[derive(Clone, Copy, Debug)]
struct RawEntry {
    kind: u8,
    target: u8,
    low: u16,
    high: u16,
    noise: u8,
}

fn raw_entry() -> impl Strategy<Value = RawEntry> {
    (0u8..12, 0u8..16, any::<u16>(), any::<u16>(), 0u8..64).prop_map(
        |(kind, target, low, high, noise)| RawEntry {
            kind,
            target,
            low,
            high,
            noise,
        },
    )
}

impl RawEntry {
    /// An 8-byte entry: mostly present, mostly pointing into the pool, now
    /// and then with bits 52-63 or a stray address bit set.
    fn value64(self) -> u64 {
        let gfn = if self.target < POOL as u8 + 6 {
            POOL_BASE + (self.target as u64 % POOL as u64)
        } else {
            0x1000 + self.target as u64
        };
        // PS in about a quarter of the entries, with a 1 GiB-aligned frame
        // (a usable 2M/1G page; as a table pointer it has no memslot).
        let mut v = (gfn << 12) | (self.low as u64 & 0xf7f);
        if self.kind % 4 == 2 {
            v = PTE_PS | ((self.target as u64 & 0xf) << 30) | (self.low as u64 & 0xf7f);
        }
        if self.kind < 10 {
            v |= PTE_P;
        }
        if self.kind % 5 == 0 {
            v |= (self.high as u64 & 0xfff) << 52;
        }
        if self.kind % 6 == 1 && self.noise >= 12 {
            v |= 1 << self.noise;
        }
        v
    }
    /// A 4-byte entry.
    fn value32(self) -> u64 {
        let gfn = POOL_BASE + (self.target as u64 % POOL as u64);
        let mut v = (gfn << 12) | (self.low as u64 & 0xfff);
        if self.kind < 10 {
            v |= PTE_P;
        }
        if self.kind % 5 == 0 {
            // PSE-36 / reserved bits of a 4 MiB PDE.
            v |= (self.high as u64 & 0x1ff) << 13;
        }
        v & 0xffff_ffff
    }
}

#[derive(Clone, Debug)]
struct Scenario {
    cpu: OracleCpu,
    mem: OracleMem,
    gva: u64,
    accesses: [OracleAccess; 2],
}

fn access() -> impl Strategy<Value = OracleAccess> {
    (any::<bool>(), 0u8..3, any::<bool>()).prop_map(|(user, kind, implicit)| {
        let fetch = kind == 2;
        OracleAccess {
            user,
            write: kind == 1,
            fetch,
            implicit: implicit && !user && !fetch,
        }
    })
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        (0u8..5, any::<u16>(), any::<u32>(), any::<bool>()),
        (
            prop::sample::select(vec![36u8, 39, 40, 46, 48, 52]),
            any::<bool>(),
            0u8..POOL as u8,
            0u8..128,
        ),
        prop::collection::vec(0u8..10, POOL),
        prop::collection::vec(raw_entry(), POOL * LEVELS),
        prop::collection::vec((any::<bool>(), 0u8..POOL as u8, any::<u8>()), 4),
        (any::<u64>(), 0u8..10),
        (access(), access()),
    )
        .prop_map(
            |(
                (mode, cr_bits, pkru, ac),
                (maxphy, gbpages, cr3_page, cr3_off),
                slots,
                entries,
                pdptes,
                (gva_raw, gva_kind),
                (a1, a2),
            )| {
                let mode = match mode {
                    0 => Mode::Off,
                    1 => Mode::Bits32 { pse: false },
                    2 => Mode::Pae,
                    3 => Mode::Level4,
                    _ => Mode::Level5,
                };
                let mut cpu = mode.cpu();
                let b = |i: u32| cr_bits & (1 << i) != 0;
                // Random controls on top of the mode's own bits (CR4.LA57
                // and CR4.PKE also outside long mode: they must be ignored).
                if b(0) {
                    cpu.cr0 |= CR0_WP;
                }
                if b(1) {
                    cpu.efer |= EFER_NXE;
                }
                if b(2) {
                    cpu.cr4 |= CR4_SMEP;
                }
                if b(3) {
                    cpu.cr4 |= CR4_SMAP;
                }
                if b(4) {
                    cpu.cr4 |= CR4_PKE;
                }
                if b(5) {
                    cpu.cr4 |= CR4_PSE;
                }
                if b(6) && mode != Mode::Level4 {
                    cpu.cr4 |= CR4_LA57;
                }
                cpu.maxphyaddr = maxphy;
                cpu.gbpages = gbpages;
                cpu.pkru = pkru;
                cpu.rflags_ac = ac;

                let mut mem = OracleMem::default();
                for (i, s) in slots.iter().enumerate() {
                    let gfn = POOL_BASE + i as u64;
                    match s {
                        0 => {} // no memslot
                        1 => {
                            mem.add_page(gfn);
                            mem.read_only.insert(gfn);
                        }
                        _ => mem.add_page(gfn),
                    }
                }

                // gva_kind 1: the same index at every level, so that a page
                // reached at two levels yields the same entry (aliasing, as
                // in a recursive mapping: KVM's cmpxchg must retry).
                let gva_raw = if gva_kind == 1 {
                    let i = gva_raw & 0x1ff;
                    let same = if mode.entry_size() == 4 {
                        i << 12 | i << 22
                    } else {
                        i << 12 | i << 21 | i << 30 | i << 39 | i << 48
                    };
                    same | (gva_raw >> 52)
                } else {
                    gva_raw
                };
                let gva = match mode {
                    Mode::Off => gva_raw,
                    Mode::Bits32 { .. } | Mode::Pae => gva_raw & 0xffff_ffff,
                    Mode::Level4 | Mode::Level5 => {
                        let bits = if mode == Mode::Level5 { 57 } else { 48 };
                        if gva_kind == 0 {
                            gva_raw // usually non-canonical
                        } else {
                            let sh = 64 - bits;
                            (((gva_raw << sh) as i64) >> sh) as u64
                        }
                    }
                };

                // Every pool page gets an entry at the index each level
                // would use for this gva, so walks go deep wherever they go.
                let size = mode.entry_size() as u64;
                for p in 0..POOL {
                    let page = (POOL_BASE + p as u64) << 12;
                    for l in 0..LEVELS {
                        let e = entries[p * LEVELS + l];
                        let level = l as u8 + 1;
                        let (idx, v) = if size == 4 {
                            if level > 2 {
                                continue;
                            }
                            (mode.index(gva, level), e.value32())
                        } else {
                            (mode.index(gva, level), e.value64())
                        };
                        mem.write(page + idx * size, size as usize, v);
                    }
                }

                cpu.cr3 = (POOL_BASE + cr3_page as u64) << 12;
                if mode == Mode::Pae {
                    cpu.cr3 |= (cr3_off as u64 & 0x7f) << 5;
                    // PDPTE registers hold only loadable values (SDM 4.4.1):
                    // present ones with no reserved bit, or not present.
                    for (i, (present, page, junk)) in pdptes.iter().enumerate() {
                        cpu.pdptrs[i] = if *present {
                            PTE_P | ((POOL_BASE + *page as u64) << 12) | (*junk as u64 & 0x18)
                        } else {
                            (*junk as u64) & !1
                        };
                    }
                } else {
                    // CR3 low bits (PWT/PCD, or PCID) are not address bits.
                    cpu.cr3 |= cr3_off as u64 & 0x18;
                }
                Scenario {
                    cpu,
                    mem,
                    gva,
                    accesses: [a1, a2],
                }
            },
        )
}

fn cases() -> u32 {
    if let Some(n) = std::env::var("WALK_PROPS_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        return n;
    }
    if cfg!(debug_assertions) {
        10_000
    } else {
        100_000
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), ..ProptestConfig::default() })]

    #[test]
    fn walker_matches_oracle(s in scenario()) {
        let tmem = TestMem::new(&s.mem);
        let mut omem = s.mem.clone();
        let paging_off = paging_mode(&s.cpu) == PagingMode::None;
        for (i, acc) in s.accesses.iter().enumerate() {
            let exp = observe_oracle(&s.cpu, &omem, s.gva, *acc);
            let got = observe_walker(&s.cpu, &tmem, s.gva, *acc);
            let aliased = has_aliases(&exp.outcome);
            let opts = CompareOpts { exact_writes: !aliased, gptes_modulo_ad: aliased };
            let d = diff(paging_off, &exp, &got, opts);
            prop_assert!(
                d.is_empty(),
                "access #{} {:?} to gva {:#x} with cpu {:x?}:{}",
                i + 1, acc, s.gva, s.cpu, d
            );
            omem = exp.mem_after;
        }
    }
}

/// The generator reaches every kind of outcome (checked on the oracle alone,
/// with a fixed seed), so the property above is not vacuous.
#[test]
fn scenario_coverage() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    use std::collections::BTreeMap;

    let mut runner = TestRunner::deterministic();
    let strat = scenario();
    let mut hist: BTreeMap<String, u32> = BTreeMap::new();
    let n = 20000;
    for _ in 0..n {
        let s = strat.new_tree(&mut runner).unwrap().current();
        let mode = paging_mode(&s.cpu);
        let r = oracle_walk(&s.cpu, &s.mem, s.gva, s.accesses[0]);
        let key = match &r.outcome {
            OracleOutcome::Ok { level, gptes, .. } => {
                if has_aliases(&r.outcome) {
                    *hist.entry("ok aliased".into()).or_default() += 1;
                }
                format!("{mode:?} ok level {level} ({} gptes)", gptes.len())
            }
            OracleOutcome::Fault {
                vector, error_code, ..
            } => format!(
                "{mode:?} fault #{vector} [{}]",
                fmt_pfec(*error_code & !(PF_W | PF_U | PF_ID))
            ),
        };
        *hist.entry(key).or_default() += 1;
        if !r.ad_writes.is_empty() {
            *hist.entry("A/D written".into()).or_default() += 1;
        }
    }
    for (k, v) in &hist {
        eprintln!("walk_props coverage: {k}: {v}");
    }
    for needed in [
        "Level4 ok level 1 (4 gptes)",
        "Level4 ok level 2 (3 gptes)",
        "Level4 ok level 3 (2 gptes)",
        "Level5 ok level 1 (5 gptes)",
        "Pae ok level 1 (3 gptes)",
        "Pae ok level 2 (2 gptes)",
        "Bits32 ok level 1 (2 gptes)",
        "Bits32 ok level 2 (1 gptes)",
        "Level4 fault #13 []",
        "Level4 fault #14 []",
        "Level4 fault #14 [P|RSVD]",
        "Level4 fault #14 [P]",
        "Level4 fault #14 [P|PK]",
        "Pae fault #14 [P|RSVD]",
        "Bits32 fault #14 [P|RSVD]",
        "ok aliased",
        "A/D written",
    ] {
        assert!(
            hist.get(needed).copied().unwrap_or(0) >= 5,
            "generator rarely produces '{needed}'"
        );
    }
}
