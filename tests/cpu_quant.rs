//! Property tests of the CPU quantisation reference: NF4 (block absmax exact, codes nearest with the
//! round-trip bound, table values and block maxima exact, zero blocks, packing order), int8 per
//! channel (half-step bound, row maxima at ±127, zero rows, half away from zero), the quantised
//! matmuls against an f64 product with the dequantised weight, idempotent re-quantisation, storage
//! size, and one test per bad-input case. Every input dtype (f32, f16, bf16).

use molora::cpu::quant::{
    int8_matmul, nf4_matmul, quantize_int8, quantize_nf4, Int8Weight, Nf4Weight, NF4_BLOCK,
    NF4_TABLE,
};
use molora::half::{bf16, f16};
use molora::testing::{compare, Tolerance};
use molora::Rng;
use molora::{DType, Element, Error};
use proptest::prelude::*;

// ---------------------------------------------------------------------------------------------
// Deterministic data from a proptest-chosen seed.

/// The crate's test generator with the helpers these tests use.
trait RngExt {
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f32;
    /// Uniform in [-1, 1).
    fn sym(&mut self) -> f32;
}

impl RngExt for Rng {
    fn unit(&mut self) -> f32 {
        (self.uniform() as f32).min(1.0 - f32::EPSILON / 2.0)
    }
    fn sym(&mut self) -> f32 {
        2.0 * self.unit() - 1.0
    }
}

/// A weight `[rows, cols]` as f32: per row all zeros, sparse, or dense with a magnitude of
/// `10^(±decades)`; half the time one aligned NF4 block (possibly the partial last one) is zeroed.
fn weight_f32(rng: &mut Rng, rows: usize, cols: usize, decades: f32) -> Vec<f32> {
    let mut w = Vec::with_capacity(rows * cols);
    for _ in 0..rows {
        let kind = rng.below(8);
        let scale = 10f32.powf(rng.sym() * decades);
        for _ in 0..cols {
            let v = match kind {
                0 => 0.0,
                1 if rng.below(5) != 0 => 0.0,
                _ => rng.sym() * scale,
            };
            w.push(v);
        }
    }
    let n = w.len();
    if rng.below(2) == 0 {
        let b = rng.below(n.div_ceil(NF4_BLOCK));
        let end = ((b + 1) * NF4_BLOCK).min(n);
        w[b * NF4_BLOCK..end].fill(0.0);
    }
    w
}

/// The weight in element type `T` and its exact f32 values.
fn weight<T: Element>(rng: &mut Rng, rows: usize, cols: usize, decades: f32) -> (Vec<T>, Vec<f32>) {
    let w: Vec<T> = weight_f32(rng, rows, cols, decades)
        .into_iter()
        .map(T::from_f32)
        .collect();
    let wf = w.iter().map(|v| v.to_f32()).collect();
    (w, wf)
}

fn unpack(packed: &[u8], n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| {
            let b = packed[i / 2];
            if i % 2 == 0 {
                b >> 4
            } else {
                b & 0x0f
            }
        })
        .collect()
}

/// The largest half-gap between neighbouring NF4 table values (between −1 and the next code).
fn max_half_gap() -> f64 {
    NF4_TABLE
        .windows(2)
        .map(|p| (f64::from(p[1]) - f64::from(p[0])) / 2.0)
        .fold(0.0, f64::max)
}

fn check_cmp(r: Result<(), String>) -> Result<(), TestCaseError> {
    r.map_err(TestCaseError::fail)
}

fn dims() -> impl Strategy<Value = (usize, usize)> {
    (
        1usize..=40,
        prop_oneof![
            1usize..=200,
            Just(63usize),
            Just(64usize),
            Just(65usize),
            Just(128usize),
            Just(1usize)
        ],
    )
}

fn tokens() -> impl Strategy<Value = usize> {
    prop_oneof![Just(0usize), Just(1usize), Just(7usize), Just(33usize)]
}

// ---------------------------------------------------------------------------------------------
// NF4 invariants.

fn check_nf4<T: Element>(seed: u64, rows: usize, cols: usize) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let (w, wf) = weight::<T>(&mut rng, rows, cols, 3.0);
    let n = rows * cols;
    let q = quantize_nf4(&w, rows, cols).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!((q.rows(), q.cols()), (rows, cols));
    prop_assert_eq!(q.packed().len(), n.div_ceil(2));
    prop_assert_eq!(q.absmax().len(), n.div_ceil(NF4_BLOCK));
    if n % 2 == 1 {
        prop_assert_eq!(q.packed()[n / 2] & 0x0f, 0, "padding nibble must be 0");
    }
    let codes = unpack(q.packed(), n);
    let deq = q.dequantize();
    prop_assert_eq!(deq.len(), n);
    let gap = max_half_gap();
    for (b, block) in wf.chunks(NF4_BLOCK).enumerate() {
        let a = q.absmax()[b];
        let want_a = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        prop_assert_eq!(a.to_bits(), want_a.to_bits(), "absmax of block {}", b);
        for (j, &v) in block.iter().enumerate() {
            let i = b * NF4_BLOCK + j;
            let c = codes[i];
            prop_assert!(c < 16);
            prop_assert_eq!(q.code(i), Some(c));
            prop_assert_eq!(q.value(i).map(f32::to_bits), Some(deq[i].to_bits()));
            prop_assert_eq!(
                deq[i].to_bits(),
                (NF4_TABLE[usize::from(c)] * a).to_bits(),
                "element {}: dequantise is table[code]·absmax",
                i
            );
            if a == 0.0 {
                // Zero block: the exact-zero code, zeros out.
                prop_assert_eq!(c, 7);
                prop_assert_eq!(deq[i], 0.0);
                continue;
            }
            // Round-trip bound.
            let err = (f64::from(deq[i]) - f64::from(v)).abs();
            let bound = f64::from(a) * gap * (1.0 + 1e-6) + f64::from(a) * 1e-6;
            prop_assert!(
                err <= bound,
                "element {}: w {} deq {} err {} > bound {}",
                i,
                v,
                deq[i],
                err,
                bound
            );
            // Nearest code (up to the f32 rounding of w / absmax and of the midpoints).
            let x = f64::from(v) / f64::from(a);
            let d = (f64::from(NF4_TABLE[usize::from(c)]) - x).abs();
            for (k, &t) in NF4_TABLE.iter().enumerate() {
                prop_assert!(
                    d <= (f64::from(t) - x).abs() + 1e-6,
                    "element {}: code {} is farther from {} than code {}",
                    i,
                    c,
                    x,
                    k
                );
            }
            // The block maximum and zeros come back exactly.
            if v.abs() == a || v == 0.0 {
                prop_assert_eq!(deq[i], v, "element {} (absmax {}) must round-trip", i, a);
            }
        }
    }
    // Storage: ceil(n/2) code bytes + 4 per block, about 1/8 of f32 plus the absmax.
    let bytes = q.bytes();
    prop_assert_eq!(bytes, n.div_ceil(2) + 4 * n.div_ceil(NF4_BLOCK));
    prop_assert!(8 * (bytes - 4 * q.absmax().len()) <= 4 * n + 4);
    Ok(())
}

fn check_nf4_idempotent<T: Element>(
    seed: u64,
    rows: usize,
    cols: usize,
) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let (w, _) = weight::<T>(&mut rng, rows, cols, 3.0);
    let q1 = quantize_nf4(&w, rows, cols).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let d = q1.dequantize();
    let q2 = quantize_nf4(&d, rows, cols).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(q1.packed(), q2.packed());
    prop_assert_eq!(q1.absmax(), q2.absmax());
    prop_assert_eq!(q2.dequantize(), d);
    // Rebuilding from the stored parts gives the same weight.
    let q3 = Nf4Weight::from_parts(rows, cols, q1.packed().to_vec(), q1.absmax().to_vec())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(q3, q1);
    Ok(())
}

/// Blocks made of `table[c]·a` values (one per block at ±a): the codes are `c` and every element
/// dequantises to itself, bit for bit.
fn check_nf4_table_values(seed: u64, rows: usize, cols: usize) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let n = rows * cols;
    let blocks = n.div_ceil(NF4_BLOCK);
    let scales: Vec<f32> = (0..blocks)
        .map(|_| 10f32.powf(rng.sym() * 3.0) * (1.0 + rng.unit()))
        .collect();
    let mut codes: Vec<u8> = (0..n).map(|_| rng.below(16) as u8).collect();
    for b in 0..blocks {
        let end = ((b + 1) * NF4_BLOCK).min(n);
        let i = b * NF4_BLOCK + rng.below(end - b * NF4_BLOCK);
        codes[i] = if rng.below(2) == 0 { 0 } else { 15 };
    }
    let w: Vec<f32> = codes
        .iter()
        .enumerate()
        .map(|(i, &c)| NF4_TABLE[usize::from(c)] * scales[i / NF4_BLOCK])
        .collect();
    let q = quantize_nf4(&w, rows, cols).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(q.absmax(), &scales[..]);
    prop_assert_eq!(unpack(q.packed(), n), codes);
    let deq = q.dequantize();
    for (i, (&d, &v)) in deq.iter().zip(&w).enumerate() {
        prop_assert_eq!(d.to_bits(), v.to_bits(), "element {}", i);
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// int8 invariants.

fn check_int8<T: Element>(seed: u64, rows: usize, cols: usize) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let (w, wf) = weight::<T>(&mut rng, rows, cols, 3.0);
    let q = quantize_int8(&w, rows, cols).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!((q.rows(), q.cols()), (rows, cols));
    prop_assert_eq!(q.q().len(), rows * cols);
    prop_assert_eq!(q.scales().len(), rows);
    prop_assert_eq!(q.bytes(), rows * cols + 4 * rows);
    let deq = q.dequantize();
    for (o, row) in wf.chunks(cols).enumerate() {
        let m = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let s = q.scales()[o];
        prop_assert_eq!(s.to_bits(), (m / 127.0).to_bits(), "scale of row {}", o);
        for (i, &v) in row.iter().enumerate() {
            let k = o * cols + i;
            let c = q.q()[k];
            prop_assert!((-127..=127).contains(&c));
            prop_assert_eq!(deq[k].to_bits(), (f32::from(c) * s).to_bits());
            prop_assert_eq!(q.value(o, i).map(f32::to_bits), Some(deq[k].to_bits()));
            if s == 0.0 {
                prop_assert_eq!(c, 0);
                prop_assert_eq!(deq[k], 0.0);
                continue;
            }
            let err = (f64::from(deq[k]) - f64::from(v)).abs();
            let bound = f64::from(s) * 0.5 * (1.0 + 1e-5) + f64::from(v.abs()) * 1e-6;
            prop_assert!(
                err <= bound,
                "({}, {}): w {} q {} scale {} err {} > {}",
                o,
                i,
                v,
                c,
                s,
                err,
                bound
            );
            if v.abs() == m {
                let want = if v > 0.0 { 127 } else { -127 };
                prop_assert_eq!(c, want, "row maximum at ({}, {})", o, i);
                prop_assert_eq!(deq[k].to_bits(), (f32::from(want) * s).to_bits());
            }
            if v == 0.0 {
                prop_assert_eq!(c, 0);
            }
        }
    }
    Ok(())
}

fn check_int8_idempotent<T: Element>(
    seed: u64,
    rows: usize,
    cols: usize,
) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let (w, _) = weight::<T>(&mut rng, rows, cols, 3.0);
    let q1 = quantize_int8(&w, rows, cols).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let d = q1.dequantize();
    let q2 = quantize_int8(&d, rows, cols).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(q1.q(), q2.q());
    for (o, (&a, &b)) in q1.scales().iter().zip(q2.scales()).enumerate() {
        prop_assert!(
            (f64::from(a) - f64::from(b)).abs() <= f64::from(a) * 2.5e-7,
            "scale of row {}: {} vs {}",
            o,
            a,
            b
        );
    }
    let q3 = Int8Weight::from_parts(rows, cols, q1.q().to_vec(), q1.scales().to_vec())
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(q3, q1);
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Matmuls.

/// `y = x·deqᵀ + bias` in f64.
fn matmul64(
    x: &[f32],
    t: usize,
    deq: &[f32],
    rows: usize,
    cols: usize,
    bias: Option<&[f32]>,
) -> Vec<f32> {
    let mut y = Vec::with_capacity(t * rows);
    for tt in 0..t {
        for o in 0..rows {
            let mut acc = 0.0f64;
            for i in 0..cols {
                acc += f64::from(x[tt * cols + i]) * f64::from(deq[o * cols + i]);
            }
            if let Some(b) = bias {
                acc += f64::from(b[o]);
            }
            y.push(acc as f32);
        }
    }
    y
}

fn check_matmuls<T: Element>(
    seed: u64,
    rows: usize,
    cols: usize,
    t: usize,
) -> Result<(), TestCaseError> {
    let mut rng = Rng::new(seed);
    let (w, _) = weight::<T>(&mut rng, rows, cols, 0.5);
    let x: Vec<T> = (0..t * cols).map(|_| T::from_f32(rng.sym())).collect();
    let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
    let bias: Vec<T> = (0..rows).map(|_| T::from_f32(rng.sym())).collect();
    let bf: Vec<f32> = bias.iter().map(|v| v.to_f32()).collect();
    let nf4 = quantize_nf4(&w, rows, cols).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let int8 = quantize_int8(&w, rows, cols).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let tol = Tolerance::for_dtype(DType::F32).scaled((cols as f32).sqrt());
    let dn = nf4.dequantize();
    let di = int8.dequantize();
    for (name, deq, with_bias) in [
        ("nf4", &dn, false),
        ("nf4 + bias", &dn, true),
        ("int8", &di, false),
        ("int8 + bias", &di, true),
    ] {
        let b = with_bias.then_some(&bias[..]);
        let got = if name.starts_with("nf4") {
            nf4_matmul(&x, t, &nf4, b)
        } else {
            int8_matmul(&x, t, &int8, b)
        }
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(got.len(), t * rows);
        let want = matmul64(&xf, t, deq, rows, cols, with_bias.then_some(&bf[..]));
        check_cmp(compare(name, &got, &want, tol))?;
    }
    // One-hot tokens pick out columns of the dequantised weight exactly.
    let picks: Vec<usize> = (0..t).map(|_| rng.below(cols)).collect();
    let mut onehot = vec![T::from_f32(0.0); t * cols];
    for (tt, &i) in picks.iter().enumerate() {
        onehot[tt * cols + i] = T::from_f32(1.0);
    }
    let yn = nf4_matmul(&onehot, t, &nf4, None).map_err(|e| TestCaseError::fail(e.to_string()))?;
    let yi =
        int8_matmul(&onehot, t, &int8, None).map_err(|e| TestCaseError::fail(e.to_string()))?;
    for (tt, &i) in picks.iter().enumerate() {
        for o in 0..rows {
            prop_assert_eq!(
                yn[tt * rows + o],
                dn[o * cols + i],
                "nf4 token {} row {}",
                tt,
                o
            );
            prop_assert_eq!(
                yi[tt * rows + o],
                di[o * cols + i],
                "int8 token {} row {}",
                tt,
                o
            );
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn nf4_round_trip_and_codes(seed in any::<u64>(), (rows, cols) in dims()) {
        check_nf4::<f32>(seed, rows, cols)?;
        check_nf4::<f16>(seed, rows, cols)?;
        check_nf4::<bf16>(seed, rows, cols)?;
    }

    #[test]
    fn nf4_table_values_round_trip_exactly(seed in any::<u64>(), (rows, cols) in dims()) {
        check_nf4_table_values(seed, rows, cols)?;
    }

    #[test]
    fn nf4_requantisation_is_idempotent(seed in any::<u64>(), (rows, cols) in dims()) {
        check_nf4_idempotent::<f32>(seed, rows, cols)?;
        check_nf4_idempotent::<f16>(seed, rows, cols)?;
        check_nf4_idempotent::<bf16>(seed, rows, cols)?;
    }

    #[test]
    fn int8_round_trip_and_codes(seed in any::<u64>(), (rows, cols) in dims()) {
        check_int8::<f32>(seed, rows, cols)?;
        check_int8::<f16>(seed, rows, cols)?;
        check_int8::<bf16>(seed, rows, cols)?;
    }

    #[test]
    fn int8_requantisation_is_idempotent(seed in any::<u64>(), (rows, cols) in dims()) {
        check_int8_idempotent::<f32>(seed, rows, cols)?;
        check_int8_idempotent::<f16>(seed, rows, cols)?;
        check_int8_idempotent::<bf16>(seed, rows, cols)?;
    }

    #[test]
    fn matmuls_equal_x_times_dequantised_weight(
        seed in any::<u64>(),
        (rows, cols) in dims(),
        t in tokens(),
    ) {
        check_matmuls::<f32>(seed, rows, cols, t)?;
        check_matmuls::<f16>(seed, rows, cols, t)?;
        check_matmuls::<bf16>(seed, rows, cols, t)?;
    }
}

// ---------------------------------------------------------------------------------------------
// Hand-made examples.

#[test]
fn nf4_packing_order_by_hand() {
    // absmax 2: w/2 = [-1, 0, 1, table[13], table[1]] -> codes [0, 7, 15, 13, 1].
    let w = [-2.0f32, 0.0, 2.0, NF4_TABLE[13] * 2.0, NF4_TABLE[1] * 2.0];
    let q = quantize_nf4(&w, 1, 5).unwrap();
    assert_eq!(q.absmax(), &[2.0]);
    assert_eq!(q.packed(), &[0x07, 0xFD, 0x10]);
    assert_eq!(
        (0..5).map(|i| q.code(i).unwrap_or(99)).collect::<Vec<_>>(),
        vec![0, 7, 15, 13, 1]
    );
    assert_eq!(q.dequantize(), w.to_vec());
    assert_eq!(q.bytes(), 3 + 4);
}

#[test]
fn nf4_blocks_span_rows_and_the_last_block_is_partial() {
    // 5 x 13 = 65 elements: block 0 holds 64 zeros, block 1 the single element -3.
    let mut w = vec![0.0f32; 65];
    w[64] = -3.0;
    let q = quantize_nf4(&w, 5, 13).unwrap();
    assert_eq!(q.absmax(), &[0.0, 3.0]);
    let mut want = vec![0x77u8; 32];
    want.push(0x00); // code 0 high, padding low
    assert_eq!(q.packed(), &want[..]);
    assert_eq!(q.dequantize(), w);
}

#[test]
fn nf4_midpoint_ties_go_to_the_lower_code() {
    for c in 0..15 {
        let mid = (NF4_TABLE[c] + NF4_TABLE[c + 1]) / 2.0;
        // absmax 1 (the first element), so w / absmax = mid exactly.
        let q = quantize_nf4(&[1.0f32, mid, -1.0], 1, 3).unwrap();
        assert_eq!(q.code(1), Some(c as u8), "midpoint {c} = {mid}");
        assert_eq!(q.code(0), Some(15));
        assert_eq!(q.code(2), Some(0));
    }
}

#[test]
fn int8_rounds_half_away_from_zero() {
    // max 127 -> scale 1, w / scale = w.
    let w = [127.0f32, 0.5, -0.5, 1.5, -2.5, 63.5, -127.0, 0.0];
    let q = quantize_int8(&w, 1, 8).unwrap();
    assert_eq!(q.scales(), &[1.0]);
    assert_eq!(q.q(), &[127, 1, -1, 2, -3, 64, -127, 0]);
    // A zero row next to a non-zero one.
    let q = quantize_int8(&[0.0f32, 0.0, 2.54, -1.27], 2, 2).unwrap();
    assert_eq!(q.scales()[0], 0.0);
    assert_eq!(q.scales()[1], 2.54f32 / 127.0);
    assert_eq!(&q.q()[..2], &[0, 0]);
    assert_eq!(q.q()[2], 127);
    assert_eq!(q.dequantize()[..2], [0.0, 0.0]);
}

#[test]
fn element_access_out_of_range_is_none() {
    let q = quantize_nf4(&[1.0f32; 3], 1, 3).unwrap();
    assert_eq!(q.code(3), None);
    assert_eq!(q.value(3), None);
    let q = quantize_int8(&[1.0f32; 6], 2, 3).unwrap();
    assert_eq!(q.value(2, 0), None);
    assert_eq!(q.value(0, 3), None);
    assert_eq!(q.value(1, 2), Some(1.0));
}

// ---------------------------------------------------------------------------------------------
// Bad input.

#[test]
fn nan_weight_is_rejected() {
    let mut w = vec![0.5f32; 12];
    w[5] = f32::NAN;
    match quantize_nf4(&w, 3, 4) {
        Err(Error::NonFinite {
            what: "weight",
            index: 5,
            value,
        }) => assert!(value.is_nan()),
        other => panic!("{other:?}"),
    }
    match quantize_int8(&w, 3, 4) {
        Err(Error::NonFinite {
            what: "weight",
            index: 5,
            value,
        }) => assert!(value.is_nan()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn infinite_weight_is_rejected_for_every_dtype() {
    let mut w = vec![f16::from_f32(0.25); 6];
    w[4] = f16::NEG_INFINITY;
    assert_eq!(
        quantize_nf4(&w, 2, 3),
        Err(Error::NonFinite {
            what: "weight",
            index: 4,
            value: f32::NEG_INFINITY
        })
    );
    let mut w = vec![bf16::from_f32(0.25); 6];
    w[1] = bf16::INFINITY;
    assert_eq!(
        quantize_int8(&w, 2, 3),
        Err(Error::NonFinite {
            what: "weight",
            index: 1,
            value: f32::INFINITY
        })
    );
}

#[test]
fn zero_dims_are_rejected() {
    let e = quantize_nf4::<f32>(&[], 0, 4).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidDim {
                what: "rows",
                value: 0,
                ..
            }
        ),
        "{e:?}"
    );
    let e = quantize_int8::<f32>(&[], 3, 0).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidDim {
                what: "cols",
                value: 0,
                ..
            }
        ),
        "{e:?}"
    );
    let e = Nf4Weight::from_parts(0, 1, vec![], vec![]).unwrap_err();
    assert!(matches!(e, Error::InvalidDim { what: "rows", .. }), "{e:?}");
    let e = Int8Weight::from_parts(1, 0, vec![], vec![0.0]).unwrap_err();
    assert!(matches!(e, Error::InvalidDim { what: "cols", .. }), "{e:?}");
}

#[test]
fn oversized_weight_is_rejected() {
    let e = quantize_nf4::<f32>(&[], 1 << 16, 1 << 16).unwrap_err();
    assert!(
        matches!(e, Error::InvalidDim { what: "rows * cols", value, .. } if value == 1 << 32),
        "{e:?}"
    );
    let e = quantize_int8::<f32>(&[], 1 << 16, 1 << 16).unwrap_err();
    assert!(
        matches!(
            e,
            Error::InvalidDim {
                what: "rows * cols",
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn wrong_weight_length_is_rejected() {
    assert_eq!(
        quantize_nf4(&[1.0f32; 11], 3, 4),
        Err(Error::LengthMismatch {
            what: "weight [rows, cols]",
            expected: 12,
            got: 11
        })
    );
    assert_eq!(
        quantize_int8(&[1.0f32; 13], 3, 4),
        Err(Error::LengthMismatch {
            what: "weight [rows, cols]",
            expected: 12,
            got: 13
        })
    );
}

#[test]
fn wrong_x_length_is_rejected() {
    let nf4 = quantize_nf4(&[1.0f32; 12], 3, 4).unwrap();
    let int8 = quantize_int8(&[1.0f32; 12], 3, 4).unwrap();
    let want = Err(Error::LengthMismatch {
        what: "x [T, d_in]",
        expected: 8,
        got: 7,
    });
    assert_eq!(nf4_matmul(&[0.0f32; 7], 2, &nf4, None), want);
    assert_eq!(int8_matmul(&[0.0f32; 7], 2, &int8, None), want);
}

#[test]
fn wrong_bias_length_is_rejected() {
    let nf4 = quantize_nf4(&[1.0f32; 12], 3, 4).unwrap();
    let int8 = quantize_int8(&[1.0f32; 12], 3, 4).unwrap();
    let want = Err(Error::LengthMismatch {
        what: "bias [d_out]",
        expected: 3,
        got: 4,
    });
    assert_eq!(nf4_matmul(&[0.0f32; 4], 1, &nf4, Some(&[0.0; 4])), want);
    assert_eq!(int8_matmul(&[0.0f32; 4], 1, &int8, Some(&[0.0; 4])), want);
}

#[test]
fn non_finite_x_or_bias_is_rejected() {
    let nf4 = quantize_nf4(&[1.0f32; 12], 3, 4).unwrap();
    let int8 = quantize_int8(&[1.0f32; 12], 3, 4).unwrap();
    let mut x = vec![f16::from_f32(0.5); 8];
    x[6] = f16::INFINITY;
    let want = Err(Error::NonFinite {
        what: "x",
        index: 6,
        value: f32::INFINITY,
    });
    assert_eq!(nf4_matmul(&x, 2, &nf4, None), want);
    assert_eq!(int8_matmul(&x, 2, &int8, None), want);
    let bias = [0.0f32, f32::NAN, 0.0];
    match nf4_matmul(&[0.0f32; 4], 1, &nf4, Some(&bias)) {
        Err(Error::NonFinite {
            what: "bias",
            index: 1,
            value,
        }) => assert!(value.is_nan()),
        other => panic!("{other:?}"),
    }
    match int8_matmul(&[0.0f32; 4], 1, &int8, Some(&bias)) {
        Err(Error::NonFinite {
            what: "bias",
            index: 1,
            value,
        }) => assert!(value.is_nan()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn nf4_from_parts_checks_lengths() {
    // n = 65: 33 bytes, 2 absmax values.
    assert_eq!(
        Nf4Weight::from_parts(5, 13, vec![0; 32], vec![1.0; 2]),
        Err(Error::LengthMismatch {
            what: "NF4 packed codes [ceil(n/2)]",
            expected: 33,
            got: 32
        })
    );
    assert_eq!(
        Nf4Weight::from_parts(5, 13, vec![0; 33], vec![1.0; 1]),
        Err(Error::LengthMismatch {
            what: "NF4 absmax [ceil(n/64)]",
            expected: 2,
            got: 1
        })
    );
}

#[test]
fn nf4_from_parts_checks_absmax_and_padding() {
    assert_eq!(
        Nf4Weight::from_parts(1, 3, vec![0x77, 0x70], vec![-1.0]),
        Err(Error::InvalidParameter {
            what: "NF4 absmax",
            value: -1.0,
            reason: "scales must be >= 0"
        })
    );
    assert_eq!(
        Nf4Weight::from_parts(1, 3, vec![0x77, 0x70], vec![f32::INFINITY]),
        Err(Error::NonFinite {
            what: "NF4 absmax",
            index: 0,
            value: f32::INFINITY
        })
    );
    let e = Nf4Weight::from_parts(1, 3, vec![0x77, 0x75], vec![1.0]).unwrap_err();
    assert!(
        matches!(e, Error::InvalidParameter { what: "NF4 padding nibble", value, .. } if value == 5.0),
        "{e:?}"
    );
    assert!(Nf4Weight::from_parts(1, 3, vec![0x77, 0x70], vec![1.0]).is_ok());
}

#[test]
fn int8_from_parts_checks_lengths_scales_and_codes() {
    assert_eq!(
        Int8Weight::from_parts(2, 3, vec![0; 5], vec![1.0; 2]),
        Err(Error::LengthMismatch {
            what: "int8 codes [rows, cols]",
            expected: 6,
            got: 5
        })
    );
    assert_eq!(
        Int8Weight::from_parts(2, 3, vec![0; 6], vec![1.0; 3]),
        Err(Error::LengthMismatch {
            what: "int8 scales [rows]",
            expected: 2,
            got: 3
        })
    );
    assert_eq!(
        Int8Weight::from_parts(2, 3, vec![0; 6], vec![1.0, -0.5]),
        Err(Error::InvalidParameter {
            what: "int8 scales",
            value: -0.5,
            reason: "scales must be >= 0"
        })
    );
    match Int8Weight::from_parts(2, 3, vec![0; 6], vec![f32::NAN, 1.0]) {
        Err(Error::NonFinite {
            what: "int8 scales",
            index: 0,
            value,
        }) => assert!(value.is_nan()),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        Int8Weight::from_parts(2, 3, vec![0, 0, -128, 0, 0, 0], vec![1.0; 2]),
        Err(Error::InvalidParameter {
            what: "int8 codes",
            value: -128.0,
            reason: "codes must be in -127..=127"
        })
    );
}
