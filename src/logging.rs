//! Log files. The server writes one line per event to its log file (a
//! setting, `var/log/ftpx.log` by default) and warnings also to standard
//! error; the client writes to `ftpx.log` in its state directory. Fields are
//! written with their escapes, so a hostile name can't forge a line.

use std::fs::{self, OpenOptions};
use std::path::Path;
use std::sync::Mutex;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Server logging: `file` at `level`, and warnings to standard error.
pub fn init_server(file: &Path, level: &str) -> Result<(), String> {
    let filter = EnvFilter::try_new(level).map_err(|e| format!("bad log_level {level:?}: {e}"))?;
    let writer = open(file)?;
    let file_layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_target(false)
        .with_writer(Mutex::new(writer))
        .with_filter(filter);
    let stderr_layer = tracing_subscriber::fmt::layer()
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_filter(LevelFilter::WARN);
    let _ = tracing_subscriber::registry()
        .with(file_layer)
        .with(stderr_layer)
        .try_init();
    Ok(())
}

/// Client logging to its state directory; silently off if that can't be written.
pub fn init_client() {
    let path = crate::client::state_dir().join("ftpx.log");
    let Ok(writer) = open(&path) else { return };
    let _ = tracing_subscriber::fmt()
        .with_ansi(false)
        .with_target(false)
        .with_max_level(tracing::Level::INFO)
        .with_writer(Mutex::new(writer))
        .try_init();
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
