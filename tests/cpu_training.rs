//! Training through the CPU backward: a MoLE layer (frozen base, three rank-2 experts, a softmax
//! router with dense routing) learns a synthetic regression in which each of three "domains" needs
//! its own low-rank correction. Adam on the experts and the router, full batch. The loss must fall
//! below 2% of its starting value, and the learned routing must put each domain on its own expert
//! (checked on a domain × expert table of mean routing weights).

use molora::cpu::backward::{lora_backward, lora_forward, router_backward, softmax_backward};
use molora::LoraShape;
use molora::Rng;

struct Adam {
    m: Vec<f64>,
    v: Vec<f64>,
    t: i32,
}
impl Adam {
    fn new(n: usize) -> Self {
        Adam {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }
    fn step(&mut self, p: &mut [f64], g: &[f64], lr: f64) {
        self.t += 1;
        let (b1, b2) = (0.9f64, 0.999f64);
        for i in 0..p.len() {
            self.m[i] = b1 * self.m[i] + (1.0 - b1) * g[i];
            self.v[i] = b2 * self.v[i] + (1.0 - b2) * g[i] * g[i];
            let mh = self.m[i] / (1.0 - b1.powi(self.t));
            let vh = self.v[i] / (1.0 - b2.powi(self.t));
            p[i] -= lr * mh / (vh.sqrt() + 1e-8);
        }
    }
}

fn softmax_rows(z: &[f64], e: usize) -> Vec<f64> {
    let mut p = Vec::with_capacity(z.len());
    for row in z.chunks_exact(e) {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let ex: Vec<f64> = row.iter().map(|v| (v - m).exp()).collect();
        let s: f64 = ex.iter().sum();
        p.extend(ex.iter().map(|v| v / s));
    }
    p
}

#[test]
fn each_domain_learns_its_own_expert() {
    let (domains, per, d_in, d_out, r) = (3usize, 48usize, 8usize, 6usize, 2usize);
    let e = domains;
    let t = domains * per;
    let mut rng = Rng::new(0x5eed_1234_abcd_0001);

    // Data: domain d's inputs cluster around its own mean; its target adds a rank-2 map Δ_d.
    let means: Vec<Vec<f64>> = (0..domains).map(|_| rng.normals(d_in, 1.5)).collect();
    let deltas: Vec<Vec<f64>> = (0..domains)
        .map(|_| {
            let u = rng.normals(d_out * r, 0.8);
            let v = rng.normals(r * d_in, 0.8);
            (0..d_out * d_in)
                .map(|k| {
                    (0..r)
                        .map(|j| u[(k / d_in) * r + j] * v[j * d_in + k % d_in])
                        .sum()
                })
                .collect()
        })
        .collect();
    let mut x = Vec::with_capacity(t * d_in);
    let mut target = Vec::with_capacity(t * d_out);
    let mut domain_of = Vec::with_capacity(t);
    for d in 0..domains {
        for _ in 0..per {
            let xt: Vec<f64> = means[d].iter().map(|m| m + 0.3 * rng.normal()).collect();
            for o in 0..d_out {
                target.push(
                    (0..d_in)
                        .map(|i| deltas[d][o * d_in + i] * xt[i])
                        .sum::<f64>(),
                );
            }
            x.extend(xt);
            domain_of.push(d);
        }
    }
    // The frozen base is zero here: the experts must produce the whole domain-specific part.

    // Model: LoRA init (A random, B = 0), router random and small.
    let shape = LoraShape::new(e, r, d_in, d_out).unwrap();
    let mut a = rng.normals(shape.a_len(), 0.3);
    let mut b = vec![0.0; shape.b_len()];
    let mut wg = rng.normals(e * d_in, 0.01);
    let (mut oa, mut ob, mut og) = (Adam::new(a.len()), Adam::new(b.len()), Adam::new(wg.len()));
    let ids: Vec<i32> = (0..t).flat_map(|_| 0..e as i32).collect();
    let scale = 1.0;

    let forward = |a: &[f64], b: &[f64], wg: &[f64]| {
        let logits: Vec<f64> = (0..t * e)
            .map(|k| {
                let (tok, ex) = (k / e, k % e);
                (0..d_in)
                    .map(|i| x[tok * d_in + i] * wg[ex * d_in + i])
                    .sum()
            })
            .collect();
        let p = softmax_rows(&logits, e);
        let y = lora_forward(&x, a, b, &shape, &ids, &p, e, scale).unwrap();
        let loss = y
            .iter()
            .zip(&target)
            .map(|(p, q)| (p - q) * (p - q))
            .sum::<f64>()
            / t as f64;
        (p, y, loss)
    };

    let (_, _, initial) = forward(&a, &b, &wg);
    let mut last = initial;
    for _ in 0..1500 {
        let (p, y, loss) = forward(&a, &b, &wg);
        last = loss;
        let dy: Vec<f64> = y
            .iter()
            .zip(&target)
            .map(|(p, q)| 2.0 * (p - q) / t as f64)
            .collect();
        let g = lora_backward(&x, &a, &b, &shape, &ids, &p, e, scale, &dy).unwrap();
        let dz = softmax_backward(&p, &g.dw, e, 1.0).unwrap();
        let (dwg, _, _) = router_backward(&x, &wg, &dz, d_in, e).unwrap();
        oa.step(&mut a, &g.da, 1e-2);
        ob.step(&mut b, &g.db, 1e-2);
        og.step(&mut wg, &dwg, 1e-2);
    }

    // Domain × expert table of mean routing weights.
    let (p, _, _) = forward(&a, &b, &wg);
    let mut table = vec![vec![0.0f64; e]; domains];
    for tok in 0..t {
        for ex in 0..e {
            table[domain_of[tok]][ex] += p[tok * e + ex] / per as f64;
        }
    }
    let shown: Vec<String> = table
        .iter()
        .enumerate()
        .map(|(d, row)| {
            let cells: Vec<String> = row.iter().map(|v| format!("{v:.2}")).collect();
            format!("domain {d}: [{}]", cells.join(", "))
        })
        .collect();
    let msg = format!(
        "loss {initial:.4} -> {last:.6}; mean routing weight per domain and expert:\n{}",
        shown.join("\n")
    );
    assert!(last < 0.02 * initial, "the loss did not fall enough: {msg}");
    let mut owner: Vec<usize> = table
        .iter()
        .map(|row| {
            (0..e)
                .max_by(|&i, &j| row[i].total_cmp(&row[j]))
                .unwrap_or(0)
        })
        .collect();
    for (d, row) in table.iter().enumerate() {
        assert!(
            row[owner[d]] > 0.6,
            "domain {d} is not routed mainly to one expert: {msg}"
        );
    }
    owner.sort_unstable();
    owner.dedup();
    assert_eq!(owner.len(), domains, "two domains share an expert: {msg}");
    println!("{msg}");
}
