//! Fuzzes the config parser (`ferry::config::parse_str`, what `ferry check` and every load
//! and reload run): any bytes that are UTF-8, as the text of `fuzz.toml`. It must never
//! panic; an `Err` must hold at least one error, each displayed as `fuzz.toml:LINE:COL: `
//! and a non-empty message, with LINE and COL inside the text (LINE from 1 to the number of
//! lines + 1, COL from 1 to that line's length in characters + 1); and parsing the same text
//! twice must give the same answer (the same errors in the same order, or the same
//! summary).
//!
//! Relative paths in the text (certificates, CA files) are taken relative to an empty
//! folder, so they fail cleanly. A text that could name a device or a /proc file (`dev`,
//! `proc`, or a TOML escape that could spell them) is skipped: the parser reads certificate
//! files whole, and `/dev/zero` or `/dev/stdin` would only make the fuzzer wait or run out
//! of memory.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ferry::config::parse_str;
use libfuzzer_sys::fuzz_target;

const FILE: &str = "fuzz.toml";

/// The empty folder given as `base`, created once (and never written to).
fn base() -> &'static PathBuf {
    static BASE: OnceLock<PathBuf> = OnceLock::new();
    BASE.get_or_init(|| {
        let dir = std::env::temp_dir().join("ferry-fuzz-config-base");
        std::fs::create_dir_all(&dir).expect("create the fuzz base folder");
        let empty = std::fs::read_dir(&dir)
            .expect("read the fuzz base folder")
            .next()
            .is_none();
        assert!(
            empty,
            "{} must be empty: remove what is in it",
            dir.display()
        );
        dir
    })
}

/// The parse as something comparable: the summary of a good config, every error of a bad one.
fn parse(text: &str) -> Result<String, Vec<String>> {
    match parse_str(text, FILE, base()) {
        Ok(cfg) => Ok(cfg.summary()),
        Err(errors) => {
            assert!(!errors.0.is_empty(), "Err without an error");
            let lines: Vec<&str> = text.split('\n').collect();
            Err(errors
                .0
                .iter()
                .map(|e| {
                    let shown = e.to_string();
                    assert_eq!(e.file, FILE, "{shown}");
                    assert!(
                        (1..=lines.len()).contains(&e.line),
                        "line {} outside 1..={}: {shown}",
                        e.line,
                        lines.len()
                    );
                    let width = lines[e.line - 1].chars().count();
                    assert!(
                        (1..=width + 1).contains(&e.col),
                        "column {} outside 1..={} of line {}: {shown}",
                        e.col,
                        width + 1,
                        e.line
                    );
                    let prefix = format!("{FILE}:{}:{}: ", e.line, e.col);
                    assert!(shown.starts_with(&prefix), "{shown:?} without {prefix:?}");
                    assert!(shown.len() > prefix.len(), "an empty message: {shown:?}");
                    assert!(!shown.contains(['\n', '\r']), "not one line: {shown:?}");
                    shown
                })
                .collect())
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if ["dev", "proc", "\\u", "\\U", "\\x"]
        .iter()
        .any(|s| text.contains(s))
    {
        return;
    }
    let first = parse(text);
    assert_eq!(parse(text), first, "a second parse differs");
});
