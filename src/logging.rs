//! Log files. The server writes one line per event to its log file (a
//! setting, `var/log/ftpx.log` by default), in one schema (see [`schema`]),
//! as text or JSON lines, and warnings also to standard error; it reopens
//! the file when told to (SIGHUP), for logrotate. The client writes to
//! `ftpx.log` in its state directory. Fields are written with their
//! escapes, so a hostile name can't forge a line.

pub mod schema;

use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::{Level, Metadata};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use schema::{Fields, LogFormat, Schema, Value};

/// Server logging: `file` at `level`, in `format`, at most
/// `max_lines_per_sec` lines a second (0: no cap), and warnings also to
/// standard error. Returns the log file, to reopen on SIGHUP.
pub fn init_server(
    file: &Path,
    level: &str,
    max_lines_per_sec: u32,
    format: LogFormat,
) -> Result<CappedFile, String> {
    // The database driver's debug lines carry statements' parameters, a
    // password hash among them: only its warnings reach the log.
    let filter = EnvFilter::try_new(format!(
        "{level},tokio_postgres=warn,deadpool_postgres=warn,deadpool=warn"
    ))
    .map_err(|e| format!("bad log_level {level:?}: {e}"))?;
    let writer = CappedFile::open(file, max_lines_per_sec, format)?;
    let file_layer = tracing_subscriber::fmt::layer()
        .event_format(Schema(format))
        .with_writer(writer.clone())
        .with_filter(filter);
    let stderr_layer = tracing_subscriber::fmt::layer()
        .event_format(Schema(LogFormat::Text))
        .with_writer(std::io::stderr)
        .with_filter(LevelFilter::WARN);
    let _ = tracing_subscriber::registry()
        .with(file_layer)
        .with(stderr_layer)
        .try_init();
    Ok(writer)
}

/// A log file that takes about `cap` lines of info and below a second (0: no
/// cap); warnings and errors (bans, failures of the server itself) always go
/// in. Lines past the cap are dropped and counted; the first line written
/// after them is preceded by one that says how many were dropped. A flood of
/// events (THREATS 90) then costs their formatting, not the disk.
///
/// Clones share the file: [`CappedFile::reopen`] on one moves them all to
/// the file now at the path.
#[derive(Clone)]
pub struct CappedFile {
    state: Arc<Mutex<Capped>>,
}

struct Capped {
    file: fs::File,
    path: PathBuf,
    format: LogFormat,
    cap: u32,
    window_end: Instant,
    in_window: u32,
    dropped: u64,
}

impl CappedFile {
    /// Opens (creating it and its directory) the log file at `path`.
    pub fn open(path: &Path, cap: u32, format: LogFormat) -> Result<CappedFile, String> {
        Ok(CappedFile {
            state: Arc::new(Mutex::new(Capped {
                file: open(path)?,
                path: path.to_path_buf(),
                format,
                cap,
                window_end: Instant::now(),
                in_window: 0,
                dropped: 0,
            })),
        })
    }

    /// Opens the file at the log's path again (creating it): after
    /// logrotate moved the old one away, the lines go to a new file.
    pub fn reopen(&self) -> Result<(), String> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.file = open(&s.path)?;
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for CappedFile {
    type Writer = CappedLine<'a>;

    fn make_writer(&'a self) -> CappedLine<'a> {
        CappedLine {
            file: self,
            capped: true,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> CappedLine<'a> {
        CappedLine {
            file: self,
            capped: *meta.level() > Level::WARN,
        }
    }
}

/// One event's line on its way to a [`CappedFile`] (the formatter writes
/// each event with one `write_all`).
pub struct CappedLine<'a> {
    file: &'a CappedFile,
    /// Whether the line counts against the cap (info and below).
    capped: bool,
}

impl io::Write for CappedLine<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.file.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        if now >= s.window_end {
            s.window_end = now + Duration::from_secs(1);
            s.in_window = 0;
        }
        if self.capped {
            if s.cap > 0 && s.in_window >= s.cap {
                s.dropped += 1;
                return Ok(buf.len());
            }
            s.in_window += 1;
        }
        if s.dropped > 0 {
            let fields = Fields {
                event: Some("log_dropped".into()),
                message: Some("log lines dropped".into()),
                rest: vec![
                    ("dropped", Value::U64(s.dropped)),
                    ("max_per_sec", Value::U64(s.cap.into())),
                ],
            };
            let line = schema::line(s.format, Level::WARN, fields);
            s.file.write_all(line.as_bytes())?;
            s.dropped = 0;
        }
        s.file.write_all(buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Client logging to its state directory; silently off if that can't be written.
pub fn init_client() {
    let path = crate::client::state_dir().join("ftpx.log");
    let Ok(writer) = RotatingFile::open(path, CLIENT_LOG_MAX) else {
        return;
    };
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(Mutex::new(writer))
        .try_init();
}

/// Bytes the client's log grows to before it is moved to `ftpx.log.1`
/// (replacing the one before): the client keeps at most twice this.
pub const CLIENT_LOG_MAX: u64 = 8 << 20;

/// A log file that, past `max` bytes, is renamed to `NAME.1` and begun
/// again, so that it never holds more than `max` bytes and one older file.
pub struct RotatingFile {
    path: PathBuf,
    file: fs::File,
    written: u64,
    max: u64,
}

impl RotatingFile {
    pub fn open(path: PathBuf, max: u64) -> Result<RotatingFile, String> {
        let file = open(&path)?;
        let written = file.metadata().map_or(0, |m| m.len());
        Ok(RotatingFile {
            path,
            file,
            written,
            max,
        })
    }

    fn rotate(&mut self) -> io::Result<()> {
        let mut older = self.path.clone().into_os_string();
        older.push(".1");
        fs::rename(&self.path, older)?;
        self.file = open(&self.path).map_err(io::Error::other)?;
        self.written = 0;
        Ok(())
    }
}

impl io::Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.written > 0 && self.written + buf.len() as u64 > self.max {
            // A log that can't be rotated goes on in the same file.
            let _ = self.rotate();
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

fn open(path: &Path) -> Result<fs::File, String> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("cannot open log file {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_client_log_is_rotated_at_its_size() {
        use std::io::Write as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ftpx.log");
        let mut log = RotatingFile::open(path.clone(), 100).unwrap();
        for i in 0..50 {
            writeln!(log, "line {i:02} of the client's log").unwrap();
        }
        let size = |p: &Path| fs::metadata(p).unwrap().len();
        assert!(size(&path) <= 100, "{}", size(&path));
        let older = dir.path().join("ftpx.log.1");
        assert!(size(&older) <= 100 && size(&older) > 0);
        let last = fs::read_to_string(&path).unwrap();
        assert!(last.ends_with("line 49 of the client's log\n"), "{last}");
        // Opened again, it counts what is already there.
        let mut again = RotatingFile::open(path.clone(), 100).unwrap();
        writeln!(again, "{}", "x".repeat(90)).unwrap();
        assert!(size(&path) <= 100);
    }

    #[test]
    fn lines_past_the_cap_are_counted_and_warnings_always_go_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ftpx.log");
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .event_format(Schema(LogFormat::Text))
            .with_writer(CappedFile::open(&path, 2, LogFormat::Text).unwrap())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            for i in 0..5 {
                tracing::info!(i, "event");
            }
            tracing::warn!("banned");
        });
        let log = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 4, "{log}");
        assert!(
            lines[0].contains("i=0") && lines[1].contains("i=1"),
            "{log}"
        );
        assert!(
            lines[2].contains("log lines dropped event=log_dropped dropped=3 max_per_sec=2"),
            "{log}"
        );
        assert!(
            lines[3].contains("WARN") && lines[3].contains("banned"),
            "{log}"
        );
    }
}
