//! Serving a [`Broker`] over gRPC on a listener, with health, reflection and
//! graceful shutdown.

use std::{future::Future, sync::Arc, time::Duration};

use ballast_proto::v1::{
    admin_server::AdminServer, consumer_server::ConsumerServer, publisher_server::PublisherServer,
};
use tokio::net::TcpListener;
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};

use crate::{Broker, grpc::Service, limits::GRPC_DECODE_SIZE_MAX};

/// Serves `broker` on `listener` until `shutdown` resolves, then drains:
/// new calls get UNAVAILABLE, consume streams end, in-flight publishes finish
/// (up to the configured shutdown timeout), and every log is synced.
pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let service = Service::new(Arc::clone(&broker));
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<AdminServer<Service>>().await;
    health.set_serving::<PublisherServer<Service>>().await;
    health.set_serving::<ConsumerServer<Service>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(ballast_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    // Small responses must not wait for Nagle's algorithm (40 ms with
    // delayed ACKs): every accepted connection gets TCP_NODELAY.
    let incoming = TcpListenerStream::new(listener).map(|stream| {
        if let Ok(stream) = &stream
            && let Err(e) = stream.set_nodelay(true)
        {
            tracing::warn!("cannot set TCP_NODELAY: {e}");
        }
        stream
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(AdminServer::new(service.clone()).max_decoding_message_size(GRPC_DECODE_SIZE_MAX))
        .add_service(PublisherServer::new(service.clone()).max_decoding_message_size(GRPC_DECODE_SIZE_MAX))
        .add_service(ConsumerServer::new(service).max_decoding_message_size(GRPC_DECODE_SIZE_MAX))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop_rx.await;
        });
    let mut server = tokio::spawn(server);

    tokio::select! {
        result = &mut server => {
            // The server ended without being asked to: report why.
            result??;
            anyhow::bail!("the gRPC server stopped unexpectedly");
        }
        () = shutdown => {}
    }
    tracing::info!("shutting down: refusing new work, draining in-flight calls");
    broker.begin_shutdown();
    health.set_not_serving::<AdminServer<Service>>().await;
    health.set_not_serving::<PublisherServer<Service>>().await;
    health.set_not_serving::<ConsumerServer<Service>>().await;
    let _ = stop_tx.send(());
    let timeout = Duration::from_millis(broker.config().shutdown_timeout_ms);
    match tokio::time::timeout(timeout, &mut server).await {
        Ok(result) => result??,
        Err(_) => {
            tracing::warn!(timeout_ms = timeout.as_millis(), "in-flight calls still running at the shutdown timeout");
            server.abort();
        }
    }
    broker.sync_all()?;
    tracing::info!("all queues synced; bye");
    Ok(())
}
