//! Arithmetic flags (OF, SF, ZF, AF, PF, CF) of the ALU instructions. Where the SDM
//! leaves a flag undefined, the value chosen is documented at the function.

use super::size_mask;

pub mod flags {
    pub const CF: u64 = 1 << 0;
    pub const FIXED: u64 = 1 << 1;
    pub const PF: u64 = 1 << 2;
    pub const AF: u64 = 1 << 4;
    pub const ZF: u64 = 1 << 6;
    pub const SF: u64 = 1 << 7;
    pub const TF: u64 = 1 << 8;
    pub const IF: u64 = 1 << 9;
    pub const DF: u64 = 1 << 10;
    pub const OF: u64 = 1 << 11;
    pub const IOPL: u64 = 3 << 12;
    pub const NT: u64 = 1 << 14;
    pub const RF: u64 = 1 << 16;
    pub const VM: u64 = 1 << 17;
    pub const AC: u64 = 1 << 18;
    pub const VIF: u64 = 1 << 19;
    pub const VIP: u64 = 1 << 20;
    pub const ID: u64 = 1 << 21;
    pub const ARITH: u64 = CF | PF | AF | ZF | SF | OF;
}

use flags::*;

fn sign_bit(size: u32) -> u64 {
    1u64 << (size * 8 - 1)
}

/// SF, ZF and PF of a result.
pub fn szp(r: u64, size: u32) -> u64 {
    let r = r & size_mask(size);
    let mut f = 0;
    if r == 0 {
        f |= ZF;
    }
    if r & sign_bit(size) != 0 {
        f |= SF;
    }
    if (r as u8).count_ones() % 2 == 0 {
        f |= PF;
    }
    f
}

/// a + b + carry.
pub fn add(a: u64, b: u64, carry: bool, size: u32) -> (u64, u64) {
    let m = size_mask(size);
    let (a, b) = (a & m, b & m);
    let wide = u128::from(a) + u128::from(b) + u128::from(carry);
    let r = (wide as u64) & m;
    let mut f = szp(r, size);
    if wide > u128::from(m) {
        f |= CF;
    }
    if (a ^ r) & (b ^ r) & sign_bit(size) != 0 {
        f |= OF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= AF;
    }
    (r, f)
}

/// a - b - borrow.
pub fn sub(a: u64, b: u64, borrow: bool, size: u32) -> (u64, u64) {
    let m = size_mask(size);
    let (a, b) = (a & m, b & m);
    let r = a.wrapping_sub(b).wrapping_sub(u64::from(borrow)) & m;
    let mut f = szp(r, size);
    if u128::from(a) < u128::from(b) + u128::from(borrow) {
        f |= CF;
    }
    if (a ^ b) & (a ^ r) & sign_bit(size) != 0 {
        f |= OF;
    }
    if (a ^ b ^ r) & 0x10 != 0 {
        f |= AF;
    }
    (r, f)
}

/// AND/OR/XOR/TEST: CF = OF = 0, AF = 0 (undefined).
pub fn logic(r: u64, size: u32) -> (u64, u64) {
    let r = r & size_mask(size);
    (r, szp(r, size))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shift {
    Rol,
    Ror,
    Rcl,
    Rcr,
    Shl,
    Shr,
    Sar,
}

/// A shift or rotate of `a` by `count` (already masked to 5 or 6 bits) with the
/// incoming flags `fl`; None when the count leaves everything unchanged. Undefined
/// flags: OF for counts above 1 is that of the first step; AF = 0.
pub fn shift(op: Shift, a: u64, count: u32, size: u32, fl: u64) -> Option<(u64, u64)> {
    let bits = size * 8;
    let m = size_mask(size);
    let a = a & m;
    let sb = sign_bit(size);
    let cf_in = fl & CF != 0;
    match op {
        Shift::Rol | Shift::Ror => {
            if count == 0 {
                return None;
            }
            let c = count % bits;
            let r = if c == 0 {
                a
            } else if op == Shift::Rol {
                ((a << c) | (a >> (bits - c))) & m
            } else {
                ((a >> c) | (a << (bits - c))) & m
            };
            let mut f = fl & !(CF | OF);
            let cf = if op == Shift::Rol {
                r & 1 != 0
            } else {
                r & sb != 0
            };
            if cf {
                f |= CF;
            }
            if first_step_of(op, a, size, cf_in) {
                f |= OF;
            }
            Some((r, f))
        }
        Shift::Rcl | Shift::Rcr => {
            let c = count % (bits + 1);
            if c == 0 {
                return None;
            }
            let mut r = u128::from(a) | (u128::from(cf_in) << bits);
            let w = bits + 1;
            let wm = (1u128 << w) - 1;
            r = if op == Shift::Rcl {
                ((r << c) | (r >> (w - c))) & wm
            } else {
                ((r >> c) | (r << (w - c))) & wm
            };
            let cf = (r >> bits) & 1 != 0;
            let res = (r as u64) & m;
            let mut f = fl & !(CF | OF);
            if cf {
                f |= CF;
            }
            if first_step_of(op, a, size, cf_in) {
                f |= OF;
            }
            Some((res, f))
        }
        Shift::Shl | Shift::Shr | Shift::Sar => {
            if count == 0 {
                return None;
            }
            let (r, cf) = match op {
                Shift::Shl => {
                    let r = if count >= 64 { 0 } else { (a << count) & m };
                    let cf = count <= bits && (a >> (bits - count)) & 1 != 0;
                    (r, cf)
                }
                Shift::Shr => {
                    let r = if count >= 64 { 0 } else { a >> count };
                    let cf = count <= bits && (a >> (count - 1)) & 1 != 0;
                    (r, cf)
                }
                _ => {
                    let sa = super::sign_extend(a, size) as i64;
                    let r = (sa >> count.min(63)) as u64 & m;
                    let cf = (sa >> (count - 1).min(63)) & 1 != 0;
                    (r, cf)
                }
            };
            let mut f = szp(r, size);
            if cf {
                f |= CF;
            }
            if first_step_of(op, a, size, cf_in) {
                f |= OF;
            }
            Some((r, f))
        }
    }
}

/// OF of a shift or rotate: defined for a count of 1; for larger counts the value
/// the first one-bit step gives (what this machine's CPU reports through the
/// device, whose emulator runs the host's instruction).
fn first_step_of(op: Shift, a: u64, size: u32, cf_in: bool) -> bool {
    let sb = sign_bit(size);
    let msb = a & sb != 0;
    let msb2 = a & (sb >> 1) != 0;
    match op {
        Shift::Shl | Shift::Rol | Shift::Rcl => msb != msb2,
        Shift::Shr => msb,
        Shift::Sar => false,
        Shift::Ror => msb != (a & 1 != 0),
        Shift::Rcr => msb != cf_in,
    }
}

/// SHLD (left) / SHRD: `dst` shifted by `count` (masked), filled from `src`. For
/// 16-bit operands a count above 16 (undefined) shifts through dst:src:dst, and OF
/// for counts above 1 is that of the first step, as this machine's CPU does.
pub fn double_shift(left: bool, dst: u64, src: u64, count: u32, size: u32) -> Option<(u64, u64)> {
    let bits = size * 8;
    let m = size_mask(size);
    if count == 0 {
        return None;
    }
    let (dst, src) = (u128::from(dst & m), u128::from(src & m));
    let c = count;
    // dst:src (dst:src:dst for 16 bits), shifted as one value.
    let (wide, width) = if size == 2 {
        ((dst << 32) | (src << 16) | dst, 48)
    } else if left {
        ((dst << bits) | src, 2 * bits)
    } else {
        ((src << bits) | dst, 2 * bits)
    };
    let (r, cf) = if left {
        let s = wide << c;
        (
            ((s >> (width - bits)) as u64) & m,
            (wide >> (width - c)) & 1 != 0,
        )
    } else {
        ((wide >> c) as u64 & m, (wide >> (c - 1)) & 1 != 0)
    };
    let mut f = szp(r, size);
    if cf {
        f |= CF;
    }
    let sb = u128::from(sign_bit(size));
    let first = if left {
        (dst & sb != 0) != (dst & (sb >> 1) != 0)
    } else {
        (dst & sb != 0) != (src & 1 != 0)
    };
    if first {
        f |= OF;
    }
    Some((r, f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sub_flags() {
        assert_eq!(add(0xff, 1, false, 1), (0, CF | ZF | PF | AF));
        assert_eq!(add(0x7f, 1, false, 1), (0x80, SF | OF | AF));
        assert_eq!(sub(0, 1, false, 4), (0xffff_ffff, CF | SF | PF | AF));
        assert_eq!(sub(0x80, 1, false, 1), (0x7f, OF | AF));
        assert_eq!(add(u64::MAX, 0, true, 8), (0, CF | ZF | PF | AF));
    }

    #[test]
    fn shifts() {
        assert_eq!(shift(Shift::Shl, 0x81, 1, 1, 0), Some((0x02, CF | OF)));
        assert_eq!(shift(Shift::Shr, 0x81, 1, 1, 0), Some((0x40, CF | OF)));
        assert_eq!(shift(Shift::Sar, 0x81, 1, 1, 0), Some((0xc0, CF | SF | PF)));
        assert_eq!(shift(Shift::Rol, 0x81, 1, 1, 0), Some((0x03, CF | OF)));
        // Multi-bit: OF of the first step (bit 7 ^ bit 6 of the operand).
        assert_eq!(shift(Shift::Shl, 0x01, 7, 1, 0), Some((0x80, SF)));
        assert_eq!(shift(Shift::Rcr, 0x01, 1, 1, 0), Some((0x00, CF)));
        assert_eq!(shift(Shift::Shl, 1, 0, 4, ZF), None);
    }
}
