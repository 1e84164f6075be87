//! Library functions given arbitrary lengths, ids and dims return errors instead of panicking
//! (a panic fails the test): the backward helpers with E = 0 or out-of-range ids, routings and
//! threshold values with huge T, products that overflow, `unfold3` on tensors of other ranks.

use molora::cpu::{self, backward, ThresholdSpec};
use molora::{Routing, Segments, SeqRouting};
use proptest::prelude::*;

fn dims() -> impl Strategy<Value = usize> {
    prop_oneof![
        Just(0usize),
        Just(1),
        2usize..9,
        Just(usize::MAX / 2),
        Just(usize::MAX)
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(molora::testing::cases(256)))]
    #[test]
    fn backward_helpers_never_panic(len in 0usize..40, e in prop_oneof![Just(0usize), 1usize..6],
                                    k in prop_oneof![Just(0usize), 1usize..4], id in -3i32..9,
                                    d_in in dims(), d_out in dims(), renorm in any::<bool>()) {
        let v = vec![0.25f64; len];
        let ids = vec![id; len];
        let _ = backward::softmax_backward(&v, &v, e, 1.0);
        let _ = backward::product_combine_backward(&v, &v, e, &v);
        let _ = backward::gate_backward(&v, e, &ids, k, None, renorm, &v);
        let _ = backward::gate_backward(&v, e, &ids, k, Some(&v), renorm, &v);
        let _ = backward::cv_balance_loss(&v, e);
        let _ = backward::base_backward_dx(&v, &v, d_in, d_out);
    }

    #[test]
    fn routings_and_thresholds_never_panic(t in dims(), k in dims(), e in dims()) {
        let _ = Routing::empty(t, k, e);
        let _ = cpu::threshold_values::<f32>(&ThresholdSpec::Fixed(0.1), None, t, 1, e.max(1));
        let _ = cpu::threshold_values::<f32>(&ThresholdSpec::Learned { theta: 0.0 }, None, t, k, e.max(1));
        if let Ok(segs) = Segments::from_lengths(&[1, 2]) {
            let _ = SeqRouting::new(segs, e, vec![0.5; 4]);
        }
    }
}

#[test]
fn out_of_range_ids_are_named() {
    let p = vec![0.5f64; 4];
    let err = backward::gate_backward(&p, 2, &[0, 2], 1, None, false, &[1.0, 1.0]).unwrap_err();
    assert!(
        matches!(
            err,
            molora::Error::ExpertIdOutOfRange {
                id: 2,
                token: 1,
                ..
            }
        ),
        "{err}"
    );
    let err = backward::softmax_backward(&p, &p, 0, 1.0).unwrap_err();
    assert!(err.to_string().contains("num_experts"), "{err}");
}

#[cfg(feature = "candle")]
#[test]
fn unfold3_refuses_other_ranks() {
    use candle_core::{Device, Tensor};
    let x = Tensor::zeros((4, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = molora::model::saml::unfold3(&x).unwrap_err();
    assert!(err.to_string().contains("unfold3"), "{err}");
    let x = Tensor::zeros((2, 5, 3), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert_eq!(molora::model::saml::unfold3(&x).unwrap().dims(), &[2, 5, 9]);
}
