//! Malformed and hostile requests: each gets its status code, and the server keeps serving.

use flint_proto::v1 as pb;
use tonic::Code;

use crate::support::*;

/// A GenerateRequest whose `prompt` field carries arbitrary bytes (invalid UTF-8).
#[derive(Clone, PartialEq, prost::Message)]
struct RawBytesRequest {
    #[prost(bytes = "vec", tag = "1")]
    prompt: Vec<u8>,
    #[prost(uint32, tag = "4")]
    max_tokens: u32,
}

async fn invalid_utf8(server: &TestServer) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(server.channel().await);
    grpc.ready().await.expect("ready");
    let codec = tonic_prost::ProstCodec::<RawBytesRequest, pb::GenerateResponse>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/flint.v1.Inference/Generate");
    let request = tonic::Request::new(RawBytesRequest { prompt: vec![b'h', 0xff, 0xfe, b'i'], max_tokens: 2 });
    match grpc.server_streaming(request, path, codec).await {
        Err(status) => status,
        Ok(response) => {
            let mut stream = response.into_inner();
            loop {
                match stream.message().await {
                    Err(status) => return status,
                    Ok(None) => panic!("invalid UTF-8 was accepted"),
                    Ok(Some(_)) => {}
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_request_gets_its_status_and_the_server_keeps_serving() {
    let server = start(scheduler(64, 8), None).await;
    let mut client = server.client().await;
    let sampling = |s: pb::SamplingParams| pb::GenerateRequest { sampling: Some(s), ..raw("hi", 2) };
    let cases: Vec<(&str, pb::GenerateRequest, Code, &str)> = vec![
        (
            "nothing set",
            pb::GenerateRequest { max_tokens: 2, ..Default::default() },
            Code::InvalidArgument,
            "exactly one",
        ),
        ("empty prompt", raw("", 2), Code::InvalidArgument, "exactly one"),
        (
            "two inputs",
            pb::GenerateRequest { prompt_token_ids: vec![1, 2], ..raw("hi", 2) },
            Code::InvalidArgument,
            "exactly one",
        ),
        ("max_tokens 0", raw("hi", 0), Code::InvalidArgument, "max_tokens"),
        ("max_tokens huge", raw("hi", u32::MAX), Code::OutOfRange, "8192"),
        (
            "negative temperature",
            sampling(pb::SamplingParams { temperature: -1.0, ..Default::default() }),
            Code::InvalidArgument,
            "temperature",
        ),
        (
            "top_p above 1",
            sampling(pb::SamplingParams { top_p: Some(1.5), ..Default::default() }),
            Code::InvalidArgument,
            "top_p",
        ),
        (
            "NaN min_p",
            sampling(pb::SamplingParams { min_p: f32::NAN, ..Default::default() }),
            Code::InvalidArgument,
            "min_p",
        ),
        (
            "token out of vocabulary",
            pb::GenerateRequest { prompt_token_ids: vec![1, 49152], max_tokens: 2, ..Default::default() },
            Code::InvalidArgument,
            "49152",
        ),
        ("1 MB prompt", raw(&"lorem ipsum ".repeat(90_000), 2), Code::OutOfRange, "8192"),
        (
            "empty role",
            pb::GenerateRequest {
                messages: vec![pb::ChatMessage { role: String::new(), content: "hi".into() }],
                max_tokens: 2,
                ..Default::default()
            },
            Code::InvalidArgument,
            "role",
        ),
        (
            "too many logprobs",
            pb::GenerateRequest { top_logprobs: 1000, ..raw("hi", 2) },
            Code::InvalidArgument,
            "top_logprobs",
        ),
        (
            "empty stop string",
            pb::GenerateRequest { stop: vec![String::new()], ..raw("hi", 2) },
            Code::InvalidArgument,
            "stop",
        ),
    ];
    for (name, request, code, needle) in cases {
        let status = collect(&mut client, request).await.expect_err(name);
        assert_eq!(status.code(), code, "{name}: {status}");
        assert!(status.message().contains(needle), "{name}: {:?} lacks {needle:?}", status.message());
    }
    let status = invalid_utf8(&server).await;
    assert_eq!(status.code(), Code::InvalidArgument, "invalid UTF-8: {status}");

    let out = collect(&mut client, raw("The capital of France is", 3)).await.expect("still serving");
    assert_eq!(out.token_ids.len(), 3);
    assert_eq!(server.wait_idle().await.kv_blocks_used, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_and_stop_strings_over_grpc() {
    let server = start(scheduler(64, 8), None).await;
    let mut client = server.client().await;
    let request = pb::GenerateRequest { top_logprobs: 3, ..chat("What is the capital of France?", 4) };
    let mut stream = client.generate(request).await.expect("starts").into_inner();
    let mut seen = 0;
    while let Some(msg) = stream.message().await.expect("message") {
        assert_eq!(msg.logprobs.len(), msg.token_ids.len());
        for (lp, id) in msg.logprobs.iter().zip(&msg.token_ids) {
            assert_eq!(lp.token_id, *id);
            assert_eq!(lp.top.len(), 3);
            assert_eq!(lp.top[0].token_id, *id);
        }
        seen += msg.token_ids.len();
    }
    assert_eq!(seen, 4);
    let out = collect(
        &mut client,
        pb::GenerateRequest { stop: vec!["France".into()], ..chat("What is the capital of France?", 16) },
    )
    .await
    .expect("stop string");
    assert_eq!(out.text, "The capital of ");
    assert_eq!(out.finish_reason, pb::FinishReason::Stop as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_token_is_required_when_configured() {
    let server = start(scheduler(32, 4), Some("s3cret")).await;
    let mut client = server.client().await;
    let status = collect(&mut client, raw("hi", 1)).await.expect_err("no token");
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut request = tonic::Request::new(raw("hi", 1));
    request.metadata_mut().insert("authorization", "Bearer wrong".parse().expect("ascii"));
    assert_eq!(client.generate(request).await.expect_err("wrong token").code(), Code::Unauthenticated);
    let mut request = tonic::Request::new(raw("hi", 1));
    request.metadata_mut().insert("authorization", "Bearer s3cret".parse().expect("ascii"));
    let mut stream = client.generate(request).await.expect("right token").into_inner();
    while stream.message().await.expect("message").is_some() {}
    // Health checks need no token.
    let mut health = tonic_health::pb::health_client::HealthClient::new(server.channel().await);
    health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.expect("health without token");
}

/// With one request running and one waiting, a third is refused as overload, not queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_is_resource_exhausted() {
    let server = start(
        flint_engine::SchedulerConfig {
            block_size: 16,
            n_blocks: 64,
            max_batch_tokens: 64,
            max_running: 1,
            max_waiting: 1,
        },
        None,
    )
    .await;
    let long = || pb::GenerateRequest { ignore_eos: true, ..raw("Counting slowly:", 200) };
    let mut first = server.client().await;
    let mut running = first.generate(long()).await.expect("first runs").into_inner();
    running.message().await.expect("message").expect("a token");
    let mut second = server.client().await;
    let _waiting = second.generate(long()).await.expect("second waits").into_inner();
    let mut third = server.client().await;
    let status = collect(&mut third, long()).await.expect_err("third is refused");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status}");
}

/// With a certificate the server speaks TLS: a client trusting that certificate is served, a
/// plaintext client is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_clients_that_trust_the_certificate() {
    use tonic::transport::{Certificate, Channel, ClientTlsConfig};

    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("self-signed certificate");
    let cert_pem = key.cert.pem();
    let tls = flint_server::TlsFiles {
        cert_pem: cert_pem.clone().into_bytes(),
        key_pem: key.signing_key.serialize_pem().into_bytes(),
    };
    let server = start_with_tls(scheduler(32, 4), None, Some(tls)).await;
    let tls_config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(cert_pem)).domain_name("localhost");
    let channel = Channel::from_shared(format!("https://{}", server.addr))
        .expect("uri")
        .tls_config(tls_config)
        .expect("client TLS")
        .connect()
        .await
        .expect("TLS connection");
    let mut client = pb::inference_client::InferenceClient::new(channel);
    let out = collect(&mut client, raw("The capital of France is", 2)).await.expect("served over TLS");
    assert_eq!(out.token_ids.len(), 2);

    let plain = Channel::from_shared(format!("http://{}", server.addr)).expect("uri").connect().await;
    if let Ok(plain) = plain {
        let mut client = pb::inference_client::InferenceClient::new(plain);
        assert!(collect(&mut client, raw("hi", 1)).await.is_err(), "plaintext must not be served");
    }
}
