//! The server log's one schema: every line is an event named from
//! [`EVENTS`], with a message and fields whose names mean the same thing,
//! with the same type, on every line they appear on. Written as text
//! (`TIME LEVEL MESSAGE event=NAME key=value...`, strings always quoted
//! and escaped) or as JSON lines (one object a line, fields at the top).

use std::fmt::{self, Write as _};

use serde::Deserialize;
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::{FormatTime, SystemTime};
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The events of the server log. A line logged without an `event` field
/// is written as `error` (warnings and errors) or `other` (below), so that
/// every line has one; the server itself always names it.
pub const EVENTS: &[&str] = &[
    "start",
    "shutdown",
    "connect",
    "disconnect",
    "login",
    "login_failed",
    "register",
    "account_changed",
    "command",
    "bad_request",
    "transfer",
    "ban",
    "unban",
    "throttle",
    "sweep",
    "kick",
    "log_dropped",
    "log_reopened",
    "cluster",
    "error",
    "other",
];

/// How the server log is written: `server.log_format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `TIME LEVEL MESSAGE event=NAME key=value...`, for people and grep.
    #[default]
    Text,
    /// One JSON object a line, for Loki, Elastic, Vector and the like.
    Json,
}

/// One field's value, typed as it was recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Str(String),
    U64(u64),
    I64(i64),
    F64(f64),
    Bool(bool),
}

/// The fields of one event, in the order they were given.
#[derive(Debug, Default)]
pub struct Fields {
    pub event: Option<String>,
    pub message: Option<String>,
    pub rest: Vec<(&'static str, Value)>,
}

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        match (field.name(), value) {
            ("event", Value::Str(s)) => self.event = Some(s),
            ("message", Value::Str(s)) => self.message = Some(s),
            // What the bridge from the `log` crate adds to the lines of
            // libraries (at debug level): only where they come from is kept.
            ("log.target", value) => self.rest.push(("target", value)),
            ("log.module_path" | "log.file" | "log.line", _) => {}
            (name, value) => self.rest.push((name, value)),
        }
    }
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::Str(value.to_string()));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::U64(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::I64(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, Value::F64(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::Str(value.to_string()));
    }
    /// `%x` and `?x` fields: kept as the string they print as.
    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.put(field, Value::Str(format!("{value:?}")));
    }
}

/// The formatter of the server log's lines (both the log file and the
/// warnings on standard error).
pub struct Schema(pub LogFormat);

impl<S, N> FormatEvent<S, N> for Schema
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        _ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let mut fields = Fields::default();
        event.record(&mut fields);
        writer.write_str(&line(self.0, *event.metadata().level(), fields))
    }
}

/// One whole line, newline included.
pub fn line(format: LogFormat, level: Level, fields: Fields) -> String {
    let mut time = String::new();
    let _ = SystemTime.format_time(&mut Writer::new(&mut time));
    let event = fields.event.unwrap_or_else(|| {
        let fallback = if level <= Level::WARN {
            "error"
        } else {
            "other"
        };
        fallback.to_string()
    });
    let message = fields.message.unwrap_or_else(|| event.clone());
    let mut out = String::with_capacity(160);
    match format {
        LogFormat::Text => {
            let _ = write!(out, "{time} {level:>5} {} event={event}", escaped(&message));
            for (name, value) in &fields.rest {
                let _ = write!(out, " {name}={}", text(value));
            }
        }
        LogFormat::Json => {
            let level = level.as_str().to_ascii_lowercase();
            out.push('{');
            for (name, value) in [("time", &time), ("level", &level), ("event", &event)]
                .into_iter()
                .chain([("message", &message)])
            {
                let _ = write!(out, "{}:{},", json_str(name), json_str(value));
            }
            for (name, value) in &fields.rest {
                let _ = write!(out, "{}:{},", json_str(name), json(value));
            }
            out.pop();
            out.push('}');
        }
    }
    out.push('\n');
    out
}

/// A message as it stands in a text line: control characters escaped, so
/// that nothing can start a line of its own.
fn escaped(message: &str) -> String {
    message.chars().flat_map(char::escape_default).collect()
}

fn text(value: &Value) -> String {
    match value {
        Value::Str(s) => format!("{s:?}"),
        Value::U64(n) => n.to_string(),
        Value::I64(n) => n.to_string(),
        Value::F64(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
    }
}

fn json(value: &Value) -> String {
    match value {
        Value::Str(s) => json_str(s),
        Value::U64(n) => n.to_string(),
        Value::I64(n) => n.to_string(),
        Value::F64(n) => serde_json::Value::from(*n).to_string(),
        Value::Bool(b) => b.to_string(),
    }
}

fn json_str(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(event: &str, rest: Vec<(&'static str, Value)>) -> Fields {
        Fields {
            event: Some(event.into()),
            message: Some("logged in".into()),
            rest,
        }
    }

    #[test]
    fn text_lines_quote_every_string_and_escape_it() {
        let rest = vec![
            ("user", Value::Str("ann".into())),
            ("path", Value::Str("/a \"b\"\nc".into())),
            ("bytes", Value::U64(12)),
        ];
        let line = line(LogFormat::Text, Level::INFO, fields("login", rest));
        assert!(
            line.ends_with(
                " INFO logged in event=login user=\"ann\" path=\"/a \\\"b\\\"\\nc\" bytes=12\n"
            ),
            "{line}"
        );
        assert_eq!(line.matches('\n').count(), 1);
    }

    #[test]
    fn json_lines_keep_the_types() {
        let rest = vec![
            ("user", Value::Str("ann".into())),
            ("bytes", Value::U64(12)),
            ("ok", Value::Bool(true)),
        ];
        let line = line(LogFormat::Json, Level::WARN, fields("ban", rest));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "ban");
        assert_eq!(v["level"], "warn");
        assert_eq!(v["message"], "logged in");
        assert_eq!(v["user"], "ann");
        assert_eq!(v["bytes"], 12);
        assert_eq!(v["ok"], true);
        assert!(v["time"].as_str().unwrap().contains('T'));
    }

    #[test]
    fn a_line_without_event_or_message_still_has_both() {
        let line = line(LogFormat::Json, Level::WARN, Fields::default());
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "error");
        assert_eq!(v["message"], "error");
        let line = super::line(LogFormat::Text, Level::INFO, Fields::default());
        assert!(line.contains(" other event=other"), "{line}");
    }
}
