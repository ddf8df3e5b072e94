//! Real training on the demo text: the loss falls, and the math does not depend on who computes
//! which micro-batch.

#![allow(clippy::unwrap_used)] // test helpers: a panic is the failure report

mod common;

use common::{demo_corpus, tiny_config};
use ninelives_worker::Trainer;
use ninelives_worker::trainer::run_with_threads;

#[test]
fn loss_falls_clearly_below_uniform_on_the_demo_text() {
    let steps = 120;
    let losses = run_with_threads(2, || {
        let mut trainer = Trainer::new(tiny_config(steps), demo_corpus()).unwrap();
        (0..steps).map(|_| trainer.train_step().unwrap().loss).collect::<Vec<_>>()
    })
    .unwrap();
    let uniform = 256f64.ln();
    assert!((losses[0] - uniform).abs() < 0.3, "initial loss {} should be near ln 256", losses[0]);
    let tail: f64 = losses[steps as usize - 10..].iter().sum::<f64>() / 10.0;
    assert!(tail < 3.0, "mean loss of the last 10 of {steps} steps is {tail:.3}; curve: {losses:?}");
}

#[test]
fn micro_batch_order_and_owner_do_not_change_the_result() {
    let steps = 4;
    let (straight, shuffled) = run_with_threads(2, || {
        let mut a = Trainer::new(tiny_config(steps), demo_corpus()).unwrap();
        let mut b = Trainer::new(tiny_config(steps), demo_corpus()).unwrap();
        for _ in 0..steps {
            a.train_step().unwrap();
            // As if micro-batches were computed by different workers and arrived out of order.
            let n = b.config().micro_batches();
            let results: Vec<_> =
                (0..n).rev().map(|i| b.micro_batch_gradients(&b.micro_batch(i)).unwrap()).collect();
            let (grads, _) = b.reduce(results).unwrap();
            b.apply(&grads).unwrap();
        }
        (a.params_sha256().unwrap(), b.params_sha256().unwrap())
    })
    .unwrap();
    assert_eq!(straight, shuffled);
}

#[test]
fn the_same_run_twice_is_bit_identical_and_a_different_seed_is_not() {
    let steps = 3;
    let digest = |seed: u64| {
        run_with_threads(2, || {
            let mut config = tiny_config(steps);
            config.seed = seed;
            let mut t = Trainer::new(config, demo_corpus()).unwrap();
            for _ in 0..steps {
                t.train_step().unwrap();
            }
            t.params_sha256().unwrap()
        })
        .unwrap()
    };
    let a = digest(42);
    assert_eq!(a, digest(42));
    assert_ne!(a, digest(43));
}

#[test]
fn a_missing_micro_batch_is_refused() {
    let trainer = Trainer::new(tiny_config(1), demo_corpus()).unwrap();
    let only_first = vec![trainer.micro_batch_gradients(&trainer.micro_batch(0)).unwrap()];
    let err = trainer.reduce(only_first).unwrap_err();
    assert!(err.to_string().contains("exactly once"), "{err}");
}
