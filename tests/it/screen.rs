//! What a person sees: `ftpx connect` run in a pseudo-terminal, its output
//! read back as a terminal would show it. Progress bars must leave nothing
//! behind but the result lines and the summary of each transfer.

use std::io::Read;
use std::path::Path;

use portable_pty::{CommandBuilder, PtySize, native_pty_system};

use crate::common::*;

/// Columns of the terminal: a common default.
const COLS: u16 = 80;
/// Rows: tall enough that nothing scrolls away, so the whole run can be read.
const ROWS: u16 = 1000;

/// Runs `ftpx connect -c COMMANDS` as ann in `dir` on a pseudo-terminal
/// (stdin, stdout and stderr all on it) and returns its exit status and
/// the screen at the end, one string per row, trailing blanks trimmed.
fn on_screen(s: &TestServer, dir: &Path, commands: &str) -> (u32, Vec<String>) {
    let pty = native_pty_system()
        .openpty(PtySize {
            rows: ROWS,
            cols: COLS,
            pixel_width: 0,
            pixel_height: 0,
        })
        .unwrap();
    let mut cmd = CommandBuilder::new(BIN);
    cmd.cwd(dir);
    cmd.env("FTPX_STATE_DIR", dir.join("state"));
    cmd.env("FTPX_PASSWORD", PASSWORD);
    cmd.env("TERM", "xterm-256color");
    cmd.args([
        "connect",
        &format!("ann@127.0.0.1:{}", s.addr.port()),
        "--ca",
    ]);
    cmd.arg(&s.ca);
    cmd.args(["-c", commands]);
    let mut child = pty.slave.spawn_command(cmd).unwrap();
    drop(pty.slave);
    let mut reader = pty.master.try_clone_reader().unwrap();
    let reading = std::thread::spawn(move || {
        let mut bytes = vec![];
        let mut buf = [0u8; 65536];
        // Linux answers EIO once the last process on the terminal has gone.
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            bytes.extend_from_slice(&buf[..n]);
        }
        bytes
    });
    let status = child.wait().unwrap().exit_code();
    drop(pty.master);
    let bytes = reading.join().unwrap();
    let size = |n| std::num::NonZeroU16::new(n).unwrap();
    let mut parser = vt100::Parser::new(size(ROWS), size(COLS), 0);
    parser.process(&bytes);
    let rows = parser
        .screen()
        .contents()
        .lines()
        .map(|l| l.trim_end().to_string())
        .collect();
    (status, rows)
}

/// The screen as text, for a failure message.
fn shown(rows: &[String]) -> String {
    rows.iter()
        .filter(|r| !r.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join("\n")
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tree_leaves_only_its_result_lines_and_a_summary_on_screen() {
    let s = TestServer::start().await;
    s.add_user("ann", 64 << 20);
    let n = 300;
    let tree = s.home("ann").join("tree");
    for i in 0..n {
        let dir = tree.join(format!("d{}", i % 3));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("f{i:03}")), data(100 + i, i as u8)).unwrap();
    }
    let work = tempfile::tempdir().unwrap();
    let (status, rows) = on_screen(&s, work.path(), "get -r tree");
    let screen = shown(&rows);
    assert_eq!(status, 0, "{screen}");
    // One hash line per file (on stdout, here the terminal).
    let hashes = rows.iter().filter(|r| r.contains("  tree/d")).count();
    assert_eq!(hashes, n, "{screen}");
    // No bar left behind: no stale overall bar, no file bar, no empty bar.
    for row in &rows {
        assert!(
            !row.contains('['),
            "a bar left on screen: {row:?}\n{screen}"
        );
        assert!(!row.starts_with("total"), "{row:?}\n{screen}");
        assert!(!row.contains("0 B/0 B"), "{row:?}\n{screen}");
    }
    // The summary: what stdout says, then bytes, time and rate on stderr.
    let sum = format!("{n} files received, 0 already complete");
    assert!(rows.contains(&sum), "{screen}");
    let summary: Vec<_> = rows
        .iter()
        .filter(|r| r.starts_with(&format!("{sum}: ")))
        .collect();
    assert_eq!(summary.len(), 1, "{screen}");
    assert!(
        summary[0].contains(" KiB in ") && summary[0].ends_with("/s"),
        "{screen}"
    );
    // Nothing else: hash lines, the two summary lines, blank rows.
    assert_eq!(
        rows.iter().filter(|r| !r.is_empty()).count(),
        n + 2,
        "{screen}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_single_put_leaves_its_hash_and_a_summary_on_screen() {
    let s = TestServer::start().await;
    s.add_user("ann", 64 << 20);
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("big"), data(24 << 20, 9)).unwrap();
    let (status, rows) = on_screen(&s, work.path(), "put big; get big again");
    let screen = shown(&rows);
    assert_eq!(status, 0, "{screen}");
    let lines: Vec<_> = rows.iter().filter(|r| !r.is_empty()).collect();
    assert_eq!(lines.len(), 4, "{screen}");
    assert!(lines[0].ends_with("  /big"), "{screen}");
    assert!(
        lines[1].starts_with("big: 24.0 MiB in ") && lines[1].ends_with("/s"),
        "{screen}"
    );
    assert!(lines[2].ends_with("  again"), "{screen}");
    assert!(lines[3].starts_with("big: 24.0 MiB in "), "{screen}");
}
