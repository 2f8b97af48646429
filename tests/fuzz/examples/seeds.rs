//! Writes the seed corpus of every fuzz target into `tests/fuzz/corpus/`:
//! valid requests, replies, frame headers, paths, journals, password hashes
//! and whole sessions (uploads with correct chunk hashes, a resumed upload,
//! downloads, jail escapes), plus a few near misses. Run it again after a
//! protocol change:
//!
//!   cargo run --manifest-path tests/fuzz/Cargo.toml --example seeds
//!
//! Files are named by content, so running it twice changes nothing.

use std::path::{Path, PathBuf};

use ftpx::transfer::journal::{Journal, VERSION};
use ftpx::protocol::{FrameHeader, FrameKind, hex};
use ftpx::transfer::{Tree, chunk_hash};
use ftpx::store::users::{Password, verify_password};
use ftpx_fuzz::{CHUNK, DATA_LEN, RESUME_HELD, RESUME_LEN, RESUME_TARGET, pattern};

fn main() {
    let corpus = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let h = |b: &[u8]| hex(&blake3::hash(b));
    let (h1, h2) = (h(b"a"), h(b"b"));

    let requests: Vec<String> = [
        "LOGIN alice \"correct horse\"",
        "login bob 'pass word'",
        "REGISTER carol \"a \\\"quoted\\\" \\\\ secret\"",
        "PWD",
        "CWD",
        "CWD \"/a b\"",
        "cwd ../..",
        "LIST",
        "LIST\tdir",
        "STAT hello.txt",
        "HASH data.bin",
        "MKD new",
        "RMD new",
        "DELE \"a;b\"",
        "RENAME a \"b c\"",
        "QUOTA",
        "PUT x.bin 10",
        "PUT \"my file\" 3000 1024",
        "NOOP",
        "HELP",
        "QUIT",
        "GET f",
        "PUT x 99999999999999999999999",
        "LIST a b c d e f g h i j",
        "STAT üñí/cødé/文件",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        format!("GET f 1024 {h1}"),
        format!("GET \"a b\" 2048 {h1} 1024 {h2}"),
        format!("GET f 1 {h1} 2 {h2} 3 {h1}"),
    ])
    .collect();
    write_all(
        &corpus,
        "request_line",
        requests.iter().map(|s| s.as_bytes().to_vec()),
    );

    let chunk = FrameHeader {
        kind: FrameKind::Chunk,
        offset: 1024,
        len: 1024,
        hash: chunk_hash(4096, 1024, &pattern(1024)),
    };
    let mut bad_kind = FrameHeader::start(0).encode();
    bad_kind[0] = b'Z';
    let mut big = chunk.encode();
    big[9..13].copy_from_slice(&u32::MAX.to_be_bytes());
    write_all(
        &corpus,
        "frame_header",
        [
            FrameHeader::start(0).encode(),
            FrameHeader::start(2048).encode(),
            chunk.encode(),
            FrameHeader::end(3000, blake3::hash(&pattern(3000))).encode(),
            FrameHeader::abort().encode(),
            bad_kind,
            big,
        ]
        .iter()
        .map(|b| b.to_vec()),
    );

    let replies = [
        "220 ftpx 0.1.0 ready".to_string(),
        "230 logged in".into(),
        "213-f 13 1700000000 hello.txt".into(),
        "213-d 0 1700000000 \"a b\"".into(),
        "213 2 entries (truncated)".into(),
        format!("150 ready 2048 {h1} 1024 {h2}"),
        "151 3000 0 1024".into(),
        format!("226 {h1} 3000"),
        "257 \"/a b\"".into(),
        "421 idle timeout, closing".into(),
        "200".into(),
        "099 no".into(),
    ];
    write_all(
        &corpus,
        "reply_line",
        replies.iter().map(|s| s.as_bytes().to_vec()),
    );

    let paths = [
        "/",
        ".",
        "..",
        "../../etc/passwd",
        "a/./b/../c",
        "/x//y/./z/",
        "dir/inner.txt",
        "%2e%2e/%2e%2e",
        "．．／x",
        "‥/x",
        "..%2f",
        "a\\b",
        "a\u{1b}[2J",
        "ok.txt\0.jpg",
        &"n".repeat(255),
        &"a/".repeat(40),
    ];
    write_all(
        &corpus,
        "vpath",
        paths.iter().map(|s| s.as_bytes().to_vec()),
    );

    let record = |kind: &str, source: &str, target: &str, size: u64, verified: u64| {
        format!(
            "version = {VERSION}\nkind = {kind:?}\nsource = {source:?}\ntarget = {target:?}\n\
             size = {size}\nmtime = 1700000000\ninode = 42\nchunk = 1024\n\
             verified = {verified}\nupdated = 1700000100\n"
        )
    };
    let upload = record("upload", "", "/resume.bin", 4096, 2048);
    let download = record("download", "/a b/ü.bin", "/home/x/ü.bin", 1 << 40, 0);
    for text in [&upload, &download] {
        Journal::parse(text.as_bytes()).expect("a valid journal");
    }
    write_all(
        &corpus,
        "journal",
        [
            upload.clone(),
            download,
            upload.replace("version = 1", "version = 2"),
            format!("{upload}extra = 1\n"),
            upload.replace("2048", "\"x\""),
            "version = 1\n".into(),
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec()),
    );

    // Fixed strings (hash_password salts at random), checked here.
    let real =
        "$scrypt$ln=4,r=1,p=1$J3yGixqrWWEgmYsIW2+GSg$4NhRdB7xUycK9NiPsRTkAk/VuM9LCKr6AAihOOZhEGY";
    let other =
        "$scrypt$ln=12,r=8,p=1$IzbRJ7nsyGCVDivdzxq1sw$Hrp1v9wo1H9VmBRy44KzUW/k4otMduvcLuIvQA6i/yA";
    let password = Password::new("correct horse");
    assert_eq!(verify_password(&password, real, 12), Ok(true));
    assert_eq!(verify_password(&password, other, 12), Ok(false));
    let salt = "c2FsdHNhbHRzYWx0";
    let digest = "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA";
    write_all(
        &corpus,
        "phc",
        [
            real.to_string(),
            other.to_string(),
            format!("$scrypt$ln=40,r=8,p=1${salt}${digest}"),
            format!("$scrypt$ln=12,r=32,p=16${salt}${digest}"),
            format!("$scrypt$ln=12,r=33,p=1${salt}${digest}"),
            format!("$scrypt$ln=10,r=1048576,p=1${salt}${digest}"),
            format!("$argon2id$v=19$m=65536,t=3,p=4${salt}${digest}"),
            format!("$scrypt$ln=10,r=8,p=1${salt}"),
            format!("$scrypt$ln=10,r=8,p=1${salt}$AAAA"),
            real[..real.len() - 5].to_string(),
            "plain".into(),
        ]
        .iter()
        .map(|s| s.as_bytes().to_vec()),
    );

    write_all(&corpus, "session", sessions());
}

/// Inputs for the `session` target: what follows its `LOGIN`.
fn sessions() -> Vec<Vec<u8>> {
    let data = pattern(DATA_LEN);
    let resume = pattern(RESUME_LEN);
    let new = pattern(2500);
    let mut out = vec![
        b"".to_vec(),
        b"PWD\nLIST\nLIST dir\nSTAT hello.txt\nSTAT escape\nHASH data.bin\nQUOTA\nNOOP\nHELP\n"
            .to_vec(),
        b"GET data.bin\nGET hello.txt\nGET empty\nGET dir\n".to_vec(),
        b"MKD a\nCWD a\nMKD \"b c\"\nPWD\nCWD ..\nRENAME hello.txt a\nRENAME a/hello.txt \"a/b c\"\nLIST a/b\\ c\nDELE \"a/b c/hello.txt\"\nRMD \"a/b c\"\nRMD a\nDELE data.bin\nQUOTA\n".to_vec(),
        // Every way out of the jail through the planted links and dot-dots.
        b"GET leak.txt\nGET escape/canary.txt\nLIST escape\nCWD up\nLIST ../other\nSTAT ../../canary.txt\nGET neighbour/secret.txt\nMKD up/x\nRENAME hello.txt escape/\nRENAME inside ../x\nHASH leak.txt\nDELE leak.txt\nGET inside\n".to_vec(),
        b"NOOP\r\nQUIT\nNOOP\n".to_vec(),
        b"LOGIN fuzz x\nREGISTER x yyyyyyyyy\nCWD /dir\nRMD /dir\n".to_vec(),
        [b"NOOP ".as_slice(), &[b'x'; 600], b"\n"].concat(),
        b"STAT \xc0\xae\xc0\xae/x\nNOOP\n".to_vec(),
        b"NOOP".to_vec(),
    ];

    // Uploads with correct frames: a new file in chunks, then fetched back.
    let mut s = put_line("new.bin", new.len(), CHUNK);
    s.extend(upload(&new, 0, CHUNK));
    s.extend(b"GET new.bin\nHASH new.bin\n");
    out.push(s);
    // A one-chunk file (its chunk hash is its BLAKE3), default chunk size.
    let mut s = b"PUT small.txt 5\n".to_vec();
    s.extend(upload(b"hello", 0, 256 << 10));
    out.push(s);
    // An empty file.
    let mut s = b"PUT zero 0 1024\n".to_vec();
    s.extend(upload(b"", 0, CHUNK));
    out.push(s);
    // Small files sent without waiting for a 150, several in a row.
    let mut s = Vec::new();
    for (name, body) in [("s1", &b"hello"[..]), ("s2", b""), ("dir/s3", &new[..1500])] {
        s.extend(format!("SEND {name} {}\n", body.len()).into_bytes());
        s.extend(upload(body, 0, 1 << 20));
    }
    s.extend(b"LIST\nSEND s1 3\n");
    out.push(s);
    // The resumable upload, continued at the offered offset.
    let mut s = put_line(RESUME_TARGET, RESUME_LEN, CHUNK);
    s.extend(upload(&resume, RESUME_HELD as u64, CHUNK));
    out.push(s);
    // Replacing a file, over the quota, into a directory, onto a link.
    let mut s = put_line("data.bin", new.len(), CHUNK);
    s.extend(upload(&new, 0, CHUNK));
    s.extend(b"PUT big 99999 1024\nPUT dir 5 1024\nPUT escape/x 5 1024\nPUT x 5 1000\n");
    out.push(s);
    let mut s = put_line("leak.txt", 5, CHUNK);
    s.extend(upload(b"hello", 0, CHUNK));
    out.push(s);
    // A chunk with a wrong hash (453), then the session goes on.
    let mut s = put_line("bad.bin", 1500, CHUNK);
    let mut frames = upload(&new[..1500], 0, CHUNK);
    frames[FRAME_HEADER + 20] ^= 1;
    s.extend(frames);
    s.extend(b"LIST\n");
    out.push(s);
    // A wrong whole-file hash (454).
    let mut s = put_line("bad2.bin", 1500, CHUNK);
    let mut frames = upload(&new[..1500], 0, CHUNK);
    let n = frames.len();
    frames[n - 1] ^= 1;
    s.extend(frames);
    out.push(s);
    // The sender gives up after one chunk.
    let mut s = put_line("gone.bin", 2500, CHUNK);
    let frames = upload(&new, 0, CHUNK);
    s.extend(&frames[..2 * FRAME_HEADER + 1024]);
    s.extend(FrameHeader::abort().encode());
    s.extend(b"QUOTA\n");
    out.push(s);
    // Out of step: a chunk before the start frame, a start at an offset never offered.
    let mut s = put_line("x.bin", 2500, CHUNK);
    s.extend(&upload(&new, 0, CHUNK)[FRAME_HEADER..]);
    out.push(s);
    let mut s = put_line("x.bin", 2500, CHUNK);
    s.extend(FrameHeader::start(1024).encode());
    out.push(s);
    // A declared size the chunks overrun.
    let mut s = put_line("x.bin", 1000, CHUNK);
    s.extend(upload(&new[..1500], 0, CHUNK));
    out.push(s);
    // Downloads resumed from a proven prefix, and from a false one.
    let mut tree = Tree::default();
    tree.push(chunk_hash(data.len() as u64, 0, &data[..CHUNK as usize]));
    let proof = hex(&tree.proof());
    out.push(
        format!("GET data.bin {CHUNK} {proof}\nGET data.bin 2048 {proof} 1024 {proof}\n")
            .into_bytes(),
    );
    out
}

const FRAME_HEADER: usize = ftpx::protocol::FRAME_HEADER_LEN;

fn put_line(path: &str, size: usize, chunk: u64) -> Vec<u8> {
    format!("PUT {path} {size} {chunk}\n").into_bytes()
}

/// The frames of an upload of `file` from `offset`: start, chunks, end.
fn upload(file: &[u8], offset: u64, chunk: u64) -> Vec<u8> {
    let size = file.len() as u64;
    let mut out = FrameHeader::start(offset).encode().to_vec();
    let mut tree = Tree::default();
    let mut pos = 0u64;
    while pos < size {
        let end = (pos + chunk).min(size);
        let payload = &file[pos as usize..end as usize];
        let hash = chunk_hash(size, pos, payload);
        tree.push(hash);
        if pos >= offset {
            let header = FrameHeader {
                kind: FrameKind::Chunk,
                offset: pos,
                len: payload.len() as u32,
                hash,
            };
            out.extend(header.encode());
            out.extend(payload);
        }
        pos = end;
    }
    out.extend(FrameHeader::end(size, tree.finalize()).encode());
    out
}

fn write_all(corpus: &Path, target: &str, inputs: impl IntoIterator<Item = Vec<u8>>) {
    let dir = corpus.join(target);
    // The corpus is all generated here: start afresh.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut n = 0;
    for input in inputs {
        let name = blake3::hash(&input).to_hex()[..16].to_string();
        std::fs::write(dir.join(name), input).unwrap();
        n += 1;
    }
    println!("{target}: {n} inputs in {}", dir.display());
}
