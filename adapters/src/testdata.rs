//! Where the tests (of this crate and the end-to-end tests) find the third-party XJustiz files:
//! `../shared/xjustiz` beside the checkout, or `$JUSTIZBUS_SHARED/xjustiz`. They are read from
//! there, never copied into the project.

use std::path::PathBuf;

/// The `xjustiz` directory of the shared data; panics with a clear message when it is missing.
pub fn shared_xjustiz() -> PathBuf {
    let shared = std::env::var_os("JUSTIZBUS_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let dir = shared.join("xjustiz");
    assert!(
        dir.is_dir(),
        "{} not found: the tests read the XJustiz files from ../shared beside the checkout (or set JUSTIZBUS_SHARED)",
        dir.display()
    );
    dir
}

/// The samples `VALIDATION.md` lists, each with libxml2's verdict (true = valid).
pub fn samples_with_verdicts() -> Vec<(PathBuf, bool)> {
    let dir = shared_xjustiz();
    let table = std::fs::read_to_string(dir.join("VALIDATION.md")).expect("VALIDATION.md");
    table
        .lines()
        .filter(|l| l.starts_with("| `"))
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            Some((dir.join("samples").join(cells.get(1)?.trim_matches('`')), cells.get(5)?.starts_with("VALID")))
        })
        .collect()
}
