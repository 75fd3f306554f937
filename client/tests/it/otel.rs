//! The `otel` feature against the real broker: a publish carries the
//! current span's context, and each delivery's handler runs in a consumer
//! span linked to it. Spans are recorded by a small tracer provider of the
//! test's own (the OpenTelemetry API only, no SDK). See: #15 item 6.

use std::{
    borrow::Cow,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

use ballast_client::{ConsumerConfig, Delivery, Message, ProducerConfig, QueueSettings};
use opentelemetry::{
    Context, InstrumentationScope, KeyValue,
    trace::{
        FutureExt as _, SpanBuilder, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
        TraceState,
    },
};

use crate::support::Broker;

/// A span as the recording tracer saw it built and ended.
#[derive(Debug, Clone)]
struct Recorded {
    name: String,
    kind: Option<SpanKind>,
    context: SpanContext,
    parent: SpanContext,
    links: Vec<SpanContext>,
    attributes: Vec<KeyValue>,
    status: Option<Status>,
    ended: bool,
}

type Spans = Arc<Mutex<Vec<Recorded>>>;

#[derive(Debug, Clone)]
struct RecordingProvider(Spans);

#[derive(Debug, Clone)]
struct RecordingTracer(Spans);

#[derive(Debug)]
struct RecordingSpan {
    spans: Spans,
    index: usize,
    context: SpanContext,
}

impl opentelemetry::trace::TracerProvider for RecordingProvider {
    type Tracer = RecordingTracer;

    fn tracer_with_scope(&self, _scope: InstrumentationScope) -> RecordingTracer {
        RecordingTracer(Arc::clone(&self.0))
    }
}

/// Span ids, unique in the test binary.
static NEXT_SPAN: AtomicU64 = AtomicU64::new(1);

impl opentelemetry::trace::Tracer for RecordingTracer {
    type Span = RecordingSpan;

    fn build_with_context(&self, builder: SpanBuilder, parent_cx: &Context) -> RecordingSpan {
        let parent = parent_cx.span().span_context().clone();
        let trace_id = if parent.is_valid() { parent.trace_id() } else { TraceId::from(0xabcd_u128) };
        let span_id = SpanId::from(NEXT_SPAN.fetch_add(1, Ordering::Relaxed));
        let context = SpanContext::new(trace_id, span_id, TraceFlags::SAMPLED, false, TraceState::default());
        let mut spans = self.0.lock().expect("not poisoned");
        spans.push(Recorded {
            name: builder.name.into_owned(),
            kind: builder.span_kind,
            context: context.clone(),
            parent,
            links: builder.links.unwrap_or_default().into_iter().map(|l| l.span_context).collect(),
            attributes: builder.attributes.unwrap_or_default(),
            status: None,
            ended: false,
        });
        RecordingSpan { spans: Arc::clone(&self.0), index: spans.len() - 1, context }
    }
}

impl opentelemetry::trace::Span for RecordingSpan {
    fn add_event_with_timestamp<T>(&mut self, _name: T, _timestamp: SystemTime, _attributes: Vec<KeyValue>)
    where
        T: Into<Cow<'static, str>>,
    {
    }

    fn span_context(&self) -> &SpanContext {
        &self.context
    }

    fn is_recording(&self) -> bool {
        true
    }

    fn set_attribute(&mut self, attribute: KeyValue) {
        self.spans.lock().expect("not poisoned")[self.index].attributes.push(attribute);
    }

    fn set_status(&mut self, status: Status) {
        self.spans.lock().expect("not poisoned")[self.index].status = Some(status);
    }

    fn update_name<T>(&mut self, name: T)
    where
        T: Into<Cow<'static, str>>,
    {
        self.spans.lock().expect("not poisoned")[self.index].name = name.into().into_owned();
    }

    fn add_link(&mut self, span_context: SpanContext, _attributes: Vec<KeyValue>) {
        self.spans.lock().expect("not poisoned")[self.index].links.push(span_context);
    }

    fn end_with_timestamp(&mut self, _timestamp: SystemTime) {
        self.spans.lock().expect("not poisoned")[self.index].ended = true;
    }
}

/// Under `otel`: a publish made with a span current carries it as
/// `traceparent`/`tracestate`; a message with its own `traceparent` keeps
/// it; the consumer runs each handler in a `process <queue>` span of kind
/// Consumer, linked to the message's context (not its child), current in
/// the handler, ended after it, with an error status when it failed.
#[tokio::test]
async fn publish_injects_and_the_consumer_links_its_span() {
    let spans: Spans = Arc::default();
    opentelemetry::global::set_tracer_provider(RecordingProvider(Arc::clone(&spans)));
    let broker = Broker::start();
    let client = broker.client();
    let mut settings = QueueSettings::default();
    settings.max_attempts = Some(1);
    client.admin().create_queue("traced", settings).await.expect("create");

    let producer_span = SpanContext::new(
        TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        TraceFlags::SAMPLED,
        true,
        "rojo=00f067aa0ba902b7".parse::<TraceState>().unwrap(),
    );
    let producer = client.producer(ProducerConfig { linger: Duration::ZERO, ..ProducerConfig::default() }).unwrap();
    let cx = Context::new().with_remote_span_context(producer_span.clone());
    producer.publish("traced", Message::new("ok")).with_context(cx.clone()).await.expect("publish");
    let own = "00-11111111111111111111111111111111-2222222222222222-00";
    let mine = Message::new("fails").with_header("traceparent", own);
    producer.publish("traced", mine).with_context(cx).await.expect("publish");
    producer.publish("traced", Message::new("untraced")).await.expect("publish");
    producer.close().await;

    let seen: Arc<Mutex<Vec<(Delivery, SpanContext)>>> = Arc::default();
    let seen_in = Arc::clone(&seen);
    let config = ConsumerConfig { concurrency: 1, max_messages: Some(3), ..ConsumerConfig::default() };
    let stats = client
        .consumer("traced", config)
        .unwrap()
        .spawn(move |delivery: Delivery| {
            let seen = Arc::clone(&seen_in);
            async move {
                let current = Context::current().span().span_context().clone();
                let fails = delivery.payload.as_ref() == b"fails";
                seen.lock().unwrap().push((delivery, current));
                if fails { Err("the handler failed") } else { Ok(()) }
            }
        })
        .join()
        .await
        .expect("consumes 3");
    assert_eq!((stats.acked, stats.nacked), (2, 1));

    let seen = seen.lock().unwrap().clone();
    let recorded = spans.lock().unwrap().clone();
    assert_eq!(recorded.len(), 3, "one span per delivery: {recorded:?}");
    for (delivery, current) in &seen {
        let payload = std::str::from_utf8(&delivery.payload).unwrap();
        let span = recorded.iter().find(|s| &s.context == current).unwrap_or_else(|| panic!("{payload}: no span"));
        assert_eq!(span.name, "process traced");
        assert_eq!(span.kind, Some(SpanKind::Consumer));
        assert!(span.ended, "{payload}");
        assert!(!span.parent.is_valid(), "{payload}: linked, not a child of the producer");
        assert!(span.attributes.contains(&KeyValue::new("messaging.destination.name", "traced")));
        let traceparent = delivery.headers.get("traceparent").map(String::as_str);
        match payload {
            "ok" => {
                assert_eq!(traceparent, Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"));
                assert_eq!(delivery.headers.get("tracestate").map(String::as_str), Some("rojo=00f067aa0ba902b7"));
                assert_eq!(span.links, vec![producer_span.clone()]);
                assert_eq!(span.status, None);
            }
            "fails" => {
                assert_eq!(traceparent, Some(own), "the message's own header is kept");
                assert_eq!(span.links.len(), 1);
                assert_eq!(format!("{:032x}", span.links[0].trace_id()), "11111111111111111111111111111111");
                assert_eq!(span.status, Some(Status::error("the handler failed")));
            }
            _ => {
                assert_eq!(traceparent, None, "no current span, nothing injected");
                assert!(span.links.is_empty());
            }
        }
    }
}
