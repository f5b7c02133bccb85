//! Flint's gRPC serving shell.
//!
//! [`Server`] serves `flint.v1.Inference` (streaming generation, tokenization, model info) with
//! the standard `grpc.health.v1.Health` service and server reflection, over one [`Engine`] whose
//! scheduler runs on a dedicated thread ([`Worker`]). Requests are validated here (errors name
//! the field), prompts are tokenized off the async threads, every engine error becomes a
//! `tonic::Status` in exactly one `From` impl, a client that disconnects cancels its request,
//! `grpc-timeout` deadlines are honoured, and shutdown stops admitting, lets running requests
//! finish within a grace period, then cancels the rest.

mod error;
mod service;
mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use flint_engine::{Engine, SchedulerConfig, SchedulerStats};
use flint_proto::v1::inference_server::InferenceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Status};

pub use error::{Error, Result};
pub use service::{GenerateStream, MAX_PROMPT_BYTES, Service};
pub use worker::Worker;

/// How to serve.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Name reported by ModelInfo.
    pub model_name: String,
    pub scheduler: SchedulerConfig,
    /// Address of the Prometheus `/metrics` listener, if any.
    pub metrics_addr: Option<SocketAddr>,
    /// Require `authorization: Bearer <token>` on every call but health checks.
    pub auth_token: Option<String>,
    /// How long running requests may take to finish after shutdown starts.
    pub shutdown_grace: Duration,
    /// Serve TLS with this PEM certificate chain and private key.
    pub tls: Option<TlsFiles>,
}

/// A PEM certificate chain and its private key, as read from disk.
#[derive(Clone)]
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for TlsFiles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsFiles").field("cert_pem", &self.cert_pem.len()).field("key_pem", &"<redacted>").finish()
    }
}

/// A server ready to run: the engine worker has started.
#[derive(Debug)]
pub struct Server {
    engine: Arc<Engine>,
    worker: Worker,
    options: ServeOptions,
    draining: Arc<AtomicBool>,
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Server {
    /// Starts the engine worker with a KV cache of `options.scheduler.n_blocks` blocks.
    pub fn new(engine: Arc<Engine>, options: ServeOptions) -> Result<Self> {
        let worker = Worker::start(Arc::clone(&engine), options.scheduler.clone())?;
        Ok(Server { engine, worker, options, draining: Arc::new(AtomicBool::new(false)) })
    }

    /// The worker, for its statistics.
    pub fn worker(&self) -> Worker {
        self.worker.clone()
    }

    /// The scheduler's counts after its last step.
    pub fn stats(&self) -> SchedulerStats {
        self.worker.stats()
    }

    /// Serves on `listener` until `shutdown` completes, then drains and stops.
    pub async fn run(self, listener: TcpListener, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        if let Some(addr) = self.options.metrics_addr {
            metrics_exporter_prometheus::PrometheusBuilder::new()
                .with_http_listener(addr)
                .install()
                .map_err(|e| Error::Startup(format!("metrics listener on {addr}: {e}")))?;
            tracing::info!(%addr, "metrics on /metrics");
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<InferenceServer<Service>>().await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(flint_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .map_err(|e| Error::Startup(format!("reflection: {e}")))?;
        let reflection_alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(flint_proto::v1::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .map_err(|e| Error::Startup(format!("reflection: {e}")))?;

        let service = Service::new(
            Arc::clone(&self.engine),
            self.worker.clone(),
            Arc::clone(&self.draining),
            self.options.model_name.clone(),
            &self.options.scheduler,
        );
        let token = self.options.auth_token.clone();
        let auth = move |request: Request<()>| -> std::result::Result<Request<()>, Status> {
            let Some(token) = &token else { return Ok(request) };
            let given = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
            let expected = format!("Bearer {token}");
            if constant_time_eq(given.as_bytes(), expected.as_bytes()) {
                Ok(request)
            } else {
                Err(Error::Unauthenticated.into())
            }
        };
        let inference = tonic::service::interceptor::InterceptedService::new(
            InferenceServer::new(service).max_decoding_message_size(MAX_PROMPT_BYTES + (1 << 20)),
            auth,
        );

        let draining = Arc::clone(&self.draining);
        let worker = self.worker.clone();
        let grace = self.options.shutdown_grace;
        let signal = async move {
            shutdown.await;
            tracing::info!(grace_s = grace.as_secs_f64(), "shutting down: no new requests, finishing running ones");
            draining.store(true, Ordering::Relaxed);
            health.set_not_serving::<InferenceServer<Service>>().await;
            if !worker.drain(grace).await {
                tracing::warn!("grace period over: cancelled the requests still running");
            }
        };
        let local = listener.local_addr().map_err(|e| Error::Startup(e.to_string()))?;
        tracing::info!(addr = %local, "serving flint.v1.Inference");
        let mut builder = tonic::transport::Server::builder();
        if let Some(tls) = &self.options.tls {
            let identity = tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem);
            builder = builder
                .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
                .map_err(|e| Error::Startup(format!("TLS: {e}")))?;
        }
        let result = builder
            .add_service(health_service)
            .add_service(reflection)
            .add_service(reflection_alpha)
            .add_service(inference)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal)
            .await
            .map_err(|e| Error::Startup(format!("transport: {e}")));
        self.worker.stop();
        result
    }
}
