//! Device memory on both kinds of device: `Buffer` and its views (uploads, downloads, copies, fills,
//! range-checked slices), empty buffers (on a GPU too) going into ops, the cudarc interop (`as_cuda_slice`, `into_cuda_slice`, `From<CudaSlice>`),
//! and the memory-kind check every op makes: an emulated buffer on a GPU device, or GPU memory on the
//! emulated device, is an `Error::DeviceMismatch` naming the argument (run where both devices exist).

#[cfg(feature = "cuda")]
mod memory {
    use molora::cpu::Activation;
    use molora::cuda::{router_logits, top_k_gating, Buffer, Device, DeviceRead};
    use molora::testing::test_device;
    use molora::Error;

    #[test]
    fn buffers_round_trip_and_slice_within_bounds() {
        let Some(dev) = test_device("buffers_round_trip_and_slice_within_bounds") else {
            return;
        };
        let host: Vec<f32> = (0..10).map(|i| i as f32 * 0.5).collect();
        let mut buf = dev.upload(&host).unwrap();
        assert_eq!(buf.len(), 10);
        assert!(!buf.is_empty());
        assert_eq!(buf.is_emulated(), dev.is_emulated());
        assert_eq!(dev.download(&buf).unwrap(), host);
        assert_eq!(DeviceRead::len(&buf), 10);

        // Views, and views of views, keep their offsets.
        let view = buf.slice(2..7).unwrap();
        assert_eq!(view.len(), 5);
        assert_eq!(dev.download(&view).unwrap(), host[2..7]);
        let inner = view.slice(1..=2).unwrap();
        assert_eq!(dev.download(&inner).unwrap(), host[3..5]);
        assert_eq!(dev.download(&buf.slice(..).unwrap()).unwrap(), host);
        assert_eq!(dev.download(&buf.view()).unwrap(), host);
        assert!(buf.slice(10..).unwrap().is_empty());
        assert!(dev.download(&buf.slice(4..4).unwrap()).unwrap().is_empty());

        // Out-of-range slices are errors carrying the range, never panics.
        assert_eq!(
            buf.slice(3..11).err(),
            Some(Error::OutOfBounds {
                start: 3,
                end: 11,
                len: 10
            })
        );
        let (start, end) = (4, 2);
        assert_eq!(
            view.slice(start..end).err(),
            Some(Error::OutOfBounds {
                start: 4,
                end: 2,
                len: 5
            })
        );
        assert!(matches!(
            buf.slice(..=usize::MAX),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            buf.slice_mut(11..),
            Err(Error::OutOfBounds { start: 11, .. })
        ));

        // Writes through a mutable view land in the right place.
        {
            let mut part = buf.slice_mut(4..6).unwrap();
            assert_eq!(part.len(), 2);
            dev.upload_into(&[100.0, 101.0], &mut part).unwrap();
            let mut one = part.slice_mut(1..).unwrap();
            dev.upload_into(&[7.0], &mut one).unwrap();
            assert_eq!(
                dev.download(&part.slice(..).unwrap()).unwrap(),
                [100.0, 7.0]
            );
        }
        let mut want = host.clone();
        want[4] = 100.0;
        want[5] = 7.0;
        assert_eq!(dev.download(&buf).unwrap(), want);
        let mut back = vec![0.0f32; 3];
        dev.download_into(&buf.slice(3..6).unwrap(), &mut back)
            .unwrap();
        assert_eq!(back, [1.5, 100.0, 7.0]);
        assert_eq!(
            dev.download_into(&buf, &mut back),
            Err(Error::LengthMismatch {
                what: "host destination of download_into",
                expected: 10,
                got: 3
            })
        );
        assert!(matches!(
            dev.upload_into(&[1.0, 2.0], &mut buf),
            Err(Error::LengthMismatch {
                expected: 2,
                got: 10,
                ..
            })
        ));
        dev.synchronize().unwrap();
    }

    #[test]
    fn zeros_fills_and_device_copies() {
        let Some(dev) = test_device("zeros_fills_and_device_copies") else {
            return;
        };
        let mut z = dev.zeros::<i32>(6).unwrap();
        assert_eq!(dev.download(&z).unwrap(), [0; 6]);
        let src = dev.upload(&[1i32, 2, 3, 4, 5, 6]).unwrap();
        dev.copy(&src.slice(0..3).unwrap(), &mut z.slice_mut(3..6).unwrap())
            .unwrap();
        assert_eq!(dev.download(&z).unwrap(), [0, 0, 0, 1, 2, 3]);
        assert!(matches!(
            dev.copy(&src, &mut z.slice_mut(0..5).unwrap()),
            Err(Error::LengthMismatch { .. })
        ));
        let mut z2 = dev.upload(&[9u8; 5]).unwrap();
        dev.memset_zeros(&mut z2.slice_mut(1..4).unwrap()).unwrap();
        assert_eq!(dev.download(&z2).unwrap(), [9, 0, 0, 0, 9]);
        dev.memset_zeros(&mut z2).unwrap();
        assert_eq!(dev.download(&z2).unwrap(), [0; 5]);
        // Every element type the kernels use.
        let h = [half::bf16::from_f32(1.5), half::bf16::from_f32(-2.0)];
        assert_eq!(dev.download(&dev.upload(&h).unwrap()).unwrap(), h);
        let q = [-3i8, 4, 127];
        assert_eq!(dev.download(&dev.upload(&q).unwrap()).unwrap(), q);
    }

    #[test]
    fn buffers_know_their_memory_and_cudarc_interop() {
        let Some(dev) = test_device("buffers_know_their_memory_and_cudarc_interop") else {
            return;
        };
        let buf = dev.upload(&[1.0f32, 2.0]).unwrap();
        let debug = format!("{buf:?}");
        assert!(debug.contains("len: 2"), "{debug}");
        if dev.is_emulated() {
            assert!(buf.as_cuda_slice().is_none());
            assert!(debug.contains("emulated"), "{debug}");
            assert!(matches!(
                buf.into_cuda_slice(),
                Err(Error::DeviceMismatch {
                    buffer: "emulated",
                    device: "GPU",
                    ..
                })
            ));
            assert!(dev.context().is_err() && dev.stream().is_err());
        } else {
            assert!(buf.as_cuda_slice().is_some());
            let slice = buf.into_cuda_slice().unwrap();
            let back = Buffer::from(slice);
            assert_eq!(dev.download(&back).unwrap(), [1.0, 2.0]);
            assert!(dev.context().is_ok() && dev.stream().is_ok());
        }
    }

    /// Empty buffers on both devices (on a GPU, which cannot allocate zero bytes, a placeholder
    /// element no length or view covers): uploads, zeros, downloads, views, copies and fills of zero
    /// elements, and ops with T = 0 taking them.
    #[test]
    fn empty_buffers_round_trip_and_go_into_ops() {
        let Some(dev) = test_device("empty_buffers_round_trip_and_go_into_ops") else {
            return;
        };
        let up = dev.upload::<f32>(&[]).unwrap();
        assert_eq!(up.len(), 0);
        assert!(up.is_empty() && DeviceRead::is_empty(&up));
        assert_eq!(up.is_emulated(), dev.is_emulated());
        assert_eq!(dev.download(&up).unwrap(), Vec::<f32>::new());
        let debug = format!("{up:?}");
        assert!(debug.contains("len: 0"), "{debug}");
        let mut z = dev.zeros::<i32>(0).unwrap();
        assert!(z.is_empty());
        assert_eq!(dev.download(&z).unwrap(), Vec::<i32>::new());
        let mut none: [i32; 0] = [];
        dev.download_into(&z, &mut none).unwrap();

        // Views of an empty buffer are empty; any non-empty range is out of bounds.
        assert!(z.view().is_empty());
        assert!(z.slice(..).unwrap().is_empty());
        assert!(z.slice(0..0).unwrap().slice(..).unwrap().is_empty());
        assert!(z.view_mut().is_empty());
        assert!(z.slice_mut(..).unwrap().is_empty());
        assert_eq!(
            z.slice(0..1).err(),
            Some(Error::OutOfBounds {
                start: 0,
                end: 1,
                len: 0
            })
        );
        assert!(matches!(
            z.slice_mut(1..),
            Err(Error::OutOfBounds { start: 1, .. })
        ));
        assert_eq!(
            dev.download(&z.slice(..).unwrap()).unwrap(),
            Vec::<i32>::new()
        );

        // Copies and fills of zero elements; lengths are still checked.
        dev.upload_into(&[], &mut z).unwrap();
        dev.upload_into(&[], &mut z.slice_mut(..).unwrap()).unwrap();
        dev.memset_zeros(&mut z).unwrap();
        let other = dev.upload::<i32>(&[]).unwrap();
        dev.copy(&other, &mut z).unwrap();
        let full = dev.upload(&[5i32, 6]).unwrap();
        dev.copy(&full.slice(1..1).unwrap(), &mut z).unwrap();
        assert!(matches!(
            dev.upload_into(&[1], &mut z),
            Err(Error::LengthMismatch {
                expected: 1,
                got: 0,
                ..
            })
        ));
        assert!(matches!(
            dev.copy(&full, &mut z),
            Err(Error::LengthMismatch { .. })
        ));
        assert_eq!(dev.download(&full).unwrap(), [5, 6]);

        // Ops with T = 0 take empty buffers of their own (next to non-empty weights).
        let logits = dev.upload::<f32>(&[]).unwrap();
        let (mut ids, mut w) = (dev.zeros::<i32>(0).unwrap(), dev.zeros::<f32>(0).unwrap());
        top_k_gating(
            &dev,
            &logits,
            0,
            4,
            Activation::Softmax,
            1.0,
            2,
            true,
            &mut ids,
            &mut w,
        )
        .unwrap();
        let x = dev.upload::<f32>(&[]).unwrap();
        let w_g = dev.upload(&[0.5f32; 4 * 3]).unwrap();
        let mut out = dev.zeros::<f32>(0).unwrap();
        router_logits(&dev, &x, 0, 3, &w_g, None, 4, &mut out, None).unwrap();
        assert!(dev.download(&out).unwrap().is_empty());
        assert!(dev.download(&ids).unwrap().is_empty());
        // An empty buffer where the op needs elements is a length error, not a launch.
        assert!(matches!(
            router_logits(&dev, &x, 2, 3, &w_g, None, 4, &mut out, None),
            Err(Error::LengthMismatch { got: 0, .. })
        ));
        dev.synchronize().unwrap();
    }

    /// Logits `[2, 3]`, ids and weights `[2, 1]` on `dev`.
    fn gating_buffers(dev: &Device) -> (Buffer<f32>, Buffer<i32>, Buffer<f32>) {
        (
            dev.upload(&[0.1f32, 0.9, 0.3, 0.5, 0.2, 0.1]).unwrap(),
            dev.upload(&[-7i32; 2]).unwrap(),
            dev.upload(&[-5.0f32; 2]).unwrap(),
        )
    }

    /// An op refuses memory of the other kind than its device, naming the argument, and writes
    /// nothing. Needs both a GPU and the emulated device.
    #[test]
    fn ops_refuse_memory_of_the_other_device() {
        let (Ok(gpu), Ok(emu)) = (Device::new(0), Device::emulated()) else {
            use std::io::Write;
            let _ = writeln!(
                std::io::stderr(),
                "skipping ops_refuse_memory_of_the_other_device: needs both a GPU and the emulated device (feature `emu`)"
            );
            return;
        };
        let (g_logits, mut g_ids, mut g_w) = gating_buffers(&gpu);
        let (e_logits, mut e_ids, mut e_w) = gating_buffers(&emu);
        let run =
            |dev: &Device, logits: &Buffer<f32>, ids: &mut Buffer<i32>, w: &mut Buffer<f32>| {
                top_k_gating(dev, logits, 2, 3, Activation::Softmax, 1.0, 1, true, ids, w)
            };
        // An emulated input on the GPU.
        assert_eq!(
            run(&gpu, &e_logits, &mut g_ids, &mut g_w),
            Err(Error::DeviceMismatch {
                what: "logits [T, E]",
                buffer: "emulated",
                device: "GPU"
            })
        );
        // GPU outputs on the emulated device.
        assert_eq!(
            run(&emu, &e_logits, &mut g_ids, &mut e_w),
            Err(Error::DeviceMismatch {
                what: "ids [T, k]",
                buffer: "GPU",
                device: "emulated"
            })
        );
        // cudarc's own buffers are GPU memory too.
        let raw = g_logits.as_cuda_slice().unwrap();
        assert!(matches!(
            top_k_gating(
                &emu,
                raw,
                2,
                3,
                Activation::Softmax,
                1.0,
                1,
                true,
                &mut e_ids,
                &mut e_w
            ),
            Err(Error::DeviceMismatch {
                what: "logits [T, E]",
                ..
            })
        ));
        assert!(matches!(
            emu.download(raw),
            Err(Error::DeviceMismatch { .. })
        ));
        assert!(matches!(
            gpu.download(&e_logits),
            Err(Error::DeviceMismatch { .. })
        ));
        // Nothing was written; the right buffers still work on each device.
        assert_eq!(gpu.download(&g_ids).unwrap(), [-7, -7]);
        assert_eq!(emu.download(&e_ids).unwrap(), [-7, -7]);
        run(&gpu, &g_logits, &mut g_ids, &mut g_w).unwrap();
        run(&emu, &e_logits, &mut e_ids, &mut e_w).unwrap();
        assert_eq!(gpu.download(&g_ids).unwrap(), [1, 0]);
        assert_eq!(emu.download(&e_ids).unwrap(), [1, 0]);
    }
}
