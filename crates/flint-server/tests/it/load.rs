//! Concurrency, cancellation, disconnects, deadlines and shutdown over real gRPC.

use std::time::Duration;

use flint_e2e::smollm2_reference;
use flint_proto::v1 as pb;

use crate::support::*;

/// 64 concurrent streams with mixed prompts and output lengths: every greedy stream equals the
/// same request run alone (the committed transformers reference, itself equal to a lone run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_concurrent_streams_match_lone_runs() {
    let server = start(scheduler(256, 64), None).await;
    let reference = smollm2_reference();
    let mut tasks = Vec::new();
    for i in 0..64 {
        let case = &reference.cases[i % reference.cases.len()];
        let max_tokens = 2 + (i % 7) as u32;
        let request = if case.kind == "raw" { raw(&case.prompt, max_tokens) } else { chat(&case.prompt, max_tokens) };
        let want: Vec<u32> = case.token_ids.iter().copied().take(max_tokens as usize).collect();
        let mut client = server.client().await;
        tasks.push(tokio::spawn(async move { (collect(&mut client, request).await, want) }));
    }
    for task in tasks {
        let (got, want) = task.await.expect("task");
        let got = got.expect("stream succeeds");
        assert_eq!(got.token_ids, want);
        assert_ne!(got.finish_reason, 0, "the last message carries the finish reason");
        assert_eq!(got.usage.map(|u| u.completion_tokens as usize), Some(want.len()));
    }
    let stats = server.wait_idle().await;
    assert_eq!(stats.kv_blocks_used, 0);
}

/// Clients that disconnect mid-stream, and deadlines, free their blocks; other streams go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellations_disconnects_and_deadlines_free_every_block() {
    let server = start(scheduler(128, 16), None).await;
    let long = |p: &str| pb::GenerateRequest { ignore_eos: true, ..raw(p, 400) };
    let mut streams = Vec::new();
    for i in 0..4 {
        let mut client = server.client().await;
        let mut stream = client.generate(long(&format!("Story number {i}:"))).await.expect("starts").into_inner();
        for _ in 0..2 {
            stream.message().await.expect("message").expect("not finished");
        }
        streams.push((client, stream));
    }
    assert!(server.worker.stats().kv_blocks_used > 0);
    // A deadline of 300 ms on a long request.
    let mut client = server.client().await;
    let mut request = tonic::Request::new(long("A story with a deadline:"));
    request.set_timeout(Duration::from_millis(300));
    let status = async {
        let mut stream = client.generate(request).await?.into_inner();
        while stream.message().await?.is_some() {}
        Ok::<_, tonic::Status>(())
    }
    .await
    .expect_err("the deadline ends the stream");
    // The server ends the stream with DEADLINE_EXCEEDED; on a loaded machine the client's own
    // timer (the same deadline) can fire first, which tonic reports as a cancelled timeout.
    let client_timeout = status.code() == tonic::Code::Cancelled && status.message().contains("Timeout expired");
    assert!(status.code() == tonic::Code::DeadlineExceeded || client_timeout, "{status}");
    // Disconnect everyone: drop streams and clients.
    drop(streams);
    let stats = server.wait_idle().await;
    assert_eq!(stats.kv_blocks_used, 0);
    // The server still serves.
    let mut client = server.client().await;
    let out = collect(&mut client, raw("The capital of France is", 3)).await.expect("serves after cancellations");
    assert_eq!(out.token_ids.len(), 3);
}

/// Shutdown with requests in flight: they finish whole, new ones are refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_finishes_running_requests() {
    let mut server = start(scheduler(128, 16), None).await;
    let mut tasks = Vec::new();
    for i in 0..3 {
        let mut client = server.client().await;
        let request = pb::GenerateRequest { ignore_eos: true, ..raw(&format!("Item {i} of the list is"), 12) };
        let mut stream = client.generate(request).await.expect("starts").into_inner();
        let first = stream.message().await.expect("message").expect("first token");
        tasks.push(tokio::spawn(async move {
            let mut n = first.token_ids.len();
            let mut last = first;
            while let Some(msg) = stream.message().await? {
                n += msg.token_ids.len();
                last = msg;
            }
            Ok::<_, tonic::Status>((n, last.finish_reason))
        }));
    }
    let mut late = server.client().await;
    server.begin_shutdown();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let refused = collect(&mut late, raw("too late", 2)).await.expect_err("no admission while draining");
    assert!(matches!(refused.code(), tonic::Code::Unavailable), "{refused}");
    for task in tasks {
        let (n, reason) = task.await.expect("task").expect("stream completes");
        assert_eq!(n, 12, "nothing is cut mid-way");
        assert_eq!(reason, pb::FinishReason::Length as i32);
    }
    server.task.await.expect("server task").expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokenize_model_info_health_and_reflection() {
    let server = start(scheduler(64, 8), None).await;
    let mut client = server.client().await;
    let reference = smollm2_reference();
    let tok = client
        .tokenize(pb::TokenizeRequest { text: reference.tokenizer[0].text.clone(), ..Default::default() })
        .await
        .expect("tokenize")
        .into_inner();
    assert_eq!(tok.token_ids, reference.tokenizer[0].ids);
    let chat_case = reference.cases.iter().find(|c| c.kind == "chat").expect("chat case");
    let tok = client
        .tokenize(pb::TokenizeRequest {
            messages: vec![pb::ChatMessage { role: "user".into(), content: chat_case.prompt.clone() }],
            ..Default::default()
        })
        .await
        .expect("tokenize chat")
        .into_inner();
    assert_eq!(tok.token_ids, chat_case.prompt_token_ids);
    assert_eq!(Some(&tok.rendered), chat_case.rendered.as_ref());

    let info = client.model_info(pb::ModelInfoRequest {}).await.expect("info").into_inner();
    assert_eq!((info.architecture.as_str(), info.vocab_size, info.context_length), ("llama", 49152, 8192));
    assert_eq!(info.kv_cache_tokens, 64 * 16);

    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "flint.v1.Inference".into() })
        .await
        .expect("health")
        .into_inner();
    assert_eq!(status.status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses =
        reflection.server_reflection_info(tokio_stream::iter(vec![request])).await.expect("reflection").into_inner();
    let response = responses.message().await.expect("reply").expect("one reply");
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection reply: {response:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.iter().any(|n| n == "flint.v1.Inference"), "{names:?}");
    assert!(names.iter().any(|n| n == "grpc.health.v1.Health"), "{names:?}");
}
