//! The binary's conventions: JSON summary on stdout, exit 1 on a runtime error, 2 on a usage error.

use std::process::Command;

use sela_images::idx::{encode_images, encode_labels, IdxImages};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sela-ingest"))
}

#[test]
fn summary_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("i-images-idx3-ubyte");
    let labels = dir.path().join("i-labels-idx1-ubyte");
    std::fs::write(
        &images,
        encode_images(&IdxImages {
            count: 4,
            rows: 3,
            cols: 3,
            pixels: vec![9; 36],
        }),
    )
    .unwrap();
    std::fs::write(&labels, encode_labels(&[0, 1, 0, 1])).unwrap();
    let out = dir.path().join("d.parquet");

    let ok = bin()
        .args(["idx", "--images"])
        .arg(&images)
        .arg("--labels")
        .arg(&labels)
        .arg("--output")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let stdout = String::from_utf8(ok.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1);
    assert!(stdout.contains("\"rows\":4"), "{stdout}");

    let bad = bin()
        .args(["idx", "--images"])
        .arg(&labels)
        .arg("--output")
        .arg(dir.path().join("e.parquet"))
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8(bad.stderr).unwrap();
    assert!(
        stderr.starts_with("error: ") && stderr.contains("magic"),
        "{stderr}"
    );
    assert!(!dir.path().join("e.parquet").exists());

    let usage = bin().args(["idx", "--bogus"]).output().unwrap();
    assert_eq!(usage.status.code(), Some(2));
}
