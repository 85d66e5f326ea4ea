//! Configuration: the default recipe loads; typos, wrong types and impossible values are errors
//! that name the file, line and key, with a suggestion.

use crate::support::*;
use reviewer2::config::{ConfigError, Loaded, Settings, Sources};

fn load(file: &std::path::Path, sets: &[String], must_exist: bool) -> Result<Loaded, ConfigError> {
    load_with(file, None, sets, must_exist)
}

fn load_with(
    file: &std::path::Path,
    preset: Option<&str>,
    sets: &[String],
    must_exist: bool,
) -> Result<Loaded, ConfigError> {
    reviewer2::config::load(&Sources {
        file: file.to_path_buf(),
        must_exist,
        preset: preset.map(String::from),
        overrides: sets.to_vec(),
    })
}

fn write(dir: &std::path::Path, text: &str) -> std::path::PathBuf {
    let p = dir.join("pipeline.toml");
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn the_repo_recipe_is_the_default_recipe() {
    let l = load(&repo().join("pipeline.toml"), &[], true).unwrap();
    assert_eq!(l.settings, Settings::default());
    assert_eq!(l.settings.scrape.count, 1100);
    assert_eq!(
        l.settings.generate.model,
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0"
    );
    assert_eq!((l.settings.split.train, l.settings.split.test), (1000, 100));
}

#[test]
fn unknown_key_names_file_line_and_suggests() {
    let d = tempdir();
    let p = write(d.path(), "[scrape]\nseed = 1\ncout = 5\n");
    let e = load(&p, &[], true).unwrap_err().to_string();
    assert!(
        e.contains("pipeline.toml:3") && e.contains("scrape.cout") && e.contains("scrape.count"),
        "{e}"
    );
    let p = write(d.path(), "[generat]\nmodel = 'x'\n");
    let e = load(&p, &[], true).unwrap_err().to_string();
    assert!(
        e.contains(":1") && e.contains("did you mean `generate`"),
        "{e}"
    );
}

#[test]
fn wrong_type_names_the_line() {
    let d = tempdir();
    let p = write(d.path(), "[split]\ntrain = 10\ntest = \"many\"\n");
    let e = load(&p, &[], true).unwrap_err().to_string();
    assert!(e.contains("pipeline.toml:3"), "{e}");
}

#[test]
fn impossible_values_name_the_key_and_line() {
    let d = tempdir();
    let p = write(d.path(), "[generate]\ntop_p = 1.5\n");
    let e = load(&p, &[], true).unwrap_err().to_string();
    assert!(
        e.contains("pipeline.toml:2") && e.contains("generate.top_p") && e.contains("(0, 1]"),
        "{e}"
    );
    let p = write(d.path(), "[split]\ntrain = 1000\ntest = 200\n");
    let e = load(&p, &[], true).unwrap_err().to_string();
    assert!(e.contains("exceeds scrape.count 1100"), "{e}");
}

#[test]
fn the_posts_truncation_config_is_refused_with_the_reason() {
    let d = tempdir();
    let p = write(
        d.path(),
        "[train]\nmax_length = 128\nmax_prompt_length = 256\n",
    );
    let e = load(&p, &[], true).unwrap_err().to_string();
    assert!(
        e.contains("pipeline.toml:2")
            && e.contains("every response would be empty")
            && e.contains("ln 2"),
        "{e}"
    );
}

#[test]
fn set_overrides_by_dotted_name() {
    let d = tempdir();
    let p = write(d.path(), "[generate]\ntemperature = 0.5\n");
    let l = load(
        &p,
        &[
            "generate.temperature=0.9".into(),
            "generate.model=foo/bar".into(),
            "train.lora.r=4".into(),
        ],
        true,
    )
    .unwrap();
    assert_eq!(l.settings.generate.temperature, 0.9);
    assert_eq!(l.settings.generate.model, "foo/bar");
    assert_eq!(l.settings.train.lora.r, 4);
    assert!(l.origin("generate.temperature").contains("--set"));
    let e = load(&p, &["generate.temprature=1".into()], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("did you mean `generate.temperature`"), "{e}");
    let e = load(&p, &["split.train=lots".into()], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--set split.train=lots"), "{e}");
}

#[test]
fn each_kind_of_error_has_its_exit_code() {
    // README "Exit codes": 2 usage or settings, 3 an unsupported model, 4 a remote failure,
    // 1 anything else.
    let d = tempdir();
    write(d.path(), "[scrape]\ncout = 5\n");
    let o = pipeline(d.path(), &["status"]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr_of(&o));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        e.starts_with("error: ") && e.contains("scrape.count"),
        "{e}"
    );
    // A missing explicit --config is a settings error; bad usage is clap's exit code 2.
    let o = pipeline(d.path(), &["status", "--config", "nope.toml"]);
    assert_eq!(o.status.code(), Some(2));
    let o = pipeline(d.path(), &["run", "--until", "nowhere"]);
    assert_eq!(o.status.code(), Some(2));
    // A page that cannot be fetched, with no fallback: the remote failure's code.
    write(d.path(), "");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("scrape.url=\"http://127.0.0.1:{port}/papers.html\"");
    let o = pipeline(
        d.path(),
        &[
            "run",
            "--until",
            "scrape",
            "--set",
            &url,
            "--set",
            "scrape.fallback=false",
            "--set",
            "scrape.retries=0",
            "--set",
            "scrape.timeout_secs=2",
        ],
    );
    assert_eq!(o.status.code(), Some(4), "{}", stderr_of(&o));
    // A model of another architecture: unsupported.
    let m = d.path().join("gpt2");
    std::fs::create_dir_all(&m).unwrap();
    std::fs::write(
        m.join("config.json"),
        r#"{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 10,
            "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 64}"#,
    )
    .unwrap();
    std::fs::write(m.join("tokenizer.json"), "{}").unwrap();
    std::fs::write(m.join("model.safetensors"), "").unwrap();
    let o = pipeline(
        d.path(),
        &[
            "run",
            "--until",
            "prompts",
            "--set",
            "scrape.snapshot=\"bundled\"",
            "--set",
            "scrape.count=3",
            "--set",
            "split.train=2",
            "--set",
            "split.test=1",
            "--set",
            &format!("generate.model=\"{}\"", m.display()),
            "--set",
            &format!(
                "prompts.templates=\"{}\"",
                repo().join("templates").display()
            ),
        ],
    );
    assert_eq!(o.status.code(), Some(3), "{}", stderr_of(&o));
    assert!(
        stderr_of(&o).contains("unsupported architecture"),
        "{}",
        stderr_of(&o)
    );
}

#[test]
fn global_flags_work_before_and_after_the_subcommand() {
    let d = tempdir();
    write(
        d.path(),
        &format!(
            "[scrape]\nsnapshot = \"{}\"\ncount = 3\n[split]\ntrain = 2\ntest = 1\n",
            fixture("papers-mini.html").display()
        ),
    );
    pipeline_ok(
        d.path(),
        &["--workdir", "w1", "run", "--until", "scrape", "-q"],
    );
    pipeline_ok(d.path(), &["run", "--workdir", "w2", "--until", "scrape"]);
    assert!(d.path().join("w1/cache/scrape").is_dir() && d.path().join("w2/cache/scrape").is_dir());
    let help = pipeline_ok(d.path(), &["run", "--help"]);
    assert!(
        help.contains("--until") && help.contains("--force"),
        "{help}"
    );
}

#[test]
fn a_value_outside_its_choices_is_refused_with_the_key_and_the_choices() {
    let d = tempdir();
    let p = write(d.path(), "[train]\nbeta = 0.2\nloss = \"sigmod\"\n");
    let e = load(&p, &[], true).unwrap_err().to_string();
    assert!(
        e.contains("pipeline.toml:3")
            && e.contains("train.loss")
            && e.contains("sigmod")
            && e.contains("`sigmoid`")
            && e.contains("`kto`"),
        "{e}"
    );
    let ok = write(d.path(), "[train]\nbeta = 0.2\n");
    for (set, key, choice) in [
        ("generate.device=gpu", "generate.device", "`cuda`"),
        ("generate.weights=q4", "generate.weights", "`quantized`"),
        (
            "generate.attention=flash",
            "generate.attention",
            "`composed`",
        ),
        ("train.lr_scheduler=step", "train.lr_scheduler", "`cosine`"),
        (
            "train.truncation_mode=middle",
            "train.truncation_mode",
            "`keep_end`",
        ),
        ("prompts.style=prose", "prompts.style", "`plain`"),
        ("train.device=tpu", "train.device", "`cpu`"),
    ] {
        let e = load(&ok, &[set.into()], true).unwrap_err().to_string();
        assert!(
            e.contains(&format!("--set {set}")) && e.contains(key) && e.contains(choice),
            "{set}: {e}"
        );
    }
    // The same values, spelled right, load as enums.
    let l = load(
        &ok,
        &["train.loss=kto".into(), "generate.device=cpu".into()],
        true,
    )
    .unwrap();
    assert_eq!(
        l.settings.train.loss,
        reviewer2::dpo::config::Losses::one(reviewer2::dpo::config::Loss::Kto)
    );
}

#[test]
fn numbers_out_of_range_are_refused_where_they_are_set() {
    let d = tempdir();
    let p = write(d.path(), "");
    for (set, key) in [
        ("train.adam_beta1=1.0", "train.adam_beta1"),
        ("train.adam_beta2=-0.1", "train.adam_beta2"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("train.learning_rate=inf", "train.learning_rate"),
        ("train.lora.alpha=0", "train.lora.alpha"),
        ("train.lora.alpha=nan", "train.lora.alpha"),
        ("train.lora.dropout=1", "train.lora.dropout"),
        ("train.lora.targets=[\"qkv\"]", "train.lora.targets"),
        ("generate.top_p=0", "generate.top_p"),
        ("generate.temperature=-1", "generate.temperature"),
        ("train.adam_epsilon=0", "train.adam_epsilon"),
    ] {
        let e = load(&p, &[set.into()], true).unwrap_err().to_string();
        assert!(e.contains("--set") && e.contains(key), "{set}: {e}");
    }
}

#[test]
fn presets_apply_over_the_file_and_under_set() {
    let d = tempdir();
    let p = write(
        d.path(),
        "[split]\ntrain = 700\n[generate]\ntemperature = 0.9\n",
    );
    let l = load_with(&p, Some("quick"), &["train.max_steps=3".into()], true).unwrap();
    let s = &l.settings;
    // The preset wins over the file...
    assert_eq!((s.split.train, s.split.test, s.scrape.count), (20, 4, 24));
    assert_eq!(s.scrape.snapshot, "bundled");
    assert!(l.origin("split.train").contains("--preset quick"));
    // ...the file's other keys stay...
    assert_eq!(s.generate.temperature, 0.9);
    assert!(l.origin("generate.temperature").contains("pipeline.toml:4"));
    // ...and --set wins over both.
    assert_eq!(s.train.max_steps, 3);
    let e = load_with(&p, Some("fast"), &[], true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--preset fast") && e.contains("quick"), "{e}");
}

#[test]
fn penalties_out_of_range_name_the_key_and_the_range() {
    let d = tempdir();
    for (line, key, range) in [
        (
            "repetition_penalty = 0",
            "generate.repetition_penalty",
            "> 0",
        ),
        (
            "repetition_penalty = -1.2",
            "generate.repetition_penalty",
            "> 0",
        ),
        (
            "repetition_penalty = nan",
            "generate.repetition_penalty",
            "> 0",
        ),
        (
            "frequency_penalty = 2.5",
            "generate.frequency_penalty",
            "[-2, 2]",
        ),
        (
            "presence_penalty = -3",
            "generate.presence_penalty",
            "[-2, 2]",
        ),
    ] {
        let p = write(d.path(), &format!("[generate]\n{line}\n"));
        let e = load(&p, &[], true).unwrap_err().to_string();
        assert!(
            e.contains("pipeline.toml:2") && e.contains(key) && e.contains(range),
            "{line}: {e}"
        );
    }
    let p = write(
        d.path(),
        "[generate]\nrepetition_penalty = 1.3\nfrequency_penalty = -2\npresence_penalty = 2\n",
    );
    let s = load(&p, &[], true).unwrap().settings;
    assert_ne!(s, Settings::default());
}

#[test]
fn rounds_settings_that_cannot_work_are_refused_by_name() {
    let d = tempdir();
    let p = write(d.path(), "");
    let on = |more: &[&str]| -> Result<(), String> {
        let mut sets = vec!["rounds.count=2".to_string()];
        sets.extend(more.iter().map(|s| s.to_string()));
        load(&p, &sets, true).map(|_| ()).map_err(|e| e.to_string())
    };
    assert!(on(&[]).is_ok());
    for (more, key, why) in [
        (&["rounds.samples=1"][..], "rounds.samples", "at least 2"),
        (&["rounds.titles=0"], "rounds.titles", "at least 1"),
        (
            &["rounds.judge=\"llm\""],
            "rounds.judge",
            "\"lexicon\" or \"trained\"",
        ),
        (
            &["rounds.judge=\"off\""],
            "rounds.judge",
            "\"lexicon\" or \"trained\"",
        ),
        (&["rounds.margin=-0.5"], "rounds.margin", ">= 0"),
        (
            &["rounds.length_penalty=nan"],
            "rounds.length_penalty",
            "finite",
        ),
        (&["rounds.epochs=0"], "rounds.epochs", "at least 1"),
        (
            &["train.dataset=\"x.parquet\""],
            "rounds.count",
            "train.dataset",
        ),
        (&["train.loss=\"kto\""], "rounds.count", "unpaired"),
        (&["merge.judge=\"lexicon\""], "rounds.judge", "independent"),
    ] {
        let e = on(more).unwrap_err();
        assert!(e.contains(key) && e.contains(why), "{more:?}: {e}");
    }
    // The same judge labelling both, or an llm judge as a third, leaves the eval one that did
    // not label; and with no rounds nothing of [rounds] is checked.
    assert!(on(&["merge.judge=\"lexicon\"", "rounds.judge=\"lexicon\""]).is_ok());
    assert!(on(&["merge.judge=\"lexicon\"", "eval.judge=\"llm\""]).is_ok());
    assert!(load(&p, &["rounds.samples=1".into()], true).is_ok());
}

/// `train.loss` as a list, and every loss setting range-checked where it is parsed, the error
/// naming its key.
#[test]
fn loss_lists_and_loss_settings_are_checked_by_key() {
    use reviewer2::dpo::config::{Loss, Losses};
    let d = tempdir();
    let p = write(d.path(), "");
    let ok = |sets: &[&str]| {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        load(&p, &sets, true).unwrap().settings.train
    };
    let t = ok(&[
        "train.loss=[\"sigmoid\", \"sft\"]",
        "train.loss_weights=[1.0, 0.5]",
    ]);
    assert_eq!(t.loss, Losses(vec![Loss::Sigmoid, Loss::Sft]));
    assert_eq!(t.loss_weights, vec![1.0, 0.5]);
    let t = ok(&["train.loss=simpo"]);
    assert_eq!(
        (t.simpo_gamma, t.cpo_alpha, t.discopop_tau),
        (0.5, 1.0, 0.05)
    );
    assert!(!t.loss.needs_reference());
    for (sets, key, why) in [
        (&["train.loss=[]"][..], "train.loss", "empty list"),
        (
            &["train.loss=[\"sigmoid\", \"kto\"]"],
            "train.loss",
            "\"kto\"",
        ),
        (
            &["train.loss=[\"simpo\", \"sft\"]"],
            "train.loss",
            "\"simpo\"",
        ),
        (
            &["train.loss=[\"orpo\", \"sigmoid\"]"],
            "train.loss",
            "\"orpo\"",
        ),
        (
            &[
                "train.loss=[\"sigmoid\", \"sft\"]",
                "train.loss_weights=[1.0]",
            ],
            "train.loss_weights",
            "one weight per loss",
        ),
        (&["train.loss_weights=[-1.0]"], "train.loss_weights", ">= 0"),
        (&["train.simpo_gamma=-0.1"], "train.simpo_gamma", ">= 0"),
        (&["train.cpo_alpha=-1"], "train.cpo_alpha", ">= 0"),
        (&["train.discopop_tau=0"], "train.discopop_tau", "> 0"),
        (
            &["train.loss=exo_pair"],
            "train.label_smoothing",
            "exo_pair",
        ),
        (
            &["train.loss=orpo", "train.rpo_alpha=0.5"],
            "train.rpo_alpha",
            "own NLL",
        ),
        (&["train.loss=sigmod"], "train.loss", "sigmoid_norm"),
    ] {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        let e = load(&p, &sets, true).unwrap_err().to_string();
        assert!(e.contains(key) && e.contains(why), "{sets:?}: {e}");
    }
}
