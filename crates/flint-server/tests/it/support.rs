//! Starting a server on an ephemeral loopback port, and clients for it.

use std::net::SocketAddr;
use std::time::Duration;

use flint_engine::SchedulerConfig;
use flint_proto::v1 as pb;
use flint_server::{ServeOptions, Server, Worker};
use pb::inference_client::InferenceClient;
use tokio::sync::oneshot;
use tonic::transport::Channel;

pub struct TestServer {
    pub addr: SocketAddr,
    pub worker: Worker,
    shutdown: Option<oneshot::Sender<()>>,
    pub task: tokio::task::JoinHandle<flint_server::Result<()>>,
}

pub fn scheduler(n_blocks: usize, max_running: usize) -> SchedulerConfig {
    SchedulerConfig { block_size: 16, n_blocks, max_batch_tokens: 256, max_running, max_waiting: 256 }
}

pub async fn start(config: SchedulerConfig, auth_token: Option<&str>) -> TestServer {
    start_with_tls(config, auth_token, None).await
}

pub async fn start_with_tls(
    config: SchedulerConfig,
    auth_token: Option<&str>,
    tls: Option<flint_server::TlsFiles>,
) -> TestServer {
    let engine = std::sync::Arc::clone(flint_e2e::shared_cpu_engine());
    let options = ServeOptions {
        model_name: "smollm2".to_string(),
        scheduler: config,
        metrics_addr: None,
        auth_token: auth_token.map(str::to_string),
        shutdown_grace: Duration::from_secs(60),
        tls,
    };
    let server = Server::new(engine, options).expect("server starts");
    let worker = server.worker();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
    let addr = listener.local_addr().expect("address");
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(server.run(listener, async move {
        let _ = rx.await;
    }));
    TestServer { addr, worker, shutdown: Some(tx), task }
}

impl TestServer {
    pub async fn channel(&self) -> Channel {
        for _ in 0..100 {
            if let Ok(ch) = Channel::from_shared(format!("http://{}", self.addr)).expect("uri").connect().await {
                return ch;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("server at {} did not accept connections", self.addr);
    }

    pub async fn client(&self) -> InferenceClient<Channel> {
        InferenceClient::new(self.channel().await)
    }

    /// Starts shutdown (as SIGTERM does).
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Waits until nothing runs or waits and every KV block is free.
    pub async fn wait_idle(&self) -> flint_engine::SchedulerStats {
        for _ in 0..3000 {
            let s = self.worker.stats();
            if s.running == 0 && s.waiting == 0 && s.kv_blocks_used == 0 {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("server never went idle: {:?}", self.worker.stats());
    }
}

/// A raw prompt request.
pub fn raw(prompt: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest { prompt: prompt.to_string(), max_tokens, ..Default::default() }
}

/// A chat request with one user message.
pub fn chat(content: &str, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        messages: vec![pb::ChatMessage { role: "user".into(), content: content.into() }],
        max_tokens,
        ..Default::default()
    }
}

/// Everything one Generate stream returned.
#[derive(Debug, Default)]
pub struct Collected {
    pub text: String,
    pub token_ids: Vec<u32>,
    pub finish_reason: i32,
    pub usage: Option<pb::Usage>,
    pub messages: usize,
}

pub async fn collect(
    client: &mut InferenceClient<Channel>,
    request: pb::GenerateRequest,
) -> Result<Collected, tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut out = Collected::default();
    while let Some(msg) = stream.message().await? {
        out.messages += 1;
        assert_eq!(out.finish_reason, 0, "a message after the last one");
        out.text.push_str(&msg.text);
        out.token_ids.extend(msg.token_ids);
        out.finish_reason = msg.finish_reason;
        if msg.usage.is_some() {
            out.usage = msg.usage;
        }
    }
    Ok(out)
}
