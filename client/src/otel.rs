//! OpenTelemetry trace context (feature `otel`, off by default).
//!
//! - Publish: [`Producer::submit`](crate::Producer::submit) (and so every
//!   publish) writes the current span's context into the message as the
//!   W3C headers `traceparent` and `tracestate`, unless the message already
//!   has a `traceparent` (set by hand, or carried over from a message it
//!   forwards): those headers are the application's and are never changed.
//!   Without a valid current span nothing is added. The broker carries the
//!   headers untouched through delay, redelivery, dead-lettering and
//!   redrive (`docs/api.md`, "Trace context").
//! - Delivery: the [`Consumer`](crate::Consumer) runs each handler inside a
//!   span of kind `Consumer` named `process <queue>`, from the global
//!   tracer provider's tracer `ballast-client`, **linked** to the context
//!   the message carries (a message is processed long after, and maybe
//!   many times after, its publish: a link, as the messaging conventions
//!   advise, rather than a child). The span is current while the handler's
//!   future runs, so spans the handler starts are its children; a handler
//!   error sets its status to error.
//!
//! Only the OpenTelemetry API is used: the application installs the SDK,
//! its exporter and `opentelemetry::global::set_tracer_provider`; without
//! them the spans are no-ops that cost next to nothing. The W3C format is
//! written and parsed here (version `00`), so no propagator needs to be
//! installed either.

use std::{borrow::Cow, collections::BTreeMap, future::Future, str::FromStr};

use opentelemetry::{
    Context, KeyValue,
    trace::{
        FutureExt as _, Link, SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId,
        TraceState, Tracer as _,
    },
};

use crate::Delivery;

/// The W3C trace context headers.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

/// The instrumentation scope of the consumer spans.
const TRACER_NAME: &str = "ballast-client";

/// Writes the current span's context into `headers` (see the module docs).
pub(crate) fn inject_current(headers: &mut BTreeMap<String, String>) {
    inject(&Context::current(), headers);
}

/// Writes `cx`'s span context into `headers` as `traceparent` and
/// `tracestate`, unless `headers` has a `traceparent` already or `cx` has
/// no valid span context. [`extract`] reads them back.
///
/// ```
/// use std::collections::BTreeMap;
/// use ballast_client::otel;
/// use opentelemetry::{Context, trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState}};
///
/// let span = SpanContext::new(
///     TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
///     SpanId::from_hex("00f067aa0ba902b7").unwrap(),
///     TraceFlags::SAMPLED,
///     true,
///     TraceState::default(),
/// );
/// let mut headers = BTreeMap::new();
/// otel::inject(&Context::new().with_remote_span_context(span.clone()), &mut headers);
/// assert_eq!(headers["traceparent"], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert_eq!(otel::extract(|name| headers.get(name).map(String::as_str)), Some(span));
/// ```
pub fn inject(cx: &Context, headers: &mut BTreeMap<String, String>) {
    if headers.contains_key(TRACEPARENT) {
        return;
    }
    let span = cx.span();
    let context = span.span_context();
    if !context.is_valid() {
        return;
    }
    let traceparent =
        format!("00-{:032x}-{:016x}-{:02x}", context.trace_id(), context.span_id(), context.trace_flags().to_u8());
    headers.insert(TRACEPARENT.to_owned(), traceparent);
    let state = context.trace_state().header();
    if !state.is_empty() {
        headers.insert(TRACESTATE.to_owned(), state);
    }
}

/// The remote span context a message's headers carry, if its
/// `traceparent` is a valid W3C version-00 header (`tracestate` is kept
/// when it parses, else dropped).
pub fn extract<'a>(mut header: impl FnMut(&str) -> Option<&'a str>) -> Option<SpanContext> {
    let traceparent = header(TRACEPARENT)?.trim();
    let mut parts = traceparent.split('-');
    let (version, trace_id, span_id, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex =
        |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    // Version 00 has exactly four fields; a later version may add more.
    if !hex(version, 2) || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    if !hex(trace_id, 32) || !hex(span_id, 16) || !hex(flags, 2) {
        return None;
    }
    let trace_id = TraceId::from_hex(trace_id).ok()?;
    let span_id = SpanId::from_hex(span_id).ok()?;
    let flags = TraceFlags::new(u8::from_str_radix(flags, 16).ok()?) & TraceFlags::SAMPLED;
    let state = header(TRACESTATE).and_then(|s| TraceState::from_str(s).ok()).unwrap_or_default();
    let context = SpanContext::new(trace_id, span_id, flags, true, state);
    context.is_valid().then_some(context)
}

/// A context whose current span is the consumer span of `delivery`, a
/// child of the current context and linked to the message's own.
pub(crate) fn consumer_context(queue: &str, delivery: &Delivery) -> Context {
    let tracer = opentelemetry::global::tracer(TRACER_NAME);
    let links = extract(|name| delivery.headers.get(name).map(String::as_str)).map(Link::with_context);
    let attributes = vec![
        KeyValue::new("messaging.system", "ballast"),
        KeyValue::new("messaging.operation.type", "process"),
        KeyValue::new("messaging.operation.name", "process"),
        KeyValue::new("messaging.destination.name", queue.to_owned()),
        KeyValue::new("messaging.message.id", format!("{}:{}", delivery.id.lane, delivery.id.offset)),
        KeyValue::new("messaging.ballast.attempt", i64::from(delivery.attempt)),
    ];
    let span = tracer
        .span_builder(Cow::Owned(format!("process {queue}")))
        .with_kind(SpanKind::Consumer)
        .with_attributes(attributes)
        .with_links(links.into_iter().collect())
        .start(&tracer);
    Context::current_with_span(span)
}

/// Runs a handler's future with `cx` current, then ends its span (status
/// error when the handler failed).
pub(crate) async fn in_span(cx: Context, handler: impl Future<Output = Result<(), String>>) -> Result<(), String> {
    let outcome = handler.with_context(cx.clone()).await;
    let span = cx.span();
    if let Err(reason) = &outcome {
        span.set_status(Status::error(reason.clone()));
    }
    span.end();
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn extract_from(headers: &BTreeMap<String, String>) -> Option<SpanContext> {
        extract(|name| headers.get(name).map(String::as_str))
    }

    /// A context written by `inject` reads back the same through
    /// `extract`: ids, sampled flag and trace state.
    #[test]
    fn inject_and_extract_round_trip() {
        let state = TraceState::from_str("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE").unwrap();
        let context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            state,
        );
        let mut written = BTreeMap::new();
        inject(&Context::new().with_remote_span_context(context.clone()), &mut written);
        assert_eq!(written[TRACEPARENT], "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(written[TRACESTATE], "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE");
        assert_eq!(extract_from(&written), Some(context));
    }

    /// A message's own `traceparent` is never replaced, and nothing is
    /// written without a valid current span.
    #[test]
    fn inject_leaves_existing_headers_and_empty_contexts_alone() {
        let mine = headers(&[(TRACEPARENT, "00-11111111111111111111111111111111-2222222222222222-00")]);
        let context = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let mut kept = mine.clone();
        inject(&Context::new().with_remote_span_context(context), &mut kept);
        assert_eq!(kept, mine);
        let mut empty = BTreeMap::new();
        inject(&Context::new(), &mut empty);
        assert!(empty.is_empty());
    }

    /// Malformed or invalid `traceparent` headers give no context.
    #[test]
    fn extract_refuses_bad_headers() {
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
        ] {
            assert_eq!(extract_from(&headers(&[(TRACEPARENT, bad)])), None, "{bad:?}");
        }
        let later = headers(&[(TRACEPARENT, "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-more")]);
        assert!(extract_from(&later).is_some(), "a later version may carry more fields");
    }
}
