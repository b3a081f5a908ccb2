use sha2::{Digest, Sha256};

use super::*;
use crate::priority::Priority;

const GOOD: &str = r#"
[model]
description = "test"
clinically_trained = false
max_batch_size = 8

[input]
name = "input"
layout = "NCHW"
height = 32
width = 32
color = "rgb"
resize_filter = "bilinear"
mean = [0.485, 0.456, 0.406]
std = [0.229, 0.224, 0.225]

[output]
name = "logits"
kind = "logits"
labels = ["no_tumor", "tumor"]
"#;

fn repo_with(toml_text: &str, versions: &[u64]) -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("m");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("model.toml"), toml_text).unwrap();
    for v in versions {
        std::fs::create_dir_all(dir.join(v.to_string())).unwrap();
        std::fs::write(dir.join(v.to_string()).join("model.onnx"), format!("v{v}")).unwrap();
    }
    root
}

fn load_err(toml_text: &str) -> String {
    ModelSpec::load(&repo_with(toml_text, &[1]).path().join("m"), None)
        .unwrap_err()
        .to_string()
}

#[test]
fn loads_highest_version_and_hashes_it() {
    let root = repo_with(GOOD, &[1, 3, 2]);
    let spec = ModelSpec::load(&root.path().join("m"), None).unwrap();
    assert_eq!(spec.config.name, "m");
    assert_eq!(spec.version, "3");
    assert_eq!(spec.sha256, hex::encode(Sha256::digest(b"v3")));
    assert_eq!(spec.config.input.image_len(), 3 * 32 * 32);
    assert!(matches!(spec.config.input.scaling, Scaling::MeanStd { .. }));
    assert_eq!(
        spec.config.input.sixteen_bit,
        SixteenBit::Pillow,
        "Pillow's by default"
    );
    assert_eq!(spec.warnings().len(), 1);
    assert_eq!(spec.config.batching, BatchingOverrides::default());
}

#[test]
fn explicit_missing_version_is_an_error() {
    let root = repo_with(GOOD, &[1]);
    let err = ModelSpec::load(&root.path().join("m"), Some(7)).unwrap_err();
    assert!(
        err.to_string().contains("version 7 has no model.onnx"),
        "{err}"
    );
}

#[test]
fn no_version_directory_is_an_error() {
    let root = repo_with(GOOD, &[]);
    let err = ModelSpec::load(&root.path().join("m"), None).unwrap_err();
    assert!(err.to_string().contains("no version directory"), "{err}");
}

#[test]
fn rejects_two_scalings_and_unknown_fields() {
    let both = GOOD.replace(
        "std = [0.229, 0.224, 0.225]",
        "std = [0.229, 0.224, 0.225]\nscale = 1.0",
    );
    assert!(load_err(&both).contains("exactly one scaling"));
    let typo = GOOD.replace("resize_filter", "resize_filtr");
    assert!(load_err(&typo).contains("resize_filtr"));
    let bad_filter = GOOD.replace("\"bilinear\"", "\"bilinearr\"");
    assert!(load_err(&bad_filter).contains("bilinearr"));
}

#[test]
fn batching_versions_and_sixteen_bit_sections() {
    let text = format!(
        "{GOOD}\n[batching]\nmax_batch_size = 4\ninstances = 2\ndefault_priority = \"stat\"\n\n\
         [versions]\npolicy = \"latest\"\nlatest = 2\n"
    )
    .replace(
        "resize_filter = \"bilinear\"",
        "resize_filter = \"bilinear\"\nsixteen_bit = \"scale\"",
    );
    let root = repo_with(&text, &[1, 2, 3]);
    let config = ModelConfig::load(&root.path().join("m")).unwrap();
    assert_eq!(config.batching.max_batch_size, Some(4));
    assert_eq!(config.batching.instances, Some(2));
    assert_eq!(config.batching.default_priority, Some(Priority::Stat));
    assert_eq!(config.versions, VersionPolicy::Latest(2));
    assert_eq!(config.input.sixteen_bit, SixteenBit::Scale);

    let bad = format!("{GOOD}\n[batching]\nmax_batchsize = 4\n");
    assert!(
        load_err(&bad).contains("max_batchsize"),
        "{}",
        load_err(&bad)
    );
    let bad = format!("{GOOD}\n[versions]\npolicy = \"specific\"\n");
    assert!(load_err(&bad).contains("non-empty `specific` list"));
    let bad = format!("{GOOD}\n[versions]\npolicy = \"newest\"\n");
    assert!(load_err(&bad).contains("unknown policy \"newest\""));
    let bad = format!("{GOOD}\n[versions]\npolicy = \"all\"\nlatest = 2\n");
    assert!(load_err(&bad).contains("`latest` goes with"));
}

#[test]
fn repository_lists_models_and_hashes_once_per_change() {
    let root = repo_with(GOOD, &[2, 10]);
    std::fs::create_dir(root.path().join("not-a-model")).unwrap();
    let dirs = repository::model_dirs(root.path()).unwrap();
    assert_eq!(dirs, [root.path().join("m")]);
    assert_eq!(repository::versions(&dirs[0]).unwrap(), [2, 10]);

    let mut cache = repository::HashCache::default();
    let path = repository::onnx_path(&dirs[0], 2);
    assert_eq!(
        cache.sha256(&path).unwrap(),
        hex::encode(Sha256::digest(b"v2"))
    );
    std::fs::write(&path, b"changed, longer").unwrap();
    assert_eq!(
        cache.sha256(&path).unwrap(),
        hex::encode(Sha256::digest(b"changed, longer")),
        "a changed file is hashed again"
    );
}

const SEGMENTATION: &str = r#"
[model]
task = "segmentation"
clinically_trained = false
max_batch_size = 4

[input]
name = "input"
layout = "NCHW"
height = 16
width = 16
channels = ["FLAIR", "T1c", "T2"]
resize_filter = "bilinear"
mean = [0.1, 0.2, 0.3]
std = [0.5, 0.5, 0.5]

[output]
name = "logits"
kind = "logits"
labels = ["background", "ncr", "edema", "enhancing"]
mask_resize = "bilinear"

[output.regions]
whole = ["ncr", "edema", "enhancing"]
core = ["enhancing", "ncr"]
"#;

#[test]
fn segmentation_models_declare_channels_labels_and_regions() {
    use crate::input::sequence::Sequence;
    let root = repo_with(SEGMENTATION, &[1]);
    let spec = ModelSpec::load(&root.path().join("m"), None).unwrap();
    let input = &spec.config.input;
    assert_eq!(
        input.channels,
        [Sequence::Flair, Sequence::T1c, Sequence::T2]
    );
    assert_eq!(input.image_len(), 3 * 16 * 16);
    let Task::Segmentation(seg) = &spec.config.task else {
        panic!("a segmentation model")
    };
    assert_eq!(seg.layout, Layout::Nchw, "NCHW by default");
    assert_eq!(seg.mask_resize, MaskResize::Bilinear);
    assert_eq!(seg.colors.len(), 4, "default colours, one per label");
    assert_eq!(seg.colors[0], [0, 0, 0], "the background is black");
    // Regions in name order, classes ascending.
    assert_eq!(
        seg.regions,
        [
            Region {
                name: "core".into(),
                classes: vec![1, 3]
            },
            Region {
                name: "whole".into(),
                classes: vec![1, 2, 3]
            },
        ]
    );
    assert_eq!(
        ModelConfig::parse("m", root.path(), GOOD).unwrap().task,
        Task::Classification
    );
}

#[test]
fn bad_segmentation_tomls_name_the_problem() {
    let cases = [
        (
            "labels = [\"background\", \"ncr\", \"edema\", \"enhancing\"]",
            "labels = [\"background\", \"ncr\", \"ncr\", \"enhancing\"]",
            "listed twice",
        ),
        (
            "core = [\"enhancing\", \"ncr\"]",
            "core = [\"enhancing\", \"necrosis\"]",
            "\"necrosis\" is not one of the labels",
        ),
        (
            "core = [\"enhancing\", \"ncr\"]",
            "core = [\"background\"]",
            "includes the background",
        ),
        (
            "mask_resize = \"bilinear\"",
            "mask_resize = \"bicubic\"",
            "expected `nearest` or `bilinear`",
        ),
        (
            "mask_resize = \"bilinear\"",
            "colors = [\"#000000\"]",
            "colors has 1 entries for 4 labels",
        ),
        (
            "mask_resize = \"bilinear\"",
            "colors = [\"#000000\", \"red\", \"#00ff00\", \"#0000ff\"]",
            "\"red\" is not #rrggbb",
        ),
        (
            "mean = [0.1, 0.2, 0.3]",
            "mean = [0.1, 0.2]",
            "one value per input channel: 3",
        ),
        (
            "channels = [\"FLAIR\", \"T1c\", \"T2\"]",
            "channels = [\"FLAIR\", \"T1c\", \"FLAIR\"]",
            "lists FLAIR twice",
        ),
        (
            "channels = [\"FLAIR\", \"T1c\", \"T2\"]",
            "channels = [\"FLAIR\", \"T1c\", \"T2\"]\ncolor = \"rgb\"",
            "color goes with single-image models",
        ),
        (
            "channels = [\"FLAIR\", \"T1c\", \"T2\"]",
            "channels = [\"FLAIR\", \"T1c\", \"DWI\"]",
            "unknown variant `DWI`",
        ),
        (
            "name = \"input\"",
            "tensors = [\"a\", \"b\"]",
            "tensors names 2 inputs for 3 channels",
        ),
        (
            "task = \"segmentation\"",
            "task = \"detection\"",
            "task must be",
        ),
        (
            "task = \"segmentation\"",
            "",
            "go with [model] task = \"segmentation\"",
        ),
    ];
    for (from, to, needle) in cases {
        assert!(SEGMENTATION.contains(from), "{from}");
        let err = load_err(&SEGMENTATION.replacen(from, to, 1));
        assert!(err.contains(needle), "{to}: {err}");
    }
    // A segmentation model without channels, a classifier with them.
    let err = load_err(&SEGMENTATION.replace(
        "channels = [\"FLAIR\", \"T1c\", \"T2\"]\n",
        "color = \"rgb\"\n",
    ));
    assert!(
        err.contains("a segmentation model declares its channels"),
        "{err}"
    );
    // A classifier may be multi-modal: its channels stacked as a segmentation model's are.
    let root = repo_with(
        &GOOD
            .replace("color = \"rgb\"", "channels = [\"FLAIR\", \"T2\", \"T1\"]")
            .replace("[model]", "[model]\ntask = \"classification\""),
        &[1],
    );
    let config = ModelSpec::load(&root.path().join("m"), None)
        .map(|spec| spec.config)
        .expect("a multi-modal classifier");
    assert!(matches!(config.task, Task::Classification));
    assert_eq!(
        config.input.channels,
        [
            crate::input::sequence::Sequence::Flair,
            crate::input::sequence::Sequence::T2,
            crate::input::sequence::Sequence::T1
        ]
    );
}
