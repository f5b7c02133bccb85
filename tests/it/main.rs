//! End-to-end tests on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) on the CPU,
//! against an independent reference: Hugging Face transformers' GGUF loader in f32
//! (`tests/data/make_reference.py` made `tests/data/smollm2_reference.json`).

mod parallel;

use flint_e2e::{cpu_engine, smollm2_reference};
use flint_engine::{ChatMessage, FinishReason, GenerateRequest, Prompt, SamplingParams};

/// Below this top-2 logit margin the reference's own f32 rounding could flip the choice, so a
/// divergence there is not evidence of a bug. No step of the committed cases is that close.
const TIE_MARGIN: f32 = 1e-3;

#[test]
fn tokenizer_matches_reference_ids() {
    let engine = cpu_engine();
    let reference = smollm2_reference();
    for case in &reference.tokenizer {
        let ids = engine.tokenizer().encode(&case.text, true).expect("encodes");
        assert_eq!(ids, case.ids, "token ids of {:?}", case.text);
        let text = engine.tokenizer().decode(&ids, false).expect("decodes");
        assert_eq!(text, case.text, "round trip of {:?}", case.text);
    }
}

#[test]
fn prompts_tokenize_like_the_reference() {
    let engine = cpu_engine();
    for case in smollm2_reference().cases {
        let prompt = match case.kind.as_str() {
            "raw" => Prompt::Raw(case.prompt.clone()),
            _ => {
                let messages = vec![ChatMessage::new("user", case.prompt.clone())];
                let rendered = engine.tokenizer().apply_chat_template(&messages).expect("renders");
                assert_eq!(Some(&rendered), case.rendered.as_ref(), "chat template of {:?}", case.prompt);
                Prompt::Chat(messages)
            }
        };
        assert_eq!(engine.prompt_ids(&prompt).expect("tokenizes"), case.prompt_token_ids, "{:?}", case.prompt);
    }
}

#[test]
fn prefill_logits_match_reference() {
    let engine = cpu_engine();
    let reference = smollm2_reference();
    let ids = &reference.cases[0].prompt_token_ids;
    let (model, backend) = engine.backend_model().expect("the CPU engine");
    let mut cache = model.new_kv_cache(backend, ids.len()).expect("cache");
    let logits = model.forward(backend, ids, &mut cache, false).expect("forward");
    let logits = backend.to_f32_vec(&logits).expect("read");
    let top = &reference.first_prompt_top10;
    for (id, want) in top.ids.iter().zip(&top.logits) {
        let got = logits[*id as usize];
        assert!((got - want).abs() < 2e-3 * want.abs().max(1.0), "logit of {id}: {got} vs {want}");
    }
    let argmax = flint_engine::argmax(&logits);
    assert_eq!(argmax, top.ids[0]);
}

#[test]
fn greedy_generation_matches_reference_token_for_token() {
    let engine = cpu_engine();
    let reference = smollm2_reference();
    assert!(reference.generator.contains("transformers"));
    let long_cases = reference.cases.iter().filter(|c| c.token_ids.len() >= 48).count();
    assert!(long_cases >= 4, "the reference must hold several generations of 48+ tokens");
    for case in &reference.cases {
        let prompt = match case.kind.as_str() {
            "raw" => Prompt::Raw(case.prompt.clone()),
            _ => Prompt::Chat(vec![ChatMessage::new("user", case.prompt.clone())]),
        };
        let request = GenerateRequest {
            max_tokens: case.token_ids.len(),
            sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() },
            ..GenerateRequest::new(prompt)
        };
        let generation = engine.generate(&request, &mut |_| {}).expect("generates");
        assert_eq!(generation.prompt_token_ids, case.prompt_token_ids);
        let first_diff = generation.token_ids.iter().zip(&case.token_ids).position(|(a, b)| a != b);
        if let Some(step) = first_diff {
            assert!(
                case.margins[step] < TIE_MARGIN,
                "{:?}: token {step} differs ({} vs reference {}), reference margin {}\n ours: {:?}\n  ref: {:?}",
                case.prompt,
                generation.token_ids[step],
                case.token_ids[step],
                case.margins[step],
                generation.text,
                case.text,
            );
        } else {
            assert_eq!(generation.token_ids, case.token_ids, "{:?}", case.prompt);
        }
        let ended_on_eos = case.token_ids.last().is_some_and(|t| engine.tokenizer().stop_ids().contains(t));
        let want_reason = if ended_on_eos { FinishReason::Stop } else { FinishReason::Length };
        assert_eq!(generation.finish_reason, want_reason, "{:?}", case.prompt);
        // The streamed text is the decoded ids without the EOS.
        let ids_without_eos =
            if ended_on_eos { &case.token_ids[..case.token_ids.len() - 1] } else { &case.token_ids[..] };
        let want_text = engine.tokenizer().decode(ids_without_eos, true).expect("decodes");
        assert_eq!(generation.text, want_text);
    }
}

#[test]
fn streamed_pieces_concatenate_to_the_text() {
    let engine = cpu_engine();
    let request = GenerateRequest {
        max_tokens: 24,
        sampling: SamplingParams { temperature: 0.9, top_p: 0.95, seed: Some(11), ..SamplingParams::default() },
        ..GenerateRequest::new(Prompt::Raw("Emoji and accents: café 🦀".to_string()))
    };
    let mut streamed = String::new();
    let generation = engine.generate(&request, &mut |piece| streamed.push_str(piece)).expect("generates");
    assert_eq!(streamed, generation.text);
    // The same seed gives the same tokens.
    let again = engine.generate(&request, &mut |_| {}).expect("generates");
    assert_eq!(again.token_ids, generation.token_ids);
    assert_eq!(generation.seed, 11);
}

#[test]
fn stop_strings_end_generation_before_the_match() {
    let engine = cpu_engine();
    let case = &smollm2_reference().cases[2];
    let full = &case.text;
    // Stop at the first "return" of the reference continuation.
    let cut = full.find("return").expect("reference continuation has a return");
    let request = GenerateRequest {
        max_tokens: case.token_ids.len(),
        stop: vec!["return".to_string()],
        ..GenerateRequest::new(Prompt::Raw(case.prompt.clone()))
    };
    let generation = engine.generate(&request, &mut |_| {}).expect("generates");
    assert_eq!(generation.finish_reason, FinishReason::Stop);
    assert_eq!(generation.stop_string.as_deref(), Some("return"));
    assert_eq!(generation.text, full[..cut]);
}

#[test]
fn bad_requests_are_errors() {
    let engine = cpu_engine();
    let empty = GenerateRequest::new(Prompt::Raw(String::new()));
    assert!(engine.generate(&empty, &mut |_| {}).is_err());
    let zero = GenerateRequest { max_tokens: 0, ..GenerateRequest::new(Prompt::Raw("hi".into())) };
    assert!(engine.generate(&zero, &mut |_| {}).is_err());
    let bad_id = GenerateRequest::new(Prompt::TokenIds(vec![1, 999_999]));
    let err = engine.generate(&bad_id, &mut |_| {}).expect_err("out of vocabulary");
    assert!(err.to_string().contains("999999"), "{err}");
    let too_long = GenerateRequest::new(Prompt::TokenIds(vec![42; 8192]));
    let err = engine.generate(&too_long, &mut |_| {}).expect_err("longer than the context");
    assert!(err.to_string().contains("8192"), "{err}");
    let bad_temp = GenerateRequest {
        sampling: SamplingParams { temperature: f32::NAN, ..SamplingParams::default() },
        ..GenerateRequest::new(Prompt::Raw("hi".into()))
    };
    assert!(engine.generate(&bad_temp, &mut |_| {}).expect_err("nan").to_string().contains("temperature"));
}

mod streaming {
    use flint_e2e::cpu_engine;
    use flint_engine::StreamDecoder;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        /// Streaming the ids of any text, one id at a time, gives pieces that are whole
        /// characters and that concatenate to the text decoded at once.
        #[test]
        fn pieces_concatenate_to_the_full_decode(text in "[a-z ]{0,6}[é東京🦀👩‍👩‍👧ß\u{300}]{1,4}[a-z0-9 ]{0,6}[😀-🙏]{0,3}") {
            let tokenizer = cpu_engine().tokenizer();
            let ids = tokenizer.encode(&text, false).unwrap();
            let mut decoder = StreamDecoder::new();
            let mut streamed = String::new();
            for &id in &ids {
                let piece = decoder.push(tokenizer, id).unwrap();
                prop_assert!(!piece.contains('\u{FFFD}'), "replacement character in {:?}", piece);
                streamed.push_str(&piece);
            }
            streamed.push_str(&decoder.finish(tokenizer).unwrap());
            prop_assert_eq!(&streamed, &tokenizer.decode(&ids, true).unwrap());
            prop_assert_eq!(&streamed, &text);
        }
    }

    /// Ids that stop mid-character hold the partial character back until the end.
    #[test]
    fn a_split_character_is_held_back() {
        let tokenizer = cpu_engine().tokenizer();
        let ids = tokenizer.encode("🦀", false).unwrap();
        assert!(ids.len() > 1, "the crab emoji spans several byte-level tokens: {ids:?}");
        let mut decoder = StreamDecoder::new();
        for &id in &ids[..ids.len() - 1] {
            assert_eq!(decoder.push(tokenizer, id).unwrap(), "");
        }
        assert_eq!(decoder.push(tokenizer, ids[ids.len() - 1]).unwrap(), "🦀");
    }
}

/// The same tokenizer and chat template loaded from a Hugging Face directory (`tokenizer.json`,
/// `tokenizer_config.json`) encode and render exactly as the GGUF-built one.
#[test]
fn hugging_face_tokenizer_files_load_the_same_tokenizer() {
    use flint_engine::Tokenizer;
    use flint_model::ModelConfig;

    let engine = cpu_engine();
    let dir = std::env::temp_dir().join(format!("flint-e2e-hf-tokenizer-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let source = flint_model::ModelSource::open(&flint_e2e::default_model_path()).unwrap();
    let flint_model::ModelSource::Gguf(gguf) = &source else { panic!("the default model is a GGUF file") };
    let template = gguf.get("tokenizer.chat_template").and_then(|v| v.as_str()).unwrap().to_string();
    std::fs::write(dir.join("tokenizer.json"), engine.tokenizer().to_json().unwrap()).unwrap();
    let tok_config = serde_json::json!({
        "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template,
    });
    std::fs::write(dir.join("tokenizer_config.json"), tok_config.to_string()).unwrap();
    let config: &ModelConfig = engine.config();
    let hf = Tokenizer::from_hf_dir(&dir, config).unwrap();
    for case in smollm2_reference().tokenizer {
        assert_eq!(hf.encode(&case.text, true).unwrap(), case.ids, "{:?}", case.text);
    }
    let messages = vec![ChatMessage::new("user", "Hi there")];
    assert_eq!(hf.apply_chat_template(&messages).unwrap(), engine.tokenizer().apply_chat_template(&messages).unwrap());
    assert_eq!(hf.stop_ids(), engine.tokenizer().stop_ids());
    let _ = std::fs::remove_dir_all(&dir);
}

mod scheduling {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    use flint_e2e::{cpu_engine, smollm2_reference};
    use flint_engine::{
        ChatMessage, FinishReason, GenerateRequest, Prompt, SamplingParams, Scheduler, SchedulerConfig, StreamEvent,
        TokenLogprob,
    };

    #[derive(Default, Debug)]
    struct Collected {
        tokens: Vec<u32>,
        text: String,
        logprobs: Vec<TokenLogprob>,
        finish: Option<FinishReason>,
        error: Option<String>,
    }

    fn collector() -> (Arc<Mutex<Collected>>, flint_engine::Sink<'static>) {
        let out = Arc::new(Mutex::new(Collected::default()));
        let sink_out = Arc::clone(&out);
        let sink = Box::new(move |event: StreamEvent| {
            let mut c = sink_out.lock().expect("collector lock");
            match event {
                StreamEvent::Delta { text, token_ids, logprobs } => {
                    c.text.push_str(&text);
                    c.tokens.extend(token_ids);
                    c.logprobs.extend(logprobs);
                }
                StreamEvent::Finished { reason, .. } => c.finish = Some(reason),
                StreamEvent::Error(e) => c.error = Some(e),
            }
            true
        });
        (out, sink)
    }

    fn request_for(kind: &str, prompt: &str, max_tokens: usize) -> GenerateRequest {
        let prompt = match kind {
            "raw" => Prompt::Raw(prompt.to_string()),
            _ => Prompt::Chat(vec![ChatMessage::new("user", prompt)]),
        };
        GenerateRequest { max_tokens, ..GenerateRequest::new(prompt) }
    }

    /// Every reference case, twice (the second copy reuses the first's cached prefix), run
    /// together through a cache far too small for all of them and a small token budget: each
    /// greedy stream equals the reference, and every block is free afterwards.
    #[test]
    fn concurrent_requests_under_memory_pressure_match_the_reference() {
        concurrent_requests_match_the_reference(cpu_engine());
    }

    /// The same schedule with SmolLM2 split over 3 tensor-parallel ranks (9 heads, 3 KV heads:
    /// each rank 3 heads and 1 KV head, a third of the MLP and of the vocabulary): the same
    /// greedy tokens as the reference, with requests joining and leaving the running batch.
    #[test]
    fn tensor_parallel_ranks_under_continuous_batching_match_the_reference() {
        let engine = flint_e2e::cpu_tp_engine(3);
        assert!(engine.device().contains("3 x cpu"), "{}", engine.device());
        concurrent_requests_match_the_reference(&engine);
    }

    /// Sampled (not greedy) streams through the 3 tensor-parallel ranks, where each step's ranks
    /// return only their vocabulary part's most likely tokens: with the same seeds, the same
    /// tokens as the whole model on one rank, which samples from the full logits. Penalties and
    /// log-probabilities, which need every logit, take the full-logits path and agree too.
    #[test]
    fn tensor_parallel_sampling_from_candidates_matches_one_rank() {
        let tp = flint_e2e::cpu_tp_engine(3);
        let one = cpu_engine();
        let base = SamplingParams { temperature: 0.9, seed: Some(11), ..SamplingParams::default() };
        let cases = [
            SamplingParams { top_k: 20, top_p: 0.95, ..base.clone() },
            SamplingParams { top_k: 40, min_p: 0.05, temperature: 1.3, seed: Some(3), ..base.clone() },
            SamplingParams { top_k: 1, ..base.clone() },
            SamplingParams { top_k: 8, repetition_penalty: 1.3, ..base.clone() },
        ];
        for (i, sampling) in cases.into_iter().enumerate() {
            let prompt = Prompt::Raw("The old lighthouse keeper looked out over the".to_string());
            let request = GenerateRequest {
                max_tokens: 12,
                ignore_eos: true,
                sampling: sampling.clone(),
                logprobs: (i == 1).then_some(2),
                ..GenerateRequest::new(prompt)
            };
            let want = one.generate(&request, &mut |_| {}).expect("one rank");
            let got = tp.generate(&request, &mut |_| {}).expect("tp");
            assert_eq!(got.token_ids, want.token_ids, "{sampling:?}");
        }
    }

    /// Requests that need their logits on the host (a repetition penalty, a frequency penalty,
    /// log-probabilities) among requests drawn where the logits are (the CPU backend draws by
    /// the device's rule): the steps they share return the drawn rows' tokens and the others'
    /// logits, and every request gets the tokens it gets alone (where its steps are all of one
    /// kind), with its seed.
    #[test]
    fn host_sampled_rows_share_steps_with_drawn_ones() {
        let engine = cpu_engine();
        let base = SamplingParams { temperature: 0.9, seed: Some(5), ..SamplingParams::default() };
        let cases = [
            (SamplingParams { top_p: 0.9, ..base.clone() }, None),
            (SamplingParams { repetition_penalty: 1.4, seed: Some(6), ..base.clone() }, None),
            (SamplingParams { min_p: 0.05, temperature: 1.2, seed: Some(7), ..base.clone() }, Some(3)),
            (SamplingParams::default(), None),
            (SamplingParams { frequency_penalty: 0.8, top_k: 30, seed: Some(8), ..base.clone() }, None),
            (SamplingParams { top_k: 12, seed: Some(9), ..base.clone() }, None),
        ];
        let requests: Vec<GenerateRequest> = cases
            .iter()
            .enumerate()
            .map(|(i, (sampling, logprobs))| GenerateRequest {
                max_tokens: 10,
                ignore_eos: true,
                sampling: sampling.clone(),
                logprobs: *logprobs,
                ..request_for("raw", &format!("Story {i}: the old lighthouse keeper looked out over the"), 10)
            })
            .collect();
        let alone: Vec<Vec<u32>> =
            requests.iter().map(|r| engine.generate(r, &mut |_| {}).expect("alone").token_ids).collect();
        let config =
            SchedulerConfig { block_size: 16, n_blocks: 64, max_batch_tokens: 256, max_running: 8, max_waiting: 64 };
        let cache = engine.new_kv_cache(config.n_blocks, config.block_size).expect("cache");
        let mut scheduler = Scheduler::new(config, engine.stop_ids()).expect("scheduler");
        let mut outs = Vec::new();
        for r in &requests {
            let (out, sink) = collector();
            scheduler.add(engine.prepare(r).expect("prepare"), sink, Arc::new(AtomicBool::new(false))).expect("add");
            outs.push(out);
        }
        while scheduler.has_work() {
            scheduler.step(&engine.executor(&cache), engine.tokenizer()).expect("step");
        }
        let stats = scheduler.stats();
        assert!(stats.mixed_draw_steps > 0, "no step mixed drawn and host-sampled rows: {stats:?}");
        for (i, (out, want)) in outs.iter().zip(&alone).enumerate() {
            let out = out.lock().expect("collector");
            assert_eq!(out.error, None, "request {i}");
            assert_eq!(&out.tokens, want, "request {i} ({:?}): together against alone", cases[i]);
            if let Some(n) = cases[i].1 {
                assert_eq!(out.logprobs.len(), want.len(), "request {i}: a log-probability entry per token");
                assert!(out.logprobs.iter().all(|l| l.top.len() == n), "request {i}: {n} alternatives each");
            }
        }
    }

    /// SmolLM2's 30 layers in 3 pipeline stages (balanced by weights read: the LM head makes
    /// the last stage shorter), a step per stage in flight, each step's sequences flowing
    /// through as 3 micro-batches; and 2 stages of 3 tensor-parallel ranks each. The same tokens
    /// as the reference, with requests joining while the pipeline is full.
    #[test]
    fn pipeline_stages_under_continuous_batching_match_the_reference() {
        for (tp, pp) in [(1, 3), (3, 2)] {
            let engine = flint_e2e::cpu_pipeline_engine(tp, pp);
            concurrent_requests_match_the_reference(&engine);
        }
    }

    fn concurrent_requests_match_the_reference(engine: &flint_engine::Engine) {
        let reference = smollm2_reference();
        let config =
            SchedulerConfig { block_size: 16, n_blocks: 14, max_batch_tokens: 48, max_running: 8, max_waiting: 64 };
        let cache = engine.new_kv_cache(config.n_blocks, config.block_size).expect("scheduler call");
        let mut scheduler = Scheduler::new(config, engine.stop_ids()).expect("scheduler call");
        let mut expected = Vec::new();
        for round in 0..2 {
            for case in &reference.cases {
                let max_tokens = 6 + (expected.len() % 5) * 3;
                let request =
                    engine.prepare(&request_for(&case.kind, &case.prompt, max_tokens)).expect("scheduler call");
                let (out, sink) = collector();
                scheduler.add(request, sink, Arc::new(AtomicBool::new(false))).expect("scheduler call");
                let n = max_tokens.min(case.token_ids.len());
                expected.push((out, case.token_ids[..n].to_vec(), round));
            }
            // Let the first round get going so the second finds its prefixes cached.
            for _ in 0..4 {
                scheduler.step(&engine.executor(&cache), engine.tokenizer()).expect("scheduler call");
            }
        }
        // A pipeline keeps a step per stage in flight: between steps, all but the finished one.
        let depth = engine.executor(&cache).pipeline_depth();
        let mut most_in_flight = 0;
        while scheduler.has_work() {
            scheduler.step(&engine.executor(&cache), engine.tokenizer()).expect("scheduler call");
            most_in_flight = most_in_flight.max(scheduler.steps_in_flight());
        }
        assert_eq!(most_in_flight + 1, depth, "steps in flight at once, with {depth} pipeline stages");
        let stats = scheduler.stats();
        assert!(stats.preemptions > 0, "the test must exercise preemption: {stats:?}");
        assert!(stats.prefix_hit_tokens > 0, "the test must exercise prefix reuse: {stats:?}");
        // The model's time and the host's are both accounted, per finished step.
        assert!(stats.steps > 0 && stats.model_wait_us > 0 && stats.host_us > 0, "{stats:?}");
        assert_eq!(stats.kv_blocks_used, 0, "every block is free after the run: {stats:?}");
        assert_eq!((stats.running, stats.waiting), (0, 0));
        for (out, want, round) in expected {
            let out = out.lock().expect("scheduler call");
            assert_eq!(out.error, None);
            assert_eq!(out.tokens, want, "round {round}: {:?}", out.text);
            assert!(out.finish.is_some());
        }
    }

    /// Cancelled and disconnected requests stop at once and give their blocks back, while the
    /// others finish normally.
    #[test]
    fn cancellation_and_disconnects_free_blocks() {
        cancellation_and_disconnects_free_blocks_on(cpu_engine());
    }

    /// The same through 2 pipeline stages, a step per stage in flight: a request cancelled
    /// while its step runs gives its blocks back at once, and the step's result is dropped.
    #[test]
    fn cancellation_and_disconnects_free_blocks_with_steps_in_flight() {
        let engine = flint_e2e::cpu_pipeline_engine(1, 2);
        cancellation_and_disconnects_free_blocks_on(&engine);
    }

    fn cancellation_and_disconnects_free_blocks_on(engine: &flint_engine::Engine) {
        let config =
            SchedulerConfig { block_size: 16, n_blocks: 64, max_batch_tokens: 256, max_running: 8, max_waiting: 8 };
        let cache = engine.new_kv_cache(config.n_blocks, config.block_size).expect("cancellation test");
        let mut scheduler = Scheduler::new(config, engine.stop_ids()).expect("cancellation test");
        let long = |p: &str| GenerateRequest { ignore_eos: true, ..request_for("raw", p, 40) };

        let (kept, sink) = collector();
        scheduler
            .add(
                engine.prepare(&long("The weather today")).expect("cancellation test"),
                sink,
                Arc::new(AtomicBool::new(false)),
            )
            .expect("cancellation test");
        let cancel = Arc::new(AtomicBool::new(false));
        let (cancelled, sink) = collector();
        scheduler
            .add(engine.prepare(&long("A cancelled story")).expect("cancellation test"), sink, Arc::clone(&cancel))
            .expect("cancellation test");
        // A client that goes away after three tokens.
        let seen = Arc::new(Mutex::new(0usize));
        let seen_in_sink = Arc::clone(&seen);
        let sink = Box::new(move |event: StreamEvent| {
            let mut n = seen_in_sink.lock().expect("counter lock");
            if matches!(event, StreamEvent::Delta { .. }) {
                *n += 1;
            }
            *n < 3
        });
        scheduler
            .add(
                engine.prepare(&long("A client that leaves")).expect("cancellation test"),
                sink,
                Arc::new(AtomicBool::new(false)),
            )
            .expect("cancellation test");

        // Until the leaving client has its three tokens (a step per stage in flight gives each
        // request a token every few calls).
        while *seen.lock().expect("cancellation test") < 3 {
            scheduler.step(&engine.executor(&cache), engine.tokenizer()).expect("cancellation test");
        }
        assert!(scheduler.stats().kv_blocks_used > 0);
        cancel.store(true, Ordering::Relaxed);
        scheduler.step(&engine.executor(&cache), engine.tokenizer()).expect("cancellation test");
        assert_eq!(cancelled.lock().expect("cancellation test").finish, Some(FinishReason::Cancelled));
        assert_eq!(*seen.lock().expect("cancellation test"), 3, "the disconnected client got nothing after it left");
        assert_eq!(scheduler.stats().running, 1);
        engine.run_to_completion(&mut scheduler, &cache).expect("cancellation test");
        assert_eq!(kept.lock().expect("cancellation test").finish, Some(FinishReason::Length));
        assert_eq!(kept.lock().expect("cancellation test").tokens.len(), 40);
        assert_eq!(scheduler.stats().kv_blocks_used, 0);
    }

    #[test]
    fn logprobs_are_normalized_and_rank_the_greedy_token_first() {
        let engine = cpu_engine();
        let request = GenerateRequest { logprobs: Some(5), ..request_for("chat", "What is 2+2?", 6) };
        let generation = engine.generate(&request, &mut |_| {}).unwrap();
        assert_eq!(generation.logprobs.len(), generation.token_ids.len());
        for (lp, &token) in generation.logprobs.iter().zip(&generation.token_ids) {
            assert_eq!(lp.token_id, token);
            assert_eq!(lp.top.len(), 5);
            assert_eq!(lp.top[0].0, token, "greedy picks the most likely token");
            assert!(lp.logprob <= 0.0 && (lp.logprob - lp.top[0].1).abs() < 1e-6);
            assert!(lp.top.windows(2).all(|w| w[0].1 >= w[1].1));
            let mass: f32 = lp.top.iter().map(|(_, l)| l.exp()).sum();
            assert!(mass <= 1.0 + 1e-4);
        }
    }

    #[test]
    fn requests_that_cannot_fit_are_refused() {
        let engine = cpu_engine();
        let config =
            SchedulerConfig { block_size: 16, n_blocks: 2, max_batch_tokens: 64, max_running: 2, max_waiting: 1 };
        let mut scheduler = Scheduler::new(config, engine.stop_ids()).unwrap();
        let too_long = engine.prepare(&request_for("raw", &"word ".repeat(40), 4)).unwrap();
        let err = scheduler.add(too_long, collector().1, Arc::new(AtomicBool::new(false))).unwrap_err();
        assert!(err.to_string().contains("32"), "{err}");
        let too_many_tokens = engine.prepare(&request_for("raw", "hi", 100)).unwrap();
        let err = scheduler.add(too_many_tokens, collector().1, Arc::new(AtomicBool::new(false))).unwrap_err();
        assert!(err.to_string().contains("max_tokens"), "{err}");
        scheduler
            .add(engine.prepare(&request_for("raw", "hi", 4)).unwrap(), collector().1, Arc::new(AtomicBool::new(false)))
            .unwrap();
        let err = scheduler
            .add(engine.prepare(&request_for("raw", "hi", 4)).unwrap(), collector().1, Arc::new(AtomicBool::new(false)))
            .unwrap_err();
        assert!(matches!(err, flint_engine::Error::Overloaded(_)), "{err}");
    }
}

/// FP8 serving (per-channel weights, per-token activations, FP8 KV cache), emulated on the CPU,
/// stays close to the unquantized model on the committed text and prompts: a regression guard
/// on a short slice (the full table comes from `flint eval`).
#[test]
fn fp8_emulation_stays_close_to_the_reference() {
    use flint_engine::accuracy::{BackendScorer, compare};
    use flint_model::{Fp8Spec, Llama, ModelSource};
    let engine = cpu_engine();
    let (reference, backend) = engine.backend_model().expect("the CPU engine");
    let source = ModelSource::open(&flint_e2e::default_model_path()).expect("opens");
    let mut fp8 = Llama::load(&source, reference.config().clone(), backend, flint_tensor::DType::F32, &mut |_| {})
        .expect("loads");
    fp8.quantize_fp8(backend, Fp8Spec::SERVING).expect("quantizes");
    let root = flint_e2e::workspace_root();
    let text = std::fs::read_to_string(root.join("bench/data/alice.txt")).expect("text");
    let mut ids = engine.tokenizer().encode(&text, true).expect("encodes");
    ids.truncate(256);
    let prompts: Vec<Vec<u32>> = std::fs::read_to_string(root.join("bench/data/prompts.txt"))
        .expect("prompts")
        .lines()
        .take(6)
        .map(|l| engine.tokenizer().encode(&l.replace("\\n", "\n"), true).expect("encodes"))
        .collect();
    let r = BackendScorer { model: reference, backend, chunk: 256 };
    let q = BackendScorer { model: &fp8, backend, chunk: 256 };
    let c = compare(&r, &q, &ids, 256, &prompts, &mut |_, _| {}).expect("compares");
    eprintln!("{c:?}");
    assert!(c.ppl_change().abs() < 0.10, "perplexity {} vs {}", c.ppl, c.reference_ppl);
    assert!(c.top1_agreement > 0.8, "top-1 agreement {}", c.top1_agreement);
    assert!(c.mean_kl > 0.0 && c.mean_kl < 0.15, "mean KL {}", c.mean_kl);
}
