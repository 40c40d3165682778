//! Every pipeline shipped in `pipelines/` loads and validates.

use std::path::Path;

use sela_config::PipelineConfig;

#[test]
fn shipped_pipelines_are_valid() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../pipelines");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let config = PipelineConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(
                path.file_stem().unwrap().to_str().unwrap(),
                config.pipeline.name,
                "a pipeline's name is its file name (its runs go to runs/<name>/)"
            );
            names.push(config.pipeline.name);
        }
    }
    names.sort();
    assert_eq!(names, vec!["cifar-style", "default", "fashion-mnist"]);
}
