//! Fuzzing the pipeline-config loader: mutated and garbage TOML files and arbitrary `--set`
//! overrides must give a valid configuration or an error naming the file or the override, never
//! a panic or a hang. A configuration that loads must hold only finite numbers.
//!
//! Cases run from a fixed seed; `PROPTEST_RNG_SEED=<n>` and `PROPTEST_CASES=<n>` explore further.

use std::path::{Path, PathBuf};

use proptest::prelude::*;
use sela_config::{ConfigError, PipelineConfig};

/// A config setting every section.
const VALID: &str = r#"# every section
[pipeline]
name = "fuzz"
seed = 7
rounds = 3

[data]
train = "data/train.parquet"
test = "data/test.parquet"
channels = 3
height = 32
width = 32
mean = [0.5, 0.5, 0.5]
std = [0.25, 0.25, 0.25]

[model]
backbone = "resnet"
widths = [16, 32]
blocks = [1, 1]
heads = [10, 10, 30]

[assign]
lambda = 25.0
tol = 1e-3
max_iters = 500
prior = "uniform"
exact_balance = false
warm_start = true

[train]
epochs_per_round = 2
batch_size = 128
optimizer = "sgd"
lr = 0.05
momentum = 0.9
weight_decay = 1e-5
schedule = "step"
warmup_epochs = 0.5
step_milestones = [0.5, 0.75]
step_gamma = 0.1
threads = 0

[augment]
crop_scale = [0.5, 1.0]
crop_ratio = [0.75, 1.333]
rotation_deg = 10.0
translate = 0.1
hflip = true
brightness = 0.4
contrast = 0.4
grayscale_p = 0.1

[eval]
knn_k = [20, 200]
knn_temperature = 0.07
probe_epochs = 10
probe_l2 = 1e-4
gallery_size = 8
"#;

/// Every key of every section.
const KEYS: &[(&str, &[&str])] = &[
    ("pipeline", &["name", "seed", "rounds"]),
    (
        "data",
        &[
            "train", "test", "channels", "height", "width", "mean", "std",
        ],
    ),
    (
        "model",
        &[
            "backbone",
            "widths",
            "blocks",
            "heads",
            "embedding_stage",
            "embedding_grid",
        ],
    ),
    (
        "assign",
        &[
            "lambda",
            "tol",
            "max_iters",
            "prior",
            "exact_balance",
            "warm_start",
            "acceleration",
            "neighbours",
            "neighbours_until_round",
        ],
    ),
    (
        "train",
        &[
            "epochs_per_round",
            "batch_size",
            "optimizer",
            "lr",
            "momentum",
            "weight_decay",
            "schedule",
            "warmup_epochs",
            "step_milestones",
            "step_gamma",
            "threads",
        ],
    ),
    (
        "augment",
        &[
            "crop_scale",
            "crop_ratio",
            "rotation_deg",
            "translate",
            "hflip",
            "brightness",
            "contrast",
            "grayscale_p",
        ],
    ),
    (
        "eval",
        &[
            "knn_k",
            "knn_temperature",
            "probe_epochs",
            "probe_l2",
            "gallery_size",
        ],
    ),
];

/// Runs `f` on its own thread; fails on a panic and on no answer within the time limit.
fn guarded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    sela_fuzz::guarded(what, usize::MAX, f)
}

fn config(cases: u32) -> ProptestConfig {
    sela_fuzz::config(cases, 0x5e1a_c0f1)
}

/// Every floating-point setting, by name.
fn floats(c: &PipelineConfig) -> Vec<(&'static str, f64)> {
    let (d, a, t, g, e) = (&c.data, &c.assign, &c.train, &c.augment, &c.eval);
    let mut out = vec![
        ("assign.lambda", a.lambda),
        ("assign.tol", a.tol),
        ("train.lr", t.lr),
        ("train.momentum", t.momentum),
        ("train.weight_decay", t.weight_decay),
        ("train.warmup_epochs", t.warmup_epochs),
        ("train.step_gamma", t.step_gamma),
        ("augment.rotation_deg", g.rotation_deg as f64),
        ("augment.translate", g.translate as f64),
        ("augment.brightness", g.brightness as f64),
        ("augment.contrast", g.contrast as f64),
        ("augment.grayscale_p", g.grayscale_p as f64),
        ("eval.knn_temperature", e.knn_temperature as f64),
        ("eval.probe_l2", e.probe_l2),
    ];
    out.extend(d.mean.iter().map(|&v| ("data.mean", v as f64)));
    out.extend(d.std.iter().map(|&v| ("data.std", v as f64)));
    out.extend(
        t.step_milestones
            .iter()
            .map(|&v| ("train.step_milestones", v)),
    );
    out.extend(
        g.crop_scale
            .iter()
            .map(|&v| ("augment.crop_scale", v as f64)),
    );
    out.extend(
        g.crop_ratio
            .iter()
            .map(|&v| ("augment.crop_ratio", v as f64)),
    );
    out
}

/// Loads `text` with `overrides`: a loaded config must be valid and finite; an error must name
/// the file or the override.
fn check(path: &Path, text: &[u8], overrides: Vec<String>) -> Result<(), TestCaseError> {
    std::fs::write(path, text).unwrap();
    check_load(path, overrides)
}

/// Like [`check`], for the file already at `path`.
fn check_load(path: &Path, overrides: Vec<String>) -> Result<(), TestCaseError> {
    let p = path.to_path_buf();
    let sets = overrides.clone();
    let result = guarded("load_with", move || {
        PipelineConfig::load_with(&p, &sets).map(|c| {
            let hash = c.hash();
            (c, hash)
        })
    });
    match result {
        Ok((c, hash)) => {
            prop_assert!(c.validate().is_ok());
            prop_assert_eq!(hash.len(), 16);
            for (name, v) in floats(&c) {
                prop_assert!(v.is_finite(), "{} = {} was accepted", name, v);
            }
        }
        Err(e) => {
            let msg = e.to_string();
            let names = match &e {
                ConfigError::Override { assignment, .. } => overrides.contains(assignment),
                _ => msg.contains(&path.display().to_string()),
            };
            prop_assert!(names, "the error names neither file nor override: {}", msg);
        }
    }
    Ok(())
}

fn scratch() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("pipeline.toml");
    (dir, path)
}

/// Numbers at the edges of the settings' types (and past them).
const EDGES: &[&str] = &[
    "0",
    "1",
    "-1",
    "2",
    "3",
    "7",
    "8",
    "255",
    "65535",
    "2147483647",
    "4294967295",
    "4294967296",
    "9007199254740993",
    "9223372036854775807",
    "-9223372036854775808",
    "18446744073709551615",
    "99999999999999999999",
    "0x7fffffffffffffff",
    "0b1",
    "0o7",
    "0.0",
    "-0.0",
    "0.5",
    "1.0",
    "1.0001",
    "1e-300",
    "1e-400",
    "3.4e38",
    "1e39",
    "1e308",
    "1e400",
    "-1e400",
    "nan",
    "+nan",
    "-nan",
    "inf",
    "-inf",
    "+inf",
];

/// An edge number or an arbitrary one.
fn number() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => proptest::sample::select(EDGES).prop_map(String::from),
        1 => any::<i64>().prop_map(|v| v.to_string()),
        1 => any::<u64>().prop_map(|v| v.to_string()),
        1 => any::<f64>().prop_map(|v| format!("{v:?}")),
    ]
}

/// Fragments of TOML syntax and values that stress the parser and the validation.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => proptest::sample::select(vec![
            "=", "[", "]", "[[", "]]", "{", "}", ",", ".", "\"", "'", "'''", "\"\"\"", "#",
            "\n", "\\", "true", "false", "1979-05-27T07:32:00Z", "07:32:00", "[]", "{}",
            "[1, \"a\"]", "\"\u{0}\"", "\"\\u0000\"", "\u{feff}", "\r\n", "\t", "\"sgd\"",
            "\"adamw\"", "\"cosine\"", "\"\"",
        ])
        .prop_map(String::from),
        1 => "[a-z_.]{1,12}",
        3 => number(),
    ]
}

/// An override value: a token, a list or table of them, deep nesting, or random text.
fn value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => number(),
        3 => token(),
        2 => proptest::collection::vec(token(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
        1 => proptest::collection::vec(token(), 0..3).prop_map(|v| {
            let fields: Vec<String> =
                v.iter().enumerate().map(|(i, t)| format!("k{i} = {t}")).collect();
            format!("{{ {} }}", fields.join(", "))
        }),
        1 => (1usize..300).prop_map(|d| format!("{}1{}", "[".repeat(d), "]".repeat(d))),
        1 => ".*",
    ]
}

/// A `--set` string: a real or made-up key with a value, or random text.
fn assignment() -> impl Strategy<Value = String> {
    let every_key: Vec<String> = KEYS
        .iter()
        .flat_map(|(section, keys)| keys.iter().map(move |k| format!("{section}.{k}")))
        .collect();
    let known = proptest::sample::select(every_key);
    let key = prop_oneof![
        6 => known,
        1 => "[a-z]{0,8}(\\.[a-z]{0,8}){0,3}",
        1 => Just("pipeline".to_string()),
        1 => Just(" data . width ".to_string()),
    ];
    prop_oneof![
        8 => (key, value()).prop_map(|(k, v)| format!("{k}={v}")),
        1 => ".*",
        1 => "[=.a-z ]{0,12}",
    ]
}

/// One edit of the file's text.
#[derive(Debug, Clone)]
enum Mutation {
    Flip {
        at: usize,
        bit: u8,
    },
    Insert {
        at: usize,
        text: String,
    },
    Remove {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
    /// Replaces the value of the line-th `key = value` line.
    Value {
        line: usize,
        value: String,
    },
    /// Repeats a line (a duplicate key or section).
    Repeat {
        line: usize,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => (any::<usize>(), 0u8..8).prop_map(|(at, bit)| Mutation::Flip { at, bit }),
        2 => (any::<usize>(), token()).prop_map(|(at, text)| Mutation::Insert { at, text }),
        1 => (any::<usize>(), 1usize..32).prop_map(|(at, len)| Mutation::Remove { at, len }),
        1 => any::<usize>().prop_map(|at| Mutation::Truncate { at }),
        4 => (any::<usize>(), value()).prop_map(|(line, value)| Mutation::Value { line, value }),
        1 => any::<usize>().prop_map(|line| Mutation::Repeat { line }),
    ]
}

fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
    let n = bytes.len();
    match m {
        Mutation::Flip { at, bit } if n > 0 => bytes[at % n] ^= 1 << bit,
        Mutation::Insert { at, text } => {
            let at = at % (n + 1);
            bytes.splice(at..at, text.bytes());
        }
        Mutation::Remove { at, len } if n > 0 => {
            let at = at % n;
            bytes.drain(at..(at + len).min(n));
        }
        Mutation::Truncate { at } => bytes.truncate(at % (n + 1)),
        Mutation::Value { line, value } => {
            let text = String::from_utf8_lossy(bytes).into_owned();
            let mut lines: Vec<String> = text.lines().map(String::from).collect();
            let assignments: Vec<usize> = (0..lines.len())
                .filter(|&i| lines[i].contains(" = "))
                .collect();
            if let Some(&i) = assignments.get(line % assignments.len().max(1)) {
                let key = lines[i].split(" = ").next().unwrap_or_default().to_string();
                lines[i] = format!("{key} = {value}");
                *bytes = (lines.join("\n") + "\n").into_bytes();
            }
        }
        Mutation::Repeat { line } => {
            let text = String::from_utf8_lossy(bytes).into_owned();
            let mut lines: Vec<String> = text.lines().map(String::from).collect();
            if !lines.is_empty() {
                let i = line % lines.len();
                lines.insert(i, lines[i].clone());
                *bytes = (lines.join("\n") + "\n").into_bytes();
            }
        }
        _ => {}
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn mutated_config_files(
        mutations in proptest::collection::vec(mutation(), 1..4),
        overrides in proptest::collection::vec(assignment(), 0..2),
    ) {
        let (_dir, path) = scratch();
        let mut bytes = VALID.as_bytes().to_vec();
        for m in &mutations {
            apply(&mut bytes, m);
        }
        check(&path, &bytes, overrides)?;
    }

    #[test]
    fn arbitrary_overrides(overrides in proptest::collection::vec(assignment(), 1..4)) {
        let (_dir, path) = scratch();
        check(&path, VALID.as_bytes(), overrides)?;
    }

    #[test]
    fn arbitrary_files(
        text in prop_oneof![
            ".*".prop_map(String::into_bytes),
            proptest::collection::vec(token(), 0..24).prop_map(|t| t.concat().into_bytes()),
            proptest::collection::vec(any::<u8>(), 0..256),
        ],
    ) {
        let (_dir, path) = scratch();
        check(&path, &text, Vec::new())?;
    }
}

/// Nesting far past any real config, in the file and in an override.
#[test]
fn deep_nesting_is_an_error() {
    let (_dir, path) = scratch();
    for depth in [1_000, 100_000] {
        let deep = format!("{}1{}", "[".repeat(depth), "]".repeat(depth));
        let text = format!("{VALID}\n[extra]\nx = {deep}\n");
        check(&path, text.as_bytes(), Vec::new()).unwrap();
        check(&path, VALID.as_bytes(), vec![format!("model.heads={deep}")]).unwrap();
        let tables = format!("{}1{}", "{a=".repeat(depth), "}".repeat(depth));
        check(
            &path,
            VALID.as_bytes(),
            vec![format!("eval.knn_k={tables}")],
        )
        .unwrap();
    }
}

/// Every key set to every edge number (in a one-element list for list settings).
#[test]
fn every_key_with_every_edge_number() {
    let (_dir, path) = scratch();
    std::fs::write(&path, VALID).unwrap();
    let lists = VALID
        .lines()
        .filter_map(|l| l.split_once(" = [").map(|(key, _)| key))
        .collect::<Vec<_>>();
    for (section, keys) in KEYS {
        for key in *keys {
            for edge in EDGES {
                let value = if lists.contains(key) {
                    format!("[{edge}]")
                } else {
                    edge.to_string()
                };
                check_load(&path, vec![format!("{section}.{key}={value}")]).unwrap();
            }
        }
    }
}

/// The valid config loads, so mutations start from one the loader accepts.
#[test]
fn valid_config_loads() {
    let (_dir, path) = scratch();
    std::fs::write(&path, VALID).unwrap();
    let c = PipelineConfig::load(&path).unwrap();
    assert_eq!(c.model.heads, vec![10, 10, 30]);
    assert_eq!(c.augment.grayscale_p, 0.1);
}
