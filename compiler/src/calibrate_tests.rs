//! Calibration tests (moved with the module from the runtime): budgets are met on held-out text, the
//! stored quantiles serve other budgets, per-layer targets, target checks, and counted FLOPs.

use super::*;
use candle_core::{DType, Device};
use dlo_passes::SkipKind;
use dlo_runtime::testing::{random_weights, routed, routed_mlp, text_ids, tiny_config, XorShift, CALIB_TEXT};
use dlo_runtime::Model;

const HELDOUT_TEXT: &str = "Mountains rise to the north of the city, and in winter the passes close for \
weeks at a time. Shepherds once drove their flocks up to the high meadows each spring and down again in \
autumn, a journey that took several days. The monastery on the ridge kept a library of old manuscripts, \
some of which describe storms, earthquakes and the arrival of strangers from across the sea. Now a cable \
car carries visitors to the summit, where a small museum explains the geology of the range and the \
lives of the people who farmed its slopes. ";

/// `n` bytes of English-like text: an order-3 character Markov chain fitted to the built-in paragraphs,
/// sampled with a seeded xorshift generator (so calibration and held-out text differ but match in kind).
fn markov_text(n: usize, seed: u64) -> String {
    let corpus: Vec<u8> = format!("{CALIB_TEXT}{HELDOUT_TEXT}{MORE_TEXT}").into_bytes();
    let mut next: std::collections::HashMap<&[u8], Vec<u8>> = std::collections::HashMap::new();
    for w in corpus.windows(4) {
        next.entry(&w[..3]).or_default().push(w[3]);
    }
    let mut rng = XorShift::new(seed);
    let mut out: Vec<u8> = corpus[..3].to_vec();
    while out.len() < n {
        let state = rng.next_u64();
        let ctx = &out[out.len() - 3..];
        let c = match next.get(ctx) {
            Some(choices) => choices[(state % choices.len() as u64) as usize],
            None => corpus[(state % corpus.len() as u64) as usize],
        };
        out.push(c);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Calibration and held-out ids: independent samples of the same kind of text.
fn split_corpus(vocab: u32) -> (Vec<u32>, Vec<u32>) {
    (
        text_ids(&markov_text(24576, 1), vocab),
        text_ids(&markov_text(24576, 2), vocab),
    )
}

const MORE_TEXT: &str = "In the kitchen, the recipe called for two cups of flour, a pinch of salt, three \
eggs and a little milk. She whisked the batter until it was smooth, let it rest for half an hour, and then \
poured thin circles into a hot pan. Her brother set the table, found the jam in the back of the cupboard \
and argued that pancakes were better with lemon and sugar. Outside, rain tapped on the window and the \
radio played an old song about the sea. Nobody was in a hurry; the morning stretched ahead, quiet and \
unplanned, and the smell of butter filled the house. ";

#[test]
fn calibration_hits_budget_on_heldout_text() {
    let cfg = routed(
        ModelConfig {
            num_hidden_layers: 4,
            ..tiny_config(false)
        },
        SkipKind::Mlp,
    );
    let w = random_weights(&cfg, 21);
    let model = Model::load(&cfg, &w, DType::F32, &Device::Cpu).unwrap();
    let v = cfg.vocab_size as u32;
    let (calib, held) = split_corpus(v);
    let reference = routing_stats(&model, &held, &Routing::Reference, 128, 8).unwrap().rate;
    for target in [0.35, 0.75] {
        let cal = calibrate(
            &model,
            &calib,
            Some(&held),
            &CalibrationOptions {
                target: Some(RateTarget::Uniform(target)),
                ..Default::default()
            },
        )
        .unwrap();
        let b = cal.budget.as_ref().unwrap();
        assert!(
            (b.calibration_rate - target).abs() <= 0.01,
            "{target}: calibration rate {b:?}"
        );
        let h = b.heldout_rate.unwrap();
        assert!(
            (h - target).abs() <= 0.02,
            "{target}: held-out rate {h} (reference rule gives {reference}, rounds {:?})",
            cal.round_rates
        );
        // The runtime re-measures the same rate through an engine's stored plan.
        let mut plan = EnginePlan::from_config(&cfg);
        cal.apply(&mut plan);
        let r = routing_stats(&model, &held, &plan.routing(None).unwrap(), 128, 8)
            .unwrap()
            .rate;
        assert_eq!(r, h, "the stored plan reproduces the calibrated routing");
    }
}

#[test]
fn budget_override_from_quantiles_tracks_the_target() {
    let cfg = routed(tiny_config(false), SkipKind::Layer);
    let model = Model::load(&cfg, &random_weights(&cfg, 5), DType::F32, &Device::Cpu).unwrap();
    let v = cfg.vocab_size as u32;
    let (calib, held) = split_corpus(v);
    let cal = calibrate(
        &model,
        &calib,
        None,
        &CalibrationOptions {
            target: Some(RateTarget::Uniform(0.7)),
            ..Default::default()
        },
    )
    .unwrap();
    let mut plan = EnginePlan::from_config(&cfg);
    cal.apply(&mut plan);
    let mut last = 0.0;
    for r in [0.3, 0.5, 0.7, 0.9, 1.0] {
        let rate = routing_stats(&model, &held, &plan.routing(Some(r)).unwrap(), 128, 8)
            .unwrap()
            .rate;
        // Quantiles come from the 0.7-calibrated run, so other budgets are approximate; 1.0 is exact.
        assert!((rate - r).abs() <= 0.06, "budget {r}: rate {rate}");
        assert!(rate >= last, "rates grow with the budget");
        last = rate;
    }
    assert_eq!(last, 1.0);
}

#[test]
fn calibration_without_budget_records_reference_quantiles() {
    let cfg = routed_mlp();
    let model = Model::load(&cfg, &random_weights(&cfg, 9), DType::F32, &Device::Cpu).unwrap();
    let ids = text_ids(CALIB_TEXT, cfg.vocab_size as u32);
    let cal = calibrate(&model, &ids, None, &CalibrationOptions::default()).unwrap();
    assert!(cal.budget.is_none());
    assert_eq!(cal.round_rates.len(), 1);
    let stats = routing_stats(&model, &ids, &Routing::Reference, 128, 8).unwrap();
    for l in [1, 2] {
        let q = cal.quantiles[l].as_ref().unwrap();
        let z = stats.logits[l].as_ref().unwrap();
        assert_eq!(q[0], z[0]);
        assert_eq!(q[100], *z.last().unwrap());
    }
    assert!(cal.quantiles[0].is_none());
    let dense = Model::load(
        &tiny_config(true),
        &random_weights(&tiny_config(true), 1),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let err = calibrate(&dense, &ids, None, &CalibrationOptions::default()).unwrap_err();
    assert!(err.to_string().contains("no routed layers"), "{err}");
}

#[test]
fn per_layer_calibration_gives_each_layer_its_own_rate() {
    let cfg = routed(
        ModelConfig {
            num_hidden_layers: 5,
            ..tiny_config(false)
        },
        SkipKind::Mlp,
    );
    let model = Model::load(&cfg, &random_weights(&cfg, 33), DType::F32, &Device::Cpu).unwrap();
    let (calib, held) = split_corpus(cfg.vocab_size as u32);
    // layer 0 is dense; the others: always, never, and two fractions
    let targets = vec![None, Some(1.0), Some(0.0), Some(0.8), Some(0.4)];
    let cal = calibrate(
        &model,
        &calib,
        Some(&held),
        &CalibrationOptions {
            target: Some(RateTarget::PerLayer(targets.clone())),
            ..Default::default()
        },
    )
    .unwrap();
    let b = cal.budget.as_ref().unwrap();
    assert!(
        (b.rate - 0.55).abs() < 1e-12,
        "the budget is the mean target: {}",
        b.rate
    );
    assert_eq!(b.layer_rates.as_ref(), Some(&targets));
    let mut plan = EnginePlan::from_config(&cfg);
    cal.apply(&mut plan);
    plan.validate(&cfg).unwrap();
    let stats = routing_stats(&model, &held, &plan.routing(None).unwrap(), 128, 8).unwrap();
    let rates = &stats.layer_rates;
    assert_eq!(rates[0], None);
    assert_eq!(rates[1], Some(1.0), "rate 1 executes every held-out token");
    assert_eq!(rates[2], Some(0.0), "rate 0 executes none");
    for l in [3, 4] {
        let (r, t) = (rates[l].unwrap(), targets[l].unwrap());
        assert!((r - t).abs() <= 0.03, "layer {l}: held-out rate {r}, target {t}");
    }

    // Another budget keeps the proportions: the never-layer stays off, the always-layer saturates.
    let stats = routing_stats(&model, &held, &plan.routing(Some(0.4)).unwrap(), 128, 8).unwrap();
    assert!((stats.rate - 0.4).abs() <= 0.04, "budget 0.4: {:?}", stats.layer_rates);
    assert_eq!(stats.layer_rates[2], Some(0.0));
    let (a, b) = (stats.layer_rates[3].unwrap(), stats.layer_rates[4].unwrap());
    // (the quantile tables come from the calibrated run, whose upstream layers executed other fractions,
    // so another budget's per-layer rates are approximate; their order is not)
    assert!(a > b + 0.1 && b > 0.1, "0.8 : 0.4 keeps its order, got {a} : {b}");
    let err = plan.routing(Some(0.9)).unwrap_err().to_string();
    assert!(err.contains("out of reach"), "{err}");
    let all = routing_stats(&model, &held, &plan.routing(Some(1.0)).unwrap(), 128, 8).unwrap();
    assert_eq!(all.rate, 1.0, "budget 1 executes everything");
}

#[test]
fn rate_targets_are_checked_against_the_model() {
    let cfg = routed_mlp(); // 3 layers, 1 and 2 routed
    let err = |t: RateTarget| t.layer_rates(&cfg).unwrap_err().to_string();
    assert!(err(RateTarget::PerLayer(vec![None, Some(0.5)])).contains("2 per-layer target rates"));
    assert!(err(RateTarget::PerLayer(vec![None, Some(1.5), Some(0.5)])).contains("layer 1: target rate 1.5"));
    assert!(err(RateTarget::PerLayer(vec![None, None, Some(0.5)])).contains("layer 1 is routed"));
    assert!(err(RateTarget::Uniform(0.0)).contains("outside (0, 1]"));
    // a dense layer's entry is ignored
    assert_eq!(
        RateTarget::PerLayer(vec![Some(0.3), Some(0.5), Some(1.0)])
            .layer_rates(&cfg)
            .unwrap(),
        vec![None, Some(0.5), Some(1.0)]
    );
    // the trained capacity: a scalar applies to every routed layer
    assert_eq!(
        RateTarget::trained_capacity(&cfg).unwrap().layer_rates(&cfg).unwrap(),
        vec![None, Some(0.9), Some(0.9)]
    );
    // a per-layer capacity above 1 (annealing's rescale can leave one) executes every token, as training's
    // top-k does
    let mut over = cfg.clone();
    over.dlo.as_mut().unwrap().capacity = dlo_passes::Capacity::PerLayer(vec![None, Some(1.2), Some(0.4)]);
    assert_eq!(
        RateTarget::trained_capacity(&over).unwrap().layer_rates(&over).unwrap(),
        vec![None, Some(1.0), Some(0.4)]
    );
    let dense = tiny_config(true);
    assert!(RateTarget::trained_capacity(&dense)
        .unwrap_err()
        .to_string()
        .contains("no DLO config"));
    let model = Model::load(&cfg, &random_weights(&cfg, 2), DType::F32, &Device::Cpu).unwrap();
    let ids = text_ids(CALIB_TEXT, cfg.vocab_size as u32);
    let opts = CalibrationOptions {
        target: Some(RateTarget::PerLayer(vec![None, Some(0.0), Some(0.0)])),
        ..Default::default()
    };
    let e = calibrate(&model, &ids, None, &opts).unwrap_err().to_string();
    assert!(e.contains("execute nothing"), "{e}");
}

#[test]
fn lower_budget_lowers_counted_flops_in_proportion() {
    use dlo_runtime::generate::{GenerateParams, Generator};
    let cfg = routed_mlp();
    let model = Model::load(&cfg, &random_weights(&cfg, 5), DType::F32, &Device::Cpu).unwrap();
    let (calib, held) = split_corpus(cfg.vocab_size as u32);
    let cal = calibrate(
        &model,
        &calib,
        None,
        &CalibrationOptions {
            target: Some(RateTarget::Uniform(0.7)),
            ..Default::default()
        },
    )
    .unwrap();
    let mut plan = EnginePlan::from_config(&cfg);
    cal.apply(&mut plan);
    let prompt = &held[..48];
    let run = |routing: Routing| {
        let params = GenerateParams {
            max_tokens: 16,
            routing,
            ..Default::default()
        };
        let g = Generator::new(&model, params)
            .unwrap()
            .generate(prompt, |_| std::ops::ControlFlow::Continue(()))
            .unwrap();
        let rate = g.routing.mean_rate();
        (dlo_runtime::flops::of_generation(&cfg, &g).total() as f64, rate)
    };
    let (f_off, _) = run(Routing::Force(false));
    let (f_on, _) = run(Routing::Force(true));
    let mut last = f_off;
    for r in [0.3, 0.6, 0.9] {
        let (f, rate) = run(plan.routing(Some(r)).unwrap());
        assert!(
            f > last && f < f_on,
            "budget {r}: {f} FLOPs not between {last} and {f_on}"
        );
        // With MLP skipping only the routed MLPs vary: the FLOPs fraction between all-off and all-on is the
        // realised execution rate (both routed layers have the same MLP cost).
        let frac = (f - f_off) / (f_on - f_off);
        assert!(
            (frac - rate).abs() < 1e-6,
            "budget {r}: FLOPs fraction {frac} vs execution rate {rate}"
        );
        assert!((rate - r).abs() <= 0.15, "budget {r}: rate {rate}");
        last = f;
    }
}
