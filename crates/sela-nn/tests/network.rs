//! The network: shapes, gradients against candle's autograd, inference properties, overfitting,
//! determinism and checkpoints.

use sela_nn::checkpoint::{self, TrainState};
use sela_nn::reference::{ConvImpl, Reference};
use sela_nn::{ModelSpec, Network, Optimizer, OptimizerKind, Readout};

fn spec(channels: usize, side: usize, heads: Vec<usize>) -> ModelSpec {
    ModelSpec {
        backbone: "resnet".into(),
        channels,
        height: side,
        width: side,
        widths: vec![4, 8],
        blocks: vec![2, 1],
        heads,
        embedding_heads: Vec::new(),
        embedding_readout: None,
    }
}

/// `base` with `heads` reading stage `stage` pooled onto `grid`×`grid`.
fn with_embedding_heads(
    base: ModelSpec,
    heads: Vec<usize>,
    stage: usize,
    grid: usize,
) -> ModelSpec {
    ModelSpec {
        embedding_heads: heads,
        embedding_readout: Some(Readout { stage, grid }),
        ..base
    }
}

fn images(n: usize, len: usize, seed: u64) -> Vec<f32> {
    let mut rng = sela_images::Rng::new(seed);
    (0..n * len).map(|_| rng.normal() as f32).collect()
}

fn labels(n: usize, k: usize, seed: u64) -> Vec<u32> {
    let mut rng = sela_images::Rng::new(seed);
    (0..n).map(|_| rng.below(k) as u32).collect()
}

fn sgd() -> OptimizerKind {
    OptimizerKind::Sgd {
        momentum: 0.9,
        weight_decay: 1e-4,
    }
}

#[test]
fn output_shapes() {
    for (c, side) in [(1, 9), (3, 8)] {
        let s = spec(c, side, vec![3, 5]);
        let net = Network::init(&s, 1).unwrap();
        let head_input = Readout::heads_input(&s);
        let out = net
            .infer(&images(5, s.image_len(), 2), 5, head_input)
            .unwrap();
        assert_eq!(out.embedding.len(), 5 * s.head_input_dim());
        assert_eq!(out.logits.len(), 2);
        assert_eq!(out.logits[0].len(), 5 * 3);
        assert_eq!(out.logits[1].len(), 5 * 5);
        assert!(out.embedding.iter().all(|v| v.is_finite()));
        let err = net
            .infer(&images(2, s.image_len(), 2), 3, head_input)
            .unwrap_err();
        assert!(err.to_string().contains("expected 3 images"), "{err}");
        let (stage, grid) = (0, side + 1);
        let err = net
            .infer(&images(2, s.image_len(), 2), 2, Readout { stage, grid })
            .unwrap_err();
        assert!(err.to_string().contains("embedding_grid"), "{err}");
    }
}

#[test]
fn several_readouts_in_one_pass_equal_each_alone() {
    let s = spec(1, 12, vec![3, 5]);
    let net = Network::init(&s, 4).unwrap();
    let x = images(9, s.image_len(), 6);
    let readouts = [
        Readout { stage: 0, grid: 2 },
        Readout::heads_input(&s),
        Readout { stage: 0, grid: 3 },
        Readout { stage: 1, grid: 2 },
    ];
    let together = net.infer_readouts(&x, 9, &readouts).unwrap();
    assert_eq!(together.embeddings.len(), readouts.len());
    for (r, embedding) in readouts.iter().zip(&together.embeddings) {
        let alone = net.infer(&x, 9, *r).unwrap();
        assert_eq!(embedding, &alone.embedding, "{r:?}");
        assert_eq!(together.logits, alone.logits);
    }
    let bad = [
        Readout { stage: 0, grid: 2 },
        Readout { stage: 0, grid: 13 },
    ];
    let err = net.infer_readouts(&x, 9, &bad).unwrap_err();
    assert!(err.to_string().contains("embedding_grid 13"), "{err}");
}

#[test]
fn gradients_equal_candle_autograd() {
    let plain = spec(3, 7, vec![3, 4]);
    // Stage 0 is 7×7 (a 3×3 grid's cells overlap there), stage 1 4×4 (the heads' own stage).
    gradient_check(plain.clone());
    gradient_check(with_embedding_heads(plain.clone(), vec![1], 0, 3));
    gradient_check(with_embedding_heads(plain.clone(), vec![0], 1, 2));
    gradient_check(with_embedding_heads(plain, vec![1, 0], 0, 2));
}

/// The fused engine's loss and gradients against candle's autograd for one architecture.
fn gradient_check(s: ModelSpec) {
    let n = 6;
    let x = images(n, s.image_len(), 5);
    let (l0, l1) = (labels(n, 3, 6), labels(n, 4, 7));
    let mut net = Network::init(&s, 3).unwrap();
    for conv in [ConvImpl::Candle, ConvImpl::Gemm] {
        let reference = Reference::new(&net, conv).unwrap();
        let (ref_losses, ref_grads) = reference.gradients(&x, n, &[&l0, &l1]).unwrap();
        let stats = net.compute_gradients(&x, n, &[&l0, &l1]).unwrap();
        for (a, b) in stats.head_losses.iter().zip(&ref_losses) {
            assert!((a - b).abs() < 1e-5, "loss {a} vs {b}");
        }
        for ((p, g), r) in net.params().iter().zip(net.grads()).zip(&ref_grads) {
            let scale = r.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
            let diff = g
                .iter()
                .zip(r)
                .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff / scale < 1e-3, "{}: {diff} (scale {scale})", p.name);
        }
    }
}

#[test]
fn inference_is_batch_independent_and_matches_candle_eval_mode() {
    // Stage 0 is 8×8, stage 1 4×4: global pooling, a grid that divides the side, and one whose
    // cells overlap.
    let plain = spec(1, 8, vec![5]);
    for (stage, grid) in [(1, 1), (1, 3), (0, 2), (0, 3)] {
        inference_check(plain.clone(), Readout { stage, grid });
    }
    // A head on stage 0's overlapping 3×3 cells, reported with another readout.
    let head_on_grid = with_embedding_heads(plain, vec![0], 0, 3);
    inference_check(head_on_grid, Readout { stage: 1, grid: 2 });
}

/// Batch independence, and candle's eval-mode forward, for one architecture and readout.
fn inference_check(s: ModelSpec, readout: Readout) {
    let mut net = Network::init(&s, 9).unwrap();
    // A few training steps so the running statistics are not the initial ones.
    let mut opt = Optimizer::new(sgd(), net.params());
    let x = images(16, s.image_len(), 1);
    let l = labels(16, 5, 2);
    for _ in 0..3 {
        net.train_step(&x, 16, &[&l], &mut opt, 0.05).unwrap();
    }
    let len = s.image_len();
    let big = images(70, len, 11);
    let all = net.infer(&big, 70, readout).unwrap();
    // Seven of those images, in another order and batch.
    let picks = [66, 3, 64, 17, 0, 41, 69];
    let small: Vec<f32> = picks
        .iter()
        .flat_map(|&i| big[i * len..(i + 1) * len].to_vec())
        .collect();
    let part = net.infer(&small, 7, readout).unwrap();
    let d = readout.dim(&s);
    assert_eq!(all.embedding.len(), 70 * d);
    for (j, &i) in picks.iter().enumerate() {
        assert_eq!(
            part.embedding[j * d..(j + 1) * d],
            all.embedding[i * d..(i + 1) * d]
        );
        assert_eq!(
            part.logits[0][j * 5..(j + 1) * 5],
            all.logits[0][i * 5..(i + 1) * 5]
        );
    }
    // Against the unfused definition: BatchNorm with running statistics in candle.
    let reference = Reference::new(&net, ConvImpl::Candle).unwrap();
    let t =
        candle_core::Tensor::from_slice(&small, (7, 1, 8, 8), &candle_core::Device::Cpu).unwrap();
    let (emb, logits) = reference.forward(&t, false, readout).unwrap();
    let emb: Vec<f32> = emb.flatten_all().unwrap().to_vec1().unwrap();
    let lg: Vec<f32> = logits[0].flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(emb.len(), part.embedding.len());
    // The readout changes the embedding only.
    let plain = net.infer(&small, 7, Readout::heads_input(&s)).unwrap();
    assert_eq!(plain.logits, part.logits);
    for (a, b) in emb
        .iter()
        .zip(&part.embedding)
        .chain(lg.iter().zip(&part.logits[0]))
    {
        assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
    }
}

#[test]
fn batchnorm_trains_on_batch_statistics_and_infers_with_running_ones() {
    let s = spec(1, 8, vec![3]);
    let mut net = Network::init(&s, 4).unwrap();
    let x = images(8, s.image_len(), 3);
    let l = labels(8, 3, 1);
    let before = net.buffers().to_vec();
    let out_before = net.infer(&x, 8, Readout::heads_input(&s)).unwrap();
    net.compute_gradients(&x, 8, &[&l]).unwrap();
    // Training mode moved the running statistics (and nothing else).
    assert_ne!(net.buffers(), &before[..]);
    let out_after = net.infer(&x, 8, Readout::heads_input(&s)).unwrap();
    assert_ne!(out_before.embedding, out_after.embedding);
    // Training mode normalises with the batch's statistics: the loss of an image depends on
    // the rest of its batch.
    let mut a = Network::init(&s, 4).unwrap();
    let mut b = Network::init(&s, 4).unwrap();
    let mut x2 = x.clone();
    let len = s.image_len();
    x2[4 * len..].iter_mut().for_each(|v| *v *= 3.0);
    let la = a.compute_gradients(&x, 8, &[&l]).unwrap();
    let lb = b.compute_gradients(&x2, 8, &[&l]).unwrap();
    assert_ne!(la.loss, lb.loss);
}

#[test]
fn one_batch_overfits() {
    let s = ModelSpec {
        widths: vec![8, 16],
        blocks: vec![1, 1],
        ..spec(1, 8, vec![4, 7])
    };
    let n = 64;
    let x = images(n, s.image_len(), 21);
    let (l0, l1) = (labels(n, 4, 1), labels(n, 7, 2));
    let mut net = Network::init(&s, 5).unwrap();
    let mut opt = Optimizer::new(
        OptimizerKind::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
        net.params(),
    );
    let first = net.compute_gradients(&x, n, &[&l0, &l1]).unwrap().loss;
    let mut last = first;
    for _ in 0..150 {
        last = net
            .train_step(&x, n, &[&l0, &l1], &mut opt, 0.01)
            .unwrap()
            .loss;
    }
    assert!(first > 1.0, "{first}");
    assert!(last < 0.05, "loss {first} → {last}");
}

#[test]
fn training_is_deterministic_and_independent_of_the_thread_count() {
    let s = spec(3, 8, vec![3]);
    let n = 20;
    let x = images(n, s.image_len(), 8);
    let l = labels(n, 3, 9);
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut net = Network::init(&s, 77).unwrap();
            let mut opt = Optimizer::new(sgd(), net.params());
            let losses: Vec<f32> = (0..3)
                .map(|_| net.train_step(&x, n, &[&l], &mut opt, 0.1).unwrap().loss)
                .collect();
            (
                losses,
                checkpoint::to_bytes(&net, Some(&opt), &TrainState::default()).unwrap(),
            )
        })
    };
    let (a, b, c) = (run(1), run(2), run(3));
    assert_eq!(a, b);
    assert_eq!(a, c);
    assert_ne!(
        Network::init(&s, 77).unwrap().params(),
        Network::init(&s, 78).unwrap().params()
    );
}

/// A two-head network after one SGD step, its optimiser, the batch and its labels.
fn trained_one_step() -> (ModelSpec, Network, Optimizer, Vec<f32>, Vec<u32>, Vec<u32>) {
    let s = spec(1, 8, vec![3, 6]);
    let mut net = Network::init(&s, 12).unwrap();
    let mut opt = Optimizer::new(sgd(), net.params());
    let x = images(10, s.image_len(), 4);
    let (l0, l1) = (labels(10, 3, 1), labels(10, 6, 2));
    net.train_step(&x, 10, &[&l0, &l1], &mut opt, 0.1).unwrap();
    (s, net, opt, x, l0, l1)
}

#[test]
fn checkpoint_round_trip_and_validation() {
    let dir = tempfile::tempdir().unwrap();
    let (s, net, opt, x, l0, l1) = trained_one_step();
    let state = TrainState {
        round: 2,
        epoch: 5,
        step: 40,
        seed: 7,
        config_hash: Some("abc".into()),
        ..Default::default()
    };
    let path = dir.path().join("ck.safetensors");
    checkpoint::save(&path, &net, Some(&opt), &state).unwrap();
    let back = checkpoint::load(&path, &s).unwrap();
    assert_eq!(back.state, state);
    assert_eq!(back.optimizer.as_ref(), Some(&opt));
    assert_eq!(back.network.params(), net.params());
    assert_eq!(back.network.buffers(), net.buffers());
    assert_eq!(
        back.network
            .infer(&x, 10, Readout::heads_input(&s))
            .unwrap(),
        net.infer(&x, 10, Readout::heads_input(&s)).unwrap()
    );
    // Training continues identically from the reloaded copy.
    let (mut a, mut oa) = (net.clone(), opt.clone());
    let (mut b, mut ob) = (back.network, back.optimizer.unwrap());
    let la = a.train_step(&x, 10, &[&l0, &l1], &mut oa, 0.1).unwrap();
    let lb = b.train_step(&x, 10, &[&l0, &l1], &mut ob, 0.1).unwrap();
    assert_eq!(la, lb);
    assert_eq!(a.params(), b.params());

    // Another head layout or architecture: a clear error.
    let other = spec(1, 8, vec![3]);
    let msg = checkpoint::load(&path, &other).unwrap_err().to_string();
    assert!(
        msg.contains("heads [3, 6], the config asks for [3]") && msg.contains("ck.safetensors"),
        "{msg}"
    );
    let wider = ModelSpec {
        widths: vec![4, 16],
        ..s.clone()
    };
    let msg = checkpoint::load(&path, &wider).unwrap_err().to_string();
    assert!(msg.contains("widths [4, 8]"), "{msg}");
    // Not a checkpoint at all, or a foreign safetensors file.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"hello").unwrap();
    assert!(checkpoint::load(&junk, &s)
        .unwrap_err()
        .to_string()
        .contains("not a safetensors"));
    let foreign = dir.path().join("foreign.safetensors");
    let data = vec![0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &data).unwrap();
    std::fs::write(
        &foreign,
        safetensors::serialize([("w", view)], None).unwrap(),
    )
    .unwrap();
    let msg = checkpoint::load(&foreign, &s).unwrap_err().to_string();
    assert!(msg.contains("not a sela checkpoint"), "{msg}");
    // Writing is atomic: nothing but the two files and the junk remain.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}

#[test]
fn a_checkpoint_carries_over_to_heads_that_read_the_embedding() {
    let dir = tempfile::tempdir().unwrap();
    let (s, net, opt, x, l0, l1) = trained_one_step();
    let state = TrainState {
        round: 3,
        ..Default::default()
    };
    let path = dir.path().join("ck.safetensors");
    checkpoint::save(&path, &net, Some(&opt), &state).unwrap();

    let same = checkpoint::load_carrying_heads(&path, &s, 99).unwrap();
    assert_eq!(same.network.params(), net.params());
    assert_eq!(same.optimizer.as_ref(), Some(&opt));

    let e = with_embedding_heads(s.clone(), vec![1], 0, 2);
    let msg = checkpoint::load(&path, &e).unwrap_err().to_string();
    assert!(msg.contains("reading the embedding"), "{msg}");
    let ck = checkpoint::load_carrying_heads(&path, &e, 99).unwrap();
    assert_eq!(ck.state, state);
    assert_eq!(ck.network.spec(), &e);
    assert_eq!(ck.network.buffers(), net.buffers());
    let fresh = Network::init(&e, 99).unwrap();
    let carried = ck.optimizer.as_ref().unwrap();
    assert_eq!(carried.steps, opt.steps);
    for (i, p) in ck.network.params().iter().enumerate() {
        let restarted = p.name.starts_with("heads.1.");
        let wanted = if restarted {
            &fresh.params()[i]
        } else {
            &net.params()[i]
        };
        assert_eq!(p, wanted, "{}", p.name);
        let momentum = &carried.state[0][i];
        if restarted {
            assert!(momentum.iter().all(|&v| v == 0.0), "{}", p.name);
            assert_eq!(
                p.shape[p.shape.len() - 1],
                if p.name.ends_with("weight") { 16 } else { 6 }
            );
        } else {
            assert_eq!(momentum, &opt.state[0][i], "{}", p.name);
        }
    }
    // The carried network trains; it does not go back, nor to another architecture.
    let (mut n2, mut o2) = (ck.network, ck.optimizer.unwrap());
    n2.train_step(&x, 10, &[&l0, &l1], &mut o2, 0.1).unwrap();
    let on_grid = dir.path().join("on-grid.safetensors");
    checkpoint::save(&on_grid, &n2, Some(&o2), &state).unwrap();
    let msg = checkpoint::load_carrying_heads(&on_grid, &s, 99)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("heads [1] on stage 0 pooled onto 2×2 reading the embedding, the config asks for no heads"),
        "{msg}"
    );
    let wider = ModelSpec {
        widths: vec![4, 16],
        ..e
    };
    let msg = checkpoint::load_carrying_heads(&path, &wider, 99)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("widths [4, 8]"), "{msg}");
}
