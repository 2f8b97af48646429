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

/// `ftpx connect` as ann, interactive on a pseudo-terminal: what is typed
/// goes to its terminal, and the screen is read back as a terminal shows it.
struct Interactive {
    writer: Box<dyn std::io::Write + Send>,
    screen: std::sync::Arc<std::sync::Mutex<vt100::Parser>>,
    child: Box<dyn portable_pty::Child + Send + Sync>,
    _master: Box<dyn portable_pty::MasterPty + Send>,
}

impl Interactive {
    /// Starts the shell in `dir`, with `home` as the home directory.
    fn start(s: &TestServer, dir: &Path, home: &Path) -> Interactive {
        let pty = native_pty_system()
            .openpty(PtySize {
                rows: 100,
                cols: COLS,
                pixel_width: 0,
                pixel_height: 0,
            })
            .unwrap();
        let mut cmd = CommandBuilder::new(BIN);
        cmd.cwd(dir);
        cmd.env("HOME", home);
        cmd.env("FTPX_STATE_DIR", dir.join("state"));
        cmd.env("FTPX_PASSWORD", PASSWORD);
        cmd.env("TERM", "xterm-256color");
        cmd.args([
            "connect",
            &format!("ann@127.0.0.1:{}", s.addr.port()),
            "--ca",
        ]);
        cmd.arg(&s.ca);
        let child = pty.slave.spawn_command(cmd).unwrap();
        drop(pty.slave);
        let size = |n| std::num::NonZeroU16::new(n).unwrap();
        let screen = std::sync::Arc::new(std::sync::Mutex::new(vt100::Parser::new(
            size(100),
            size(COLS),
            0,
        )));
        let mut reader = pty.master.try_clone_reader().unwrap();
        let parser = screen.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n @ 1..) = reader.read(&mut buf) {
                parser.lock().unwrap().process(&buf[..n]);
            }
        });
        Interactive {
            writer: pty.master.take_writer().unwrap(),
            screen,
            child,
            _master: pty.master,
        }
    }

    fn type_keys(&mut self, keys: &str) {
        self.writer.write_all(keys.as_bytes()).unwrap();
        self.writer.flush().unwrap();
    }

    /// Waits until `ok` holds of the screen's rows (trailing blanks
    /// trimmed) and the cursor's row; panics with the screen after 15 s.
    fn wait_until(&self, what: &str, ok: impl Fn(&[String], &str) -> bool) -> Vec<String> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let (rows, at) = {
                let parser = self.screen.lock().unwrap();
                let screen = parser.screen();
                let rows: Vec<String> = screen
                    .contents()
                    .lines()
                    .map(|l| l.trim_end().to_string())
                    .collect();
                let at = screen
                    .rows(0, COLS)
                    .nth(usize::from(screen.cursor_position().0))
                    .unwrap_or_default();
                (rows, at)
            };
            if ok(&rows, &at) {
                return rows;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "waited in vain for {what}; the screen:\n{}",
                shown(&rows)
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Waits for a fresh prompt `prompt` on the cursor's row, nothing typed.
    fn prompt(&self, prompt: &str) {
        self.wait_until(&format!("the prompt {prompt:?}"), |_, at| {
            at.trim_end() == prompt.trim_end()
        });
    }

    /// Waits until a row reads `row` exactly (trailing blanks trimmed).
    fn row(&self, row: &str) -> Vec<String> {
        self.wait_until(&format!("the row {row:?}"), |rows, _| {
            rows.iter().any(|r| r == row)
        })
    }
}

impl Drop for Interactive {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tab_completes_commands_and_local_and_remote_paths() {
    let s = TestServer::start().await;
    s.add_user("ann", 64 << 20);
    let home = s.home("ann");
    std::fs::write(home.join("report-2026.pdf"), b"pdf").unwrap();
    std::fs::create_dir(home.join("photos")).unwrap();
    std::fs::write(home.join("photos/cat.jpg"), b"jpg").unwrap();
    std::fs::write(home.join("my file.txt"), b"text").unwrap();
    std::fs::write(home.join("evil\x1b[2J.txt"), b"x").unwrap();
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("local-notes.txt"), b"notes").unwrap();
    let user_home = tempfile::tempdir().unwrap();
    std::fs::create_dir(user_home.path().join("deep")).unwrap();

    let mut sh = Interactive::start(&s, work.path(), user_home.path());
    sh.prompt("ftpx:/> ");
    // A command name.
    sh.type_keys("quo\t");
    sh.wait_until("quota completed", |_, at| at.trim_end() == "ftpx:/> quota");
    sh.type_keys("\r");
    sh.wait_until("the quota", |rows, _| {
        rows.iter().any(|r| r.starts_with("files "))
    });
    sh.prompt("ftpx:/> ");
    // A remote file, then the listing of it.
    sh.type_keys("ls rep\t\r");
    sh.row("ftpx:/> ls report-2026.pdf");
    sh.wait_until("the listing of report-2026.pdf", |rows, _| {
        rows.iter()
            .any(|r| r.starts_with("f ") && r.ends_with("  report-2026.pdf"))
    });
    sh.prompt("ftpx:/> ");
    // A name with a blank, quoted; a name with an escape is never offered.
    sh.type_keys("ls my\t\r");
    sh.row("ftpx:/> ls \"my file.txt\"");
    sh.prompt("ftpx:/> ");
    sh.type_keys("ls ev\t\r");
    sh.row("ftpx:/> ls ev");
    sh.prompt("ftpx:/> ");
    // A directory that is not there completes nothing; the session goes on.
    sh.type_keys("ls nowhere/x\t\r");
    sh.row("ftpx:/> ls nowhere/x");
    sh.prompt("ftpx:/> ");
    // A local file for put; then the remote listing, cached a moment ago,
    // has been dropped and holds the new file.
    sh.type_keys("put loc\t\r");
    sh.row("ftpx:/> put local-notes.txt");
    sh.wait_until("the upload", |rows, _| {
        rows.iter().any(|r| r.ends_with("  /local-notes.txt"))
    });
    sh.prompt("ftpx:/> ");
    sh.type_keys("ls local-n\t\r");
    sh.row("ftpx:/> ls local-notes.txt");
    sh.prompt("ftpx:/> ");
    // A local directory under ~.
    sh.type_keys("lcd ~/de\t\r");
    sh.row("ftpx:/> lcd ~/deep/");
    sh.prompt("ftpx:/> ");
    // Tab twice lists the choices, directories with their /.
    sh.type_keys("ls \t\t");
    sh.wait_until("the choices", |rows, _| {
        rows.iter()
            .any(|r| r.contains("photos/") && r.contains("report-2026.pdf"))
    });
    sh.type_keys("\r");
    sh.prompt("ftpx:/> ");
    // A remote directory ends in /.
    sh.type_keys("cd pho\t");
    sh.wait_until("photos/ completed", |_, at| {
        at.trim_end() == "ftpx:/> cd photos/"
    });
    sh.type_keys("\r");
    sh.prompt("ftpx:/photos> ");
    sh.type_keys("get c\t\r");
    sh.row("ftpx:/photos> get cat.jpg");
    sh.prompt("ftpx:/photos> ");
    assert_eq!(
        std::fs::read(user_home.path().join("deep/cat.jpg")).unwrap(),
        b"jpg"
    );
    assert_eq!(
        std::fs::read(home.join("local-notes.txt")).unwrap(),
        b"notes"
    );
    sh.type_keys("exit\r");
    assert_eq!(sh.child.wait().unwrap().exit_code(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn rm_r_asks_first_in_the_interactive_shell() {
    let s = TestServer::start().await;
    s.add_user("ann", 1 << 20);
    let home = s.home("ann");
    std::fs::create_dir_all(home.join("tree/sub")).unwrap();
    std::fs::write(home.join("tree/a"), b"a").unwrap();
    std::fs::write(home.join("tree/sub/b"), b"b").unwrap();
    let (work, user_home) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut sh = Interactive::start(&s, work.path(), user_home.path());
    sh.prompt("ftpx:/> ");
    // No: nothing goes.
    sh.type_keys("rm -r tree\r");
    sh.wait_until("the question", |_, at| {
        at.trim_end() == "remove /tree and all in it: 2 files, 1 directories? [y/N]"
    });
    sh.type_keys("n\r");
    sh.row("ftpx: not removed");
    sh.prompt("ftpx:/> ");
    assert!(home.join("tree/sub/b").exists());
    // Yes: all of it goes.
    sh.type_keys("rm -r tree\r");
    sh.wait_until("the question again", |_, at| {
        at.trim_end().ends_with("[y/N]")
    });
    sh.type_keys("y\r");
    sh.prompt("ftpx:/> ");
    assert!(!home.join("tree").exists());
    sh.type_keys("exit\r");
}
